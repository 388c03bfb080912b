"""The built-in sparse methods: one-shot and gradual magnitude pruning, SET and RigL.

Masks always start from the dense weights' magnitudes (moonprune fine-tunes a
pretrained model), except GMP, which starts dense and prunes on a cubic schedule.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import torch

from moonprune.sparsity.base import Masker, top_k_mask


class MagnitudeMasker(Masker):
    """One-shot magnitude pruning: keep the largest weights per layer, then fixed."""

    name = "magnitude"
    description = "one-shot magnitude pruning at the start, masks fixed while fine-tuning"

    def initial_masks(self) -> dict[str, torch.Tensor]:
        return self.magnitude_masks(self.target_counts())


class GradualMagnitudeMasker(Masker):
    """Gradual magnitude pruning (Zhu & Gupta 2017), cubic schedule.

    Sparsity at step ``t`` of the window ``[0, end_step]``:
    ``s_t = s_f * (1 - (1 - t / end_step) ** 3)`` (``s_i = 0``), applied per layer as
    the same fraction of that layer's final sparsity (ERK or uniform), pruning the
    smallest-magnitude weights among those still kept; a pruned weight stays pruned.
    Updates every ``update_interval`` steps (default ``max(1, end_step // 20)``, about
    20 pruning steps) and once more at ``end_step``, where the target is reached.
    """

    name = "gmp"
    description = "gradual magnitude pruning from dense, cubic schedule (Zhu & Gupta 2017)"

    def initial_masks(self) -> dict[str, torch.Tensor]:
        self._final = self.target_counts()
        if self.schedule.end_step == 0:
            return self.magnitude_masks(self._final)
        return {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}

    @property
    def interval(self) -> int:
        return self.config.update_interval or max(1, self.schedule.end_step // 20)

    def fraction(self, step: int) -> float:
        """Share of the final sparsity reached at ``step``: ``1 - (1 - t/T)^3``."""
        t = min(step, self.schedule.end_step) / max(self.schedule.end_step, 1)
        return 1.0 - (1.0 - t) ** 3

    def update_due(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.schedule.end_step - 1

    def update(self) -> None:
        step = (
            self.step_count + 1
            if self.step_count == self.schedule.end_step - 1
            else self.step_count
        )
        frac = self.fraction(step)
        for name, param in self.params.items():
            n = param.numel()
            keep = round(n - frac * (n - self._final[name]))
            keep = max(self._final[name], min(keep, int(self.masks[name].sum())))
            scores = param.detach().abs().masked_fill(~self.masks[name], -1.0)
            self.masks[name] = top_k_mask(scores, keep)

    def extra_state(self) -> dict[str, Any]:
        return {"final": dict(self._final)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._final = {n: int(v) for n, v in state["final"].items()}


class DynamicMasker(Masker):
    """Drop-and-grow at constant density (shared by SET and RigL).

    At each update, per layer: drop the ``k = floor(r_t * active)`` active weights of
    smallest magnitude, then grow ``k`` weights among those not kept (a weight dropped
    in this update may be regrown, as in RigL) by :meth:`grow_scores`; grown weights
    start at exactly 0. ``r_t = r_0 / 2 * (1 + cos(pi * t / end_step))`` decays to 0
    over the update window (the real window, unlike the reference's horizon bug).
    """

    default_drop_fraction = 0.3

    def initial_masks(self) -> dict[str, torch.Tensor]:
        self._last_drop_fraction = self.drop_fraction(0)
        return self.magnitude_masks(self.target_counts())

    @property
    @abc.abstractmethod
    def interval(self) -> int:
        """Steps between topology updates."""

    def drop_fraction(self, step: int) -> float:
        r0 = self.config.drop_fraction or self.default_drop_fraction
        end = max(self.schedule.end_step, 1)
        return r0 / 2 * (1 + math.cos(math.pi * min(step, end) / end))

    def update_due(self, step: int) -> bool:
        return step % self.interval == 0

    @abc.abstractmethod
    def grow_scores(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """Higher = grow first; only entries outside the kept set are considered."""

    def update(self) -> None:
        r = self.drop_fraction(self.step_count)
        self._last_drop_fraction = r
        with torch.no_grad():
            for name, param in self.params.items():
                mask = self.masks[name]
                active = int(mask.sum())
                k = math.floor(r * active)
                if k == 0:
                    continue
                magnitude = param.detach().abs().masked_fill(~mask, math.inf)
                drop = top_k_mask(-magnitude, k)
                kept = mask & ~drop
                scores = self.grow_scores(name, param).masked_fill(kept, -math.inf)
                grow = top_k_mask(scores, k)
                param[grow] = 0.0
                self.masks[name] = kept | grow

    def stats(self) -> dict[str, float]:
        return {**super().stats(), "drop_fraction": self._last_drop_fraction}

    def extra_state(self) -> dict[str, Any]:
        return {"drop_fraction": self._last_drop_fraction}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._last_drop_fraction = float(state["drop_fraction"])


class SETMasker(DynamicMasker):
    """SET (Mocanu et al. 2018): drop smallest magnitudes, grow at random.

    Reference settings: ``r_0 = 0.5`` with cosine decay, one update per epoch.
    """

    name = "set"
    description = "SET: drop smallest weights, regrow at random (once per epoch, r=0.5)"
    default_drop_fraction = 0.5

    def initial_masks(self) -> dict[str, torch.Tensor]:
        self._generator = torch.Generator().manual_seed(self.config.seed)
        return super().initial_masks()

    @property
    def interval(self) -> int:
        return self.config.update_interval or self.schedule.steps_per_epoch

    def grow_scores(self, name: str, param: torch.Tensor) -> torch.Tensor:
        del name
        return torch.rand(param.shape, generator=self._generator).to(param.device)

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "rng": self._generator.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self._generator.set_state(state["rng"])


class RigLMasker(DynamicMasker):
    """RigL (Evci et al. 2020): drop smallest magnitudes, grow where |dense grad| is largest.

    The gradient is ``param.grad`` from the last backward pass: masks are applied to
    the weights after each optimizer step (not as a parametrization), so that
    gradient is the dense one, including at pruned positions. Reference settings:
    ``r_0 = 0.3`` with cosine decay, every 100 steps. Default interval
    ``min(100, max(1, end_step // 10))``: a short fine-tuning run would otherwise see
    only one or two updates.
    """

    name = "rigl"
    description = "RigL: drop smallest weights, regrow where the dense gradient is largest"
    default_drop_fraction = 0.3

    @property
    def interval(self) -> int:
        return self.config.update_interval or min(100, max(1, self.schedule.end_step // 10))

    def grow_scores(self, name: str, param: torch.Tensor) -> torch.Tensor:
        if param.grad is None:
            raise RuntimeError(
                f"RigL needs the dense gradient of {name!r}; call masker.step() after "
                "loss.backward() and optimizer.step(), before zero_grad()"
            )
        return param.grad.detach().abs()
