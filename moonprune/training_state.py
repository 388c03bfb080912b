"""The trainer's state: its attributes, and what of them survives a resume.

:class:`TrainerState` declares what a :class:`~moonprune.training.Trainer` sets up
(the parts of the trainer, :mod:`moonprune.epoch_loop` and :mod:`moonprune.divergence`,
read them) and saves and restores the training-state file: model, optimiser, masker,
schedule, averaging, history and rollbacks, with a fingerprint of the settings so a
resume with other settings is refused.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moonprune.averaging import WeightAveraging
from moonprune.config import MoonConfig, TrainConfig
from moonprune.data import ImageSet
from moonprune.distributed import DistContext
from moonprune.errors import CheckpointError, ConfigError
from moonprune.objectives import MoonSchedule
from moonprune.sparsity.base import Masker
from moonprune.train_records import EpochInfo, Rollback, TrainCallback

STATE_VERSION = 1


class TrainerState:
    """The trainer's attributes (set by :class:`~moonprune.training.Trainer`) and the
    save/load of those a resumed run needs."""

    dist: DistContext
    model: nn.Module
    #: the model, or its DistributedDataParallel wrapper under ``torchrun``
    forward: nn.Module
    device: torch.device
    masker: Masker
    data: ImageSet
    cfg: TrainConfig
    moon_cfg: MoonConfig
    state_path: Path | None
    callback: TrainCallback | None
    min_last: int
    steps_per_epoch: int
    total_steps: int
    main_epochs: int
    averaging: WeightAveraging | None
    schedule: MoonSchedule | None
    optimizer: torch.optim.SGD
    start_epoch: int
    history: list[EpochInfo]
    #: halved by each rollback of a diverged epoch
    lr_scale: float
    rollbacks: list[Rollback]
    #: the model's output width, read from the first batch
    _outputs: int
    #: the generators of synthesized unknowns (:mod:`moonprune.unknowns`)
    unknowns: tuple[str, ...]

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "fingerprint": self._fingerprint(),
            "epoch": self.start_epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "masker": self.masker.state_dict(),
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
            "averaging": None if self.averaging is None else self.averaging.state_dict(),
            "history": [vars(h) for h in self.history],
            "lr_scale": self.lr_scale,
            "rollbacks": [vars(r) for r in self.rollbacks],
        }

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "train": vars(self.cfg),
            "moon": vars(self.moon_cfg),
            "masker": type(self.masker).__name__,
            "n_train": len(self.data),
            # the batches per epoch: also depend on the process count for BatchNorm nets
            "steps_per_epoch": self.steps_per_epoch,
        }

    def load_state(self, path: Path) -> None:
        """Continue from a training-state file written by an earlier, interrupted run."""
        damaged = (
            f"the training state {str(path)!r} is damaged or not moonprune's (it may hold "
            "pickled code, which is never loaded); run without --resume to start afresh"
        )
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
            raise CheckpointError(damaged) from None
        if not isinstance(state, dict):
            raise CheckpointError(damaged)
        if state.get("fingerprint") != self._fingerprint():
            raise ConfigError(
                f"the training state in {str(path)!r} was written with other settings; "
                "resume with the same command and options, or start afresh without --resume"
            )
        try:
            self._load(state)
        except (KeyError, TypeError, ValueError, RuntimeError):
            raise CheckpointError(damaged) from None

    def _load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.masker.load_state_dict(state["masker"])
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])
        if self.averaging is not None:
            self.averaging.load_state_dict(state["averaging"], copy.deepcopy(self.model))
        self.history = [EpochInfo(**h) for h in state["history"]]
        self.start_epoch = int(state["epoch"])
        self.lr_scale = float(state["lr_scale"])
        self.rollbacks = [Rollback(**r) for r in state["rollbacks"]]
