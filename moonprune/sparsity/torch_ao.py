"""``torch-ao``: PyTorch's own ``WeightNormSparsifier`` as a moonprune masker.

The point is to show MOON on a sparse method moonprune did not write. The adapter:

- asks ``torch.ao.pruning.WeightNormSparsifier`` (``sparse_block_shape=(1, 1)``,
  one zero per block: unstructured, by weight norm) for each layer's mask, at the
  layer sparsity moonprune's ERK/uniform distribution gives;
- runs it on 2-D ``(out, in * kh * kw)`` copies of the weights, because the
  sparsifier's mask code only handles 2-D (linear) weights and fails on conv
  kernels; the mask is reshaped back;
- calls it once, at ``prepare``, then ``squash_mask()`` removes its
  parametrizations. The topology stays fixed afterwards (as in one-shot pruning),
  so masks are frozen before averaging and the weights stay plain tensors with
  exact zeros, as MOON's averaging and the exporter require.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moonprune.sparsity.base import Masker


class TorchAOMasker(Masker):
    """One-shot masks from ``torch.ao.pruning.WeightNormSparsifier``."""

    name = "torch-ao"
    description = "torch.ao.pruning.WeightNormSparsifier (unstructured, one-shot), via an adapter"

    def initial_masks(self) -> dict[str, torch.Tensor]:
        from torch.ao.pruning import WeightNormSparsifier

        counts = self.target_counts()
        names = list(self.params)
        flat = nn.ModuleList()
        groups = []
        for i, name in enumerate(names):
            weight = self.params[name].detach()
            layer = nn.Linear(weight[0].numel(), weight.shape[0], bias=False)
            layer.weight.data = weight.reshape(weight.shape[0], -1).clone().cpu()
            flat.append(layer)
            level = 1.0 - counts[name] / weight.numel()
            groups.append({"tensor_fqn": f"{i}.weight", "sparsity_level": level})
        sparsifier = WeightNormSparsifier(sparse_block_shape=(1, 1), zeros_per_block=1)
        sparsifier.prepare(flat, groups)
        sparsifier.step()
        masks = {}
        for i, name in enumerate(names):
            parametrized: Any = flat[i]  # the sparsifier added .parametrizations
            mask = parametrized.parametrizations.weight[0].mask
            masks[name] = mask.bool().reshape(self.params[name].shape).to(self.params[name].device)
        sparsifier.squash_mask()
        return masks
