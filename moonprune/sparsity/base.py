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
averaging, export) carry only plain weights with exact zeros.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from moonprune.errors import ConfigError


@dataclass(frozen=True)
class TopologySchedule:
    """When a masker may change its masks, in optimizer steps.

    ``end_step`` is the first step at which the topology is frozen: the trainer sets
    it to ``min(update_end * total_steps, first averaging step)`` so that weight
    averaging always sees a fixed set of zeros.
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

    ``update_interval`` and ``drop_fraction`` are ``None`` for the method's default
    (RigL: every ``min(100, end_step // 10)`` steps, r = 0.3; SET: every epoch, r = 0.5).
    """

    sparsity: float = 0.9
    distribution: str = "erk"
    update_interval: int | None = None
    drop_fraction: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.sparsity < 1.0:
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


class Masker(abc.ABC):
    """Base class of every sparse-training method.

    Subclasses set ``name`` and ``description`` (one line, shown by the registry) and
    implement :meth:`_initial_masks` and, if the topology changes, :meth:`_update`.
    """

    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, config: MaskerConfig) -> None:
        self.config = config
        self.masks: dict[str, torch.Tensor] = {}
        self.step_count = 0
        self._params: dict[str, nn.Parameter] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._schedule: TopologySchedule | None = None

    # -- lifecycle -------------------------------------------------------------------
    @abc.abstractmethod
    def prepare(
        self,
        model: nn.Module,
        schedule: TopologySchedule,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """Attach to ``model``: compute the initial masks and zero the pruned weights."""

    @abc.abstractmethod
    def step(self) -> None:
        """Called after every ``optimizer.step()``: maybe update masks, then apply them."""

    @abc.abstractmethod
    def finalize(self) -> dict[str, torch.Tensor]:
        """Apply the masks one last time, detach, and return them (name -> bool tensor)."""

    # -- introspection ---------------------------------------------------------------
    @abc.abstractmethod
    def stats(self) -> dict[str, float]:
        """Numbers worth logging now: at least ``density`` (global, measured)."""

    # -- resume ----------------------------------------------------------------------
    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: masks, step count, RNG state, ..."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` after :meth:`prepare` on the same model."""
