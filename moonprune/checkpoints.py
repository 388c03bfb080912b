"""The dense model a user brings, and moonprune's own checkpoint.

Reading files safely (``weights_only=True`` unless trusted; nested state_dicts,
wrapper prefixes, ``.safetensors``) is :mod:`moonprune.weights`; this module builds
the network from an :class:`ArchSpec` and loads them into it.

A moonprune checkpoint (what ``compress`` writes) is a
:class:`~moonprune.checkpoint_record.MoonpruneCheckpoint`, saved as a plain dict of
tensors and JSON-like values (so it too loads with ``weights_only=True``): this module
writes it atomically and reads it back, and the record checks every field before it
rebuilds the network (:mod:`moonprune.checkpoint_record`); what the run was asked and
deployed is its :class:`~moonprune.run_record.RunRecord`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moonprune.arch import ArchSpec as ArchSpec
from moonprune.checkpoint_record import FORMAT as FORMAT
from moonprune.checkpoint_record import FORMAT_VERSION as FORMAT_VERSION
from moonprune.checkpoint_record import MoonpruneCheckpoint as MoonpruneCheckpoint
from moonprune.checkpoint_record import checkpoint_from_dict as checkpoint_from_dict
from moonprune.data import Preprocessing
from moonprune.errors import CheckpointError
from moonprune.outputs import atomic_path
from moonprune.run_record import RunRecord as RunRecord
from moonprune.weights import (
    NESTED_KEYS,
    check_finite,
    find_state_dict,
    load_safetensors,
    load_weights_,
    torch_load,
)


@dataclass
class DenseModel:
    """The model a user brings; ``arch`` is None for a trusted pickled module.

    Starting from a moonprune checkpoint (e.g. a channel-pruned one, to sparsify it
    further), ``head_layer`` names its unknown output, ``structure`` its shapes and
    ``preprocessing`` the inputs it was fine-tuned on (kept by the next run).
    """

    model: nn.Module
    arch: ArchSpec | None
    head_layer: str | None = None
    structure: dict[str, dict[str, int]] | None = None
    preprocessing: Preprocessing | None = None


def load_dense(
    path: str | Path,
    arch: ArchSpec | None = None,
    trust: bool = False,
    example_input: torch.Tensor | None = None,
) -> DenseModel:
    """Load a state_dict (+ ``arch``), a nested state_dict, a moonprune checkpoint,
    ``.safetensors`` (+ ``arch``), or with ``trust`` a whole pickled module.

    A pickled module given with ``arch`` is checked now to load into ``arch.build()``
    (the saved result is rebuilt from ``arch``, so a mismatch would only show later, in
    an unloadable ``model.pt``); its weights are then used in the rebuilt network.
    ``example_input`` lets a classifier-width mismatch be reported as such.

    Example::

        >>> import torch, moonprune
        >>> torch.save(moonprune.models.demo_cnn(num_classes=3).state_dict(), "dense.pt")
        >>> spec = moonprune.ArchSpec("moonprune.models:demo_cnn", {"num_classes": 3})
        >>> moonprune.load_dense("dense.pt", spec).model.classifier.out_features
        3
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        state = load_safetensors(p)
    else:
        obj = torch_load(p, trust)
        if isinstance(obj, nn.Module) and arch is None:
            check_finite(obj.state_dict(), str(p))
            return DenseModel(obj, arch)
        if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
            ckpt = checkpoint_from_dict(obj, str(p), arch.factory if arch else None)
            return DenseModel(
                ckpt.model, ckpt.arch, ckpt.head_layer, ckpt.structure, ckpt.preprocessing
            )
        found = obj.state_dict() if isinstance(obj, nn.Module) else find_state_dict(obj)
        if found is None:
            raise CheckpointError(
                f"{str(p)!r} holds no state_dict (a dict of tensors, possibly under "
                f"one of the keys {list(NESTED_KEYS)}); save model.state_dict()"
            )
        state = found
    if arch is None:
        raise CheckpointError(
            f"{str(p)!r} is a state_dict: pass --arch package.module:factory (or "
            "path/to/file.py:factory) to say which network it belongs to"
        )
    check_finite(state, str(p))
    model = arch.build()
    load_weights_(model, state, str(p), example_input)
    return DenseModel(model, arch)


def save_checkpoint(ckpt: MoonpruneCheckpoint, path: str | Path) -> Path:
    """Write ``ckpt`` atomically (temporary name, then rename).

    Example::

        >>> import moonprune
        >>> from moonprune.checkpoints import MoonpruneCheckpoint, RunRecord
        >>> from moonprune.data import Preprocessing
        >>> ckpt = MoonpruneCheckpoint(
        ...     model=moonprune.models.demo_cnn(num_classes=2, width=4),
        ...     arch=moonprune.ArchSpec("moonprune.models:demo_cnn",
        ...                             {"num_classes": 2, "width": 4}),
        ...     classes=("a", "b"), run=RunRecord(Preprocessing(1, 8, 8, 1.0, (0.0,), (1.0,))))
        >>> moonprune.save_checkpoint(ckpt, "saved.pt").name
        'saved.pt'
        >>> moonprune.load_checkpoint("saved.pt").classes
        ('a', 'b')
    """
    p = Path(path)
    with atomic_path(p) as tmp:
        torch.save(ckpt.to_dict(), tmp)
    return p


def load_checkpoint(path: str | Path, arch: str | None = None) -> MoonpruneCheckpoint:
    """Load a moonprune checkpoint (``model.pt`` from ``compress``), safely.

    The network is rebuilt by the factory the checkpoint records only when that is a
    moonprune built-in; a network of your own needs ``arch`` (``--arch``) naming it,
    because a file never decides which code runs (:mod:`moonprune.trust`).

    Example::

        >>> import moonprune
        >>> result = moonprune.compress(moonprune.build_config({
        ...     "checkpoint": "", "data": "digits:0-2", "out": "ckpt-run", "export": False,
        ...     "train": {"epochs": 1}, "moon": {"warmup_epochs": 0}}),
        ...     dense=moonprune.checkpoints.DenseModel(
        ...         moonprune.models.demo_cnn(num_classes=3, width=4),
        ...         moonprune.ArchSpec("moonprune.models:demo_cnn",
        ...                            {"num_classes": 3, "width": 4})))
        >>> ckpt = moonprune.load_checkpoint("ckpt-run/model.pt")
        >>> ckpt.num_known, ckpt.has_unknown
        (3, True)
    """
    p = Path(path)
    obj = torch_load(p, trust=False, trust_flag=False)
    if not (isinstance(obj, Mapping) and obj.get("format") == FORMAT):
        raise CheckpointError(
            f"{str(p)!r} is not a moonprune checkpoint (written by `moonprune compress`)"
        )
    return checkpoint_from_dict(obj, str(p), arch)


def measured_sparsity(model: nn.Module) -> float:
    """Zeros / total over the prunable (conv and linear) weights."""
    from moonprune.conventions import prunable_weights

    zeros = total = 0
    for _, w in prunable_weights(model):
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else math.nan
