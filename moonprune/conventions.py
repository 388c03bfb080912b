"""The conventions every other module relies on, fixed in one place.

- A model has ``K`` known classes. With MOON it has ``K + 1`` outputs and the
  unknown class is the last column, index ``K`` (:func:`unknown_index`).
- A plain (``--no-moon``) model has ``K`` outputs and no unknown column.
- Every OOD score is "higher = more in-distribution", like the exported
  ``confidence``.
- The layer that carries the unknown output is marked with the attribute
  ``moonprune_unknown_row`` (the row's index, ``K``) by
  :func:`moonprune.heads.add_unknown_output_`; :func:`unknown_rows` reads the marks.
  Every masker keeps that row active (:mod:`moonprune.sparsity.base`), and channel
  pruning never removes the classifier's output rows.
"""

from __future__ import annotations

import torch
from torch import nn

#: Module types whose ``weight`` is prunable (conv and linear); biases and norms stay dense.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def unknown_index(num_known: int) -> int:
    """Column of the unknown class in a ``(N, K + 1)`` logit tensor: ``K``."""
    return num_known


def has_unknown_output(logits: torch.Tensor, num_known: int) -> bool:
    """True when ``logits`` (N, C) carries the extra unknown column (C == K + 1)."""
    width = logits.shape[-1]
    if width not in (num_known, num_known + 1):
        raise ValueError(f"logits have {width} columns; expected K={num_known} or K+1")
    return width == num_known + 1


def prunable_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(parameter name, weight)`` of every conv and linear layer, in module order."""
    found: list[tuple[str, torch.Tensor]] = []
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES) and isinstance(module.weight, torch.Tensor):
            found.append((f"{name}.weight" if name else "weight", module.weight))
    return found


#: Attribute (an ``int``) set on the layer that carries the unknown output: its row index.
UNKNOWN_ROW_ATTR = "moonprune_unknown_row"


def unknown_rows(model: nn.Module) -> dict[str, int]:
    """``{weight parameter name: unknown row index}`` for each marked layer of ``model``.

    A plain attribute (not a buffer), so the state dict keeps its keys; copies of the
    model (``copy.deepcopy``, weight averaging) keep it, and a checkpoint replays the
    surgery, which sets it again.
    """
    found: dict[str, int] = {}
    for name, module in model.named_modules():
        row = getattr(module, UNKNOWN_ROW_ATTR, None)
        if isinstance(row, int) and isinstance(getattr(module, "weight", None), torch.Tensor):
            found[f"{name}.weight" if name else "weight"] = row
    return found
