"""The built-in sparse methods: one-shot and gradual magnitude pruning, SET and RigL.

Masks start from the dense weights' magnitudes (moonprune fine-tunes a pretrained
model), except GMP, which starts dense and prunes on a cubic schedule. Per-layer
targets come from the ERK or uniform distribution (:mod:`.distributions`).

Defaults (``MaskerConfig.update_interval`` / ``drop_fraction`` left ``None``):

========  ===================================  ===============
method    steps between updates                ``r_0``
========  ===================================  ===============
gmp       ``max(1, end_step // 20)``            --
set       ``steps_per_epoch`` (epoch end)       0.5
rigl      ``min(100, max(1, end_step // 10))``  0.3
========  ===================================  ===============
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

import torch

from moonprune.sparsity.base import Masker, MaskerConfig
from moonprune.sparsity.budget import top_k_mask


class MagnitudeMasker(Masker):
    """One-shot magnitude pruning: keep each layer's largest ``|w|``, then fixed."""

    name = "magnitude"
    description = "one-shot magnitude pruning at the start, masks fixed while fine-tuning"

    def initial_masks(self) -> dict[str, torch.Tensor]:
        return self.magnitude_masks(self.target_counts())


class GradualMagnitudeMasker(Masker):
    """Gradual magnitude pruning (Zhu & Gupta 2017) from dense, cubic schedule.

    With ``T = end_step - 1`` (the last step at which the topology may change) the
    sparsity at step ``t`` is, from ``s_i = 0``,

        s_t = s_f + (s_i - s_f) * (1 - t / T) ** 3 = s_f * (1 - (1 - t / T) ** 3)

    applied per layer as that share of the layer's final sparsity (ERK or uniform):
    layer ``l`` with ``n_l`` weights and ``k_l`` final kept weights keeps
    ``round(n_l - f_t * (n_l - k_l))`` where ``f_t = 1 - (1 - t / T) ** 3``. Each
    pruning step removes the smallest ``|w|`` among the weights still kept, so a
    pruned weight stays pruned. Pruning happens every ``update_interval`` steps
    (default ``max(1, end_step // 20)``: about 20 pruning steps, each followed by
    some training to recover) and at ``T``, where ``f_T = 1``: the final sparsity is
    exact from step ``T`` on. With ``end_step <= 1`` there is no step to prune at,
    so the final masks are applied at ``prepare`` (one-shot).
    """

    name = "gmp"
    description = "gradual magnitude pruning from dense, cubic schedule (Zhu & Gupta 2017)"

    def __init__(self, config: MaskerConfig) -> None:
        super().__init__(config)
        self._final: dict[str, int] = {}

    @property
    def last_step(self) -> int:
        """``T``: the step at which the final sparsity is reached."""
        return self.schedule.end_step - 1

    @property
    def interval(self) -> int:
        """Steps between pruning steps."""
        return self.config.update_interval or max(1, self.schedule.end_step // 20)

    def fraction(self, step: int) -> float:
        """``f_t = 1 - (1 - t / T) ** 3``: the share of the final sparsity at ``step``."""
        if self.last_step < 1:
            return 1.0
        t = min(max(step, 0), self.last_step) / self.last_step
        return 1.0 - (1.0 - t) ** 3

    def scheduled_counts(self, step: int) -> dict[str, int]:
        """Kept weights per layer that the cubic schedule asks for at ``step``."""
        frac = self.fraction(step)
        return {
            n: round(p.numel() - frac * (p.numel() - self._final[n]))
            for n, p in self.params.items()
        }

    def initial_masks(self) -> dict[str, torch.Tensor]:
        self._final = self.target_counts()
        if self.last_step < 1:
            return self.magnitude_masks(self._final)
        return {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}

    def update_due(self, step: int) -> bool:
        return 1 <= step <= self.last_step and (step % self.interval == 0 or step == self.last_step)

    def update(self) -> None:
        for name, count in self.scheduled_counts(self.step_count).items():
            mask = self.masks[name]
            keep = max(self._final[name], min(count, int(mask.sum())))
            # pruned weights score below every kept one: once pruned, always pruned
            scores = self.params[name].detach().abs().masked_fill(~mask, -1.0)
            self.masks[name] = top_k_mask(scores, keep)

    def stats(self) -> dict[str, float]:
        """Adds ``target_density``: the global density the schedule asks for now."""
        if self._schedule is None:
            return super().stats()
        counts = self.scheduled_counts(self.step_count)
        total = sum(p.numel() for p in self.params.values())
        return {**super().stats(), "target_density": sum(counts.values()) / total}

    def extra_state(self) -> dict[str, Any]:
        return {"final": dict(self._final)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._final = {n: int(v) for n, v in state["final"].items()}


class DynamicMasker(Masker):
    """Drop-and-grow at constant density, shared by SET and RigL.

    At an update at step ``t``, per layer with ``a`` active weights that are not pinned
    (the unknown row of a K+1 head is pinned: never dropped, see :mod:`.base`):

    1. ``k = floor(r_t * a)`` with ``r_t = r_0 / 2 * (1 + cos(pi * t / end_step))``
       (cosine decay to 0 over the update window; no updates from ``end_step`` on);
    2. drop the ``k`` unpinned active weights of smallest ``|w|``;
    3. grow the ``k`` weights of highest :meth:`grow_scores` among all weights not
       kept in step 2 -- including those just dropped, as in RigL's Algorithm 1 and
       its reference code (``ArgTopK`` over ``i not in theta \\ I_drop``). A weight
       dropped and grown in the same update is simply kept, with its value.

    Newly grown weights start at exactly 0 with zero optimizer state (the base class
    zeroes everything outside the old masks before :meth:`update`). The number of
    nonzeros per layer is conserved.
    """

    default_drop_fraction: ClassVar[float]

    def initial_masks(self) -> dict[str, torch.Tensor]:
        return self.magnitude_masks(self.target_counts())

    @property
    @abc.abstractmethod
    def interval(self) -> int:
        """Steps between topology updates."""

    @property
    def initial_drop_fraction(self) -> float:
        """``r_0``: ``config.drop_fraction`` or the method's default."""
        return self.config.drop_fraction or self.default_drop_fraction

    def drop_fraction(self, step: int) -> float:
        """``r_t = r_0 / 2 * (1 + cos(pi * t / end_step))``, and 0 from ``end_step`` on."""
        end = self.schedule.end_step
        if step >= end:
            return 0.0
        return self.initial_drop_fraction / 2 * (1 + math.cos(math.pi * max(step, 0) / end))

    def update_due(self, step: int) -> bool:
        return step % self.interval == 0

    @abc.abstractmethod
    def grow_scores(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """Scores with ``param``'s shape: higher = grown first."""

    def update(self) -> None:
        r = self.drop_fraction(self.step_count)
        for name, param in self.params.items():
            mask = self.masks[name]
            pinned = self.pinned(name)
            k = math.floor(r * int((mask & ~pinned).sum()))
            if k == 0:
                continue
            magnitude = param.detach().abs().masked_fill(~mask | pinned, math.inf)
            kept = mask & ~top_k_mask(-magnitude, k)
            scores = self.grow_scores(name, param).masked_fill(kept, -math.inf)
            self.masks[name] = kept | top_k_mask(scores, k)

    def stats(self) -> dict[str, float]:
        """Adds ``drop_fraction``: ``r_t`` at the current step (0 once frozen)."""
        if self._schedule is None:
            return super().stats()
        return {**super().stats(), "drop_fraction": self.drop_fraction(self.step_count)}


class SETMasker(DynamicMasker):
    """SET (Mocanu et al. 2018): drop the smallest ``|w|``, grow at random.

    Growth draws uniform scores from a ``torch.Generator`` seeded with
    ``config.seed`` (on the CPU, so the result does not depend on the device); its
    state is part of :meth:`state_dict`. Reference settings: ``r_0 = 0.5`` with cosine
    decay, one update per epoch (default interval ``steps_per_epoch``).
    """

    name = "set"
    description = "SET: drop smallest weights, regrow at random (once per epoch, r=0.5)"
    default_drop_fraction = 0.5

    def __init__(self, config: MaskerConfig) -> None:
        super().__init__(config)
        self._generator = torch.Generator()

    def initial_masks(self) -> dict[str, torch.Tensor]:
        self._generator.manual_seed(self.config.seed)
        return super().initial_masks()

    @property
    def interval(self) -> int:
        return self.config.update_interval or self.schedule.steps_per_epoch

    def grow_scores(self, name: str, param: torch.Tensor) -> torch.Tensor:
        del name
        return torch.rand(param.shape, generator=self._generator).to(param.device)

    def extra_state(self) -> dict[str, Any]:
        return {"rng": self._generator.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["rng"])


class RigLMasker(DynamicMasker):
    """RigL (Evci et al. 2020): drop the smallest ``|w|``, grow where ``|dL/dw|`` is largest.

    The gradient is ``param.grad`` from the last backward pass. Masks are applied to
    the weights after each optimizer step (not as a parametrization), so that
    gradient is the dense one, nonzero at pruned positions too; ``masker.step()``
    must run before the next ``zero_grad()``.

    Reference settings: ``r_0 = 0.3`` with cosine decay, an update every 80-100 steps
    over long runs. Default interval ``min(100, max(1, end_step // 10))``: at least
    about 10 updates, since a short fine-tuning run with a fixed 100-step interval
    would see only one or two, or none.
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
                f"RigL needs the dense gradient of {name!r} but its .grad is None; call "
                "masker.step() after loss.backward() and optimizer.step(), before zero_grad()"
            )
        return param.grad.detach().abs()
