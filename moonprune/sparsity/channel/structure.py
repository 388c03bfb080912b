"""Sizes of a channel-pruned network: MACs and parameters, and the changed layer sizes.

The bottom of :mod:`moonprune.sparsity.channel` (it imports no other module of the
package). :func:`module_structure` records the size attributes of every
conv/linear/norm layer (plain integers, safe to load with ``weights_only=True``);
:func:`apply_structure_` rebuilds them on a freshly built model before a pruned
state_dict is loaded (a saved checkpoint, or a channel run's training state on
``--resume``). :func:`require_torch_pruning` imports Torch-Pruning, which only this
package needs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moonprune.errors import ConfigError

_SIZE_ATTRS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Conv1d: ("in_channels", "out_channels", "groups"),
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.BatchNorm1d: ("num_features",),
    nn.BatchNorm2d: ("num_features",),
    nn.GroupNorm: ("num_channels", "num_groups"),
    nn.LayerNorm: (),
}


def require_torch_pruning() -> Any:
    """The ``torch_pruning`` module, or a ConfigError that says how to install it."""
    try:
        import torch_pruning as tp
    except ImportError:
        raise ConfigError(
            "--method channel needs Torch-Pruning: pip install torch-pruning"
        ) from None
    return tp


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output channels (features) of every conv and linear layer, by module name."""
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d):
            widths[name] = int(m.out_channels)
        elif isinstance(m, nn.Linear):
            widths[name] = int(m.out_features)
    return widths


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """Multiply-accumulates for one input, and parameters."""
    tp = require_torch_pruning()
    was_training = model.training
    model.eval()
    try:
        macs, params = tp.utils.count_ops_and_params(model, example[:1])
    finally:
        model.train(was_training)
    return int(macs), int(params)


def size_vs_dense(model: nn.Module, dense: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """MACs and parameters of ``model`` and of its ``dense`` original, and their ratio."""
    dense_macs, dense_params = count_macs_params(dense, example)
    macs, params = count_macs_params(model, example)
    return {"dense_macs": dense_macs, "macs": macs, "macs_fraction": macs / dense_macs,
            "dense_params": dense_params, "params": params,
            "params_fraction": params / dense_params}  # fmt: skip


def module_structure(model: nn.Module) -> dict[str, dict[str, int]]:
    """Size attributes of every conv/linear/norm module (integers only)."""
    structure = {}
    for name, module in model.named_modules():
        attrs = _SIZE_ATTRS.get(type(module))
        if attrs:
            structure[name] = {a: int(getattr(module, a)) for a in attrs}
    return structure


def apply_structure_(
    model: nn.Module, structure: dict[str, dict[str, int]], state: dict[str, torch.Tensor]
) -> None:
    """Resize ``model``'s modules to ``structure`` and its tensors to ``state``'s shapes."""
    for name, attrs in structure.items():
        module = model.get_submodule(name)
        for attr, value in attrs.items():
            setattr(module, attr, value)
        prefix = f"{name}." if name else ""
        for pname, param in list(module.named_parameters(recurse=False)):
            shape = state[prefix + pname].shape
            if param.shape != shape:
                setattr(module, pname, nn.Parameter(param.new_empty(shape)))
        for bname, buf in list(module.named_buffers(recurse=False)):
            if (
                buf is not None
                and prefix + bname in state
                and buf.shape != state[prefix + bname].shape
            ):
                module.register_buffer(bname, buf.new_empty(state[prefix + bname].shape))
