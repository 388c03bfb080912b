"""What the training loop reports and returns: per-step and per-epoch records, the
result, the rollbacks of the divergence guard, and the callback protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class StepInfo:
    """What the loop reports after each optimizer step."""

    epoch: int
    step: int
    steps_per_epoch: int
    loss: float
    lr: float
    a: float | None
    density: float
    rows: int = 0  # training rows in this step (this process's share)


@dataclass(frozen=True)
class EpochInfo:
    """What the loop reports after each epoch (also kept in ``TrainResult.history``)."""

    epoch: int
    loss: float
    lr: float
    a: float | None
    density: float
    seconds: float
    averaged: bool
    masker: dict[str, float] = field(default_factory=dict)
    #: share of the epoch's ID training rows whose argmax was "unknown" (K+1 head only)
    unknown_rate: float | None = None


class TrainCallback(Protocol):
    def on_step(self, info: StepInfo) -> None: ...
    def on_epoch_end(self, info: EpochInfo) -> None: ...


@dataclass
class TrainResult:
    """The output network (the average with MOON), its masks, and the history."""

    model: nn.Module
    masks: dict[str, torch.Tensor]
    history: list[EpochInfo]
    rollbacks: list[Rollback] = field(default_factory=list)


class StopTraining(Exception):
    """Raised by a callback (or ``stop_after_epoch``) to interrupt after a saved epoch."""


class _Diverged(Exception):
    """An epoch's loss went non-finite or far above the first epoch's (see ``run``)."""


@dataclass(frozen=True)
class Rollback:
    """One undone epoch: what went wrong, and the lr scale before and after."""

    epoch: int
    loss: float
    reason: str
    lr_scale_before: float
    lr_scale_after: float
