"""The masker lifecycle: one small base class for every sparse-training method.

A masker owns one boolean mask per prunable weight (conv and linear, see
:func:`moonprune.conventions.prunable_weights`). The training loop drives it::

    masker.prepare(model, TopologySchedule(total_steps, end_step, steps_per_epoch), optimizer)
    for each batch:
        loss.backward()          # weight.grad is the *dense* gradient: masks are applied to the
        optimizer.step()         # weights, not as a parametrization, so backward sees every entry
        masker.step()            # maybe update the topology, then zero the pruned weights
    masks = masker.finalize()    # bake the masks into the weights, detach from the model

Masks live in the masker (not in the model), so copies of the model (weight
averaging, export) carry only plain weights with exact zeros. When an optimizer is
given, its per-weight state (momentum, Adam moments) is zeroed where the mask is
off, so a weight that is grown later starts from zero momentum.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from moonprune.conventions import prunable_weights
from moonprune.errors import ConfigError
from moonprune.sparsity.distributions import keep_counts, layer_densities


@dataclass(frozen=True)
class TopologySchedule:
    """When a masker may change its masks, in optimizer steps.

    ``end_step`` is the first step at which the topology is frozen: the trainer sets
    it to ``min(update_end * total_steps, first averaging step)`` so that weight
    averaging always sees a fixed set of zeros.

    Example::

        >>> TopologySchedule(total_steps=100, end_step=75, steps_per_epoch=10).end_step
        75
    """

    total_steps: int
    end_step: int
    steps_per_epoch: int

    def __post_init__(self) -> None:
        if self.total_steps < 1 or self.steps_per_epoch < 1:
            raise ConfigError(
                f"a training run needs at least one step (total_steps={self.total_steps}, "
                f"steps_per_epoch={self.steps_per_epoch}); use more data or a smaller batch"
            )
        if not 0 <= self.end_step <= self.total_steps:
            raise ConfigError(
                f"end_step={self.end_step} must lie in [0, total_steps={self.total_steps}]"
            )


@dataclass(frozen=True)
class MaskerConfig:
    """Settings shared by all maskers; a method ignores what it does not use.

    ``update_interval`` and ``drop_fraction`` are ``None`` for the method's default.

    Example::

        >>> MaskerConfig(sparsity=0.9).density
        0.09999...
    """

    sparsity: float = 0.9
    distribution: str = "erk"
    update_interval: int | None = None
    drop_fraction: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.sparsity, float | int) and 0.0 < self.sparsity < 1.0):
            raise ConfigError(
                f"sparsity must be in (0, 1), got {self.sparsity}; e.g. --sparsity 0.9 "
                "keeps 10% of the weights"
            )
        if self.distribution not in ("erk", "uniform"):
            raise ConfigError(
                f"unknown layer-density distribution {self.distribution!r}; use 'erk' or 'uniform'"
            )
        if self.update_interval is not None and self.update_interval < 1:
            raise ConfigError(f"update_interval must be >= 1 step, got {self.update_interval}")
        if self.drop_fraction is not None and not 0.0 < self.drop_fraction < 1.0:
            raise ConfigError(f"drop_fraction must be in (0, 1), got {self.drop_fraction}")

    @property
    def density(self) -> float:
        """Global fraction of prunable weights kept: ``1 - sparsity``."""
        return 1.0 - self.sparsity


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``scores`` (ties broken by index)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.flatten(), k, sorted=False).indices] = True
    return mask.view_as(scores)


class Masker(abc.ABC):
    """Base class of every sparse-training method.

    Subclasses set ``name`` and ``description`` (one line, shown by the registry),
    implement :meth:`initial_masks`, and, when the topology changes during training,
    :meth:`update_due` and :meth:`update`.

    Example::

        >>> import torch
        >>> from moonprune import MASKERS, MaskerConfig, TopologySchedule
        >>> model = torch.nn.Sequential(torch.nn.Linear(20, 20), torch.nn.Linear(20, 4))
        >>> masker = MASKERS.create("magnitude", MaskerConfig(sparsity=0.5, distribution="uniform"))
        >>> masker.prepare(model, TopologySchedule(total_steps=10, end_step=7, steps_per_epoch=5))
        >>> masker.stats()["density"]
        0.5
        >>> int((model[0].weight == 0).sum())
        200
    """

    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, config: MaskerConfig) -> None:
        self.config = config
        self.masks: dict[str, torch.Tensor] = {}
        self.step_count = 0
        self.updates = 0
        self._params: dict[str, torch.Tensor] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._schedule: TopologySchedule | None = None

    # -- what subclasses provide --------------------------------------------------
    @abc.abstractmethod
    def initial_masks(self) -> dict[str, torch.Tensor]:
        """Masks at the start of training, from the dense weights."""

    def update_due(self, step: int) -> bool:
        """Whether the topology changes after optimizer step ``step`` (1-based)."""
        del step
        return False

    def update(self) -> None:
        """Change ``self.masks`` (called when :meth:`update_due`)."""
        raise NotImplementedError(f"{type(self).__name__} has a fixed topology")

    def extra_state(self) -> dict[str, Any]:
        """Method-specific state to save (e.g. an RNG)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""
        del state

    # -- lifecycle ----------------------------------------------------------------
    @property
    def schedule(self) -> TopologySchedule:
        if self._schedule is None:
            raise RuntimeError(f"{type(self).__name__}.prepare(model, ...) was not called")
        return self._schedule

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """The masked weights by parameter name."""
        return self._params

    def target_counts(self) -> dict[str, int]:
        """Kept weights per layer at the target density (ERK or uniform)."""
        shapes = {n: p.shape for n, p in self._params.items()}
        densities = layer_densities(shapes, self.config.density, self.config.distribution)
        return keep_counts(shapes, densities, self.config.density)

    def magnitude_masks(self, counts: dict[str, int]) -> dict[str, torch.Tensor]:
        """Per layer, keep the ``counts[name]`` weights of largest magnitude."""
        return {n: top_k_mask(p.detach().abs(), counts[n]) for n, p in self._params.items()}

    def prepare(
        self,
        model: torch.nn.Module,
        schedule: TopologySchedule,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """Attach to ``model``: compute the initial masks and zero the pruned weights."""
        self._params = dict(prunable_weights(model))
        if not self._params:
            raise ConfigError("the model has no conv or linear layer to prune")
        self._schedule = schedule
        self._optimizer = optimizer
        self.step_count = 0
        self.updates = 0
        self.masks = self.initial_masks()
        self.apply_masks_()

    def step(self) -> None:
        """Called after every ``optimizer.step()``: maybe update masks, then apply them."""
        self.step_count += 1
        if self.step_count < self.schedule.end_step and self.update_due(self.step_count):
            self.update()
            self.updates += 1
        self.apply_masks_()

    def apply_masks_(self) -> None:
        """Zero pruned weights (and their optimizer state)."""
        with torch.no_grad():
            for name, param in self._params.items():
                mask = self.masks[name]
                param.mul_(mask)
                if self._optimizer is not None:
                    for value in self._optimizer.state.get(param, {}).values():
                        if isinstance(value, torch.Tensor) and value.shape == param.shape:
                            value.mul_(mask)

    def finalize(self) -> dict[str, torch.Tensor]:
        """Apply the masks one last time, detach, and return them (name -> bool tensor)."""
        self.apply_masks_()
        masks = {n: m.detach().cpu().clone() for n, m in self.masks.items()}
        self._optimizer = None
        return masks

    # -- introspection ------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """``density`` (kept / total over masked weights) and ``updates`` so far."""
        kept = sum(int(m.sum()) for m in self.masks.values())
        total = sum(m.numel() for m in self.masks.values())
        return {"density": kept / total if total else 1.0, "updates": float(self.updates)}

    # -- resume -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: masks, counters, method state."""
        return {
            "masks": {n: m.detach().cpu().clone() for n, m in self.masks.items()},
            "step_count": self.step_count,
            "updates": self.updates,
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` after :meth:`prepare` on the same model."""
        if set(state["masks"]) != set(self._params):
            raise ConfigError("masker state does not match the model's prunable layers")
        self.masks = {n: m.to(self._params[n].device).bool() for n, m in state["masks"].items()}
        self.step_count = int(state["step_count"])
        self.updates = int(state["updates"])
        self.load_extra_state(state["extra"])
        self.apply_masks_()
