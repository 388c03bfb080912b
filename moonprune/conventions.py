"""The conventions every other module relies on, fixed in one place.

- A model has ``K`` known classes. With MOON it has ``K + 1`` outputs and the
  unknown class is the last column, index ``K`` (:func:`unknown_index`).
- A plain (``--no-moon``) model has ``K`` outputs and no unknown column.
- Every OOD score is "higher = more in-distribution", like the exported
  ``confidence``.
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
