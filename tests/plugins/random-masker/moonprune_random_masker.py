"""A third-party masker: random masks at the layer densities, fixed while training."""

from __future__ import annotations

from typing import Any

import torch

from moonprune.sparsity import Masker
from moonprune.sparsity.base import top_k_mask


class RandomMasker(Masker):
    """Keeps a random subset of each layer's weights (a baseline, not a method)."""

    name = "random"
    description = "random masks at the ERK/uniform layer densities (third-party example)"

    def initial_masks(self) -> dict[str, torch.Tensor]:
        self._generator = torch.Generator().manual_seed(self.config.seed)
        counts = self.target_counts()
        return {
            n: top_k_mask(torch.rand(p.shape, generator=self._generator).to(p.device), counts[n])
            for n, p in self.params.items()
        }

    def extra_state(self) -> dict[str, Any]:
        return {"rng": self._generator.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["rng"])
