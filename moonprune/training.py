"""The sparse fine-tuning loop: masker + MOON objective + weight averaging, resumable.

Each epoch runs as :mod:`moonprune.epoch_loop` shows (the per-batch steps, then the
ramp, BatchNorm recalibration of the average and the epoch's record); after it, when
a state path is given, an atomic training-state file holding the
model, optimiser, masker, schedule and averaging state
(:mod:`moonprune.training_state`), so an interrupted run resumes to bit-identical
final weights. Shuffling and dropout are seeded per epoch (``seed``, ``epoch``), so a
resumed run sees the same batches. A diverged epoch is rolled back
(:mod:`moonprune.divergence`); the lr follows :mod:`moonprune.lr_schedule`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from moonprune.averaging import WeightAveraging
from moonprune.batching import batch_starts as batch_starts
from moonprune.batching import check_batch_size as check_batch_size
from moonprune.batching import iterate_batches as iterate_batches
from moonprune.batching import min_rows_per_batch as min_rows_per_batch
from moonprune.config import MoonConfig, TrainConfig
from moonprune.data import ImageSet
from moonprune.distributed import DistContext
from moonprune.divergence import DivergenceGuard
from moonprune.epoch_loop import UNKNOWN_RATE_WARNING as UNKNOWN_RATE_WARNING
from moonprune.epoch_loop import EpochLoop
from moonprune.errors import ConfigError
from moonprune.lr_schedule import lr_factor as lr_factor
from moonprune.objectives import MoonSchedule, MoonScheduleConfig
from moonprune.outputs import atomic_path
from moonprune.sparsity.base import Masker, TopologySchedule
from moonprune.train_records import EpochInfo as EpochInfo
from moonprune.train_records import Rollback as Rollback
from moonprune.train_records import StepInfo as StepInfo
from moonprune.train_records import StopTraining as StopTraining
from moonprune.train_records import TrainCallback as TrainCallback
from moonprune.train_records import TrainResult as TrainResult
from moonprune.train_records import _Diverged
from moonprune.training_state import STATE_VERSION as STATE_VERSION
from moonprune.unknowns import UNKNOWNS

logger = logging.getLogger(__name__)


class Trainer(EpochLoop, DivergenceGuard):
    """Runs sparse fine-tuning of ``model`` (already K+1 when MOON is on) on ``train``.

    Example::

        >>> import moonprune
        >>> splits = moonprune.load_splits("digits:0-2")
        >>> model = moonprune.models.demo_cnn(num_classes=3, width=4)
        >>> _ = moonprune.add_unknown_output_(model, splits.train.x[:2])
        >>> masker = moonprune.MASKERS.create("rigl", moonprune.MaskerConfig(sparsity=0.8))
        >>> trainer = moonprune.Trainer(
        ...     model, masker, splits.train, moonprune.TrainConfig(epochs=2),
        ...     moonprune.MoonConfig(warmup_epochs=1, average_epochs=1))
        >>> result = trainer.run()
        >>> round(result.history[-1].density, 2)
        0.2
    """

    def __init__(
        self,
        model: nn.Module,
        masker: Masker,
        train: ImageSet,
        train_config: TrainConfig,
        moon_config: MoonConfig,
        *,
        state_path: Path | None = None,
        callback: TrainCallback | None = None,
        dist: DistContext | None = None,
    ) -> None:
        self.dist = dist or DistContext()
        self.model = model
        self.forward: nn.Module = model
        self.device = next(model.parameters()).device
        if self.dist.enabled:
            self.dist.init_group(self.device)
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(model)
        self.masker = masker
        self.data = train
        self.cfg = train_config
        self.moon_cfg = moon_config
        self.state_path = state_path
        self.callback = callback
        self.min_last = check_batch_size(model, train_config.batch_size, self.dist.world_size)
        self.steps_per_epoch = len(batch_starts(len(train), train_config.batch_size, self.min_last))
        self.total_steps = self.steps_per_epoch * train_config.epochs
        avg_epochs = moon_config.resolved_average_epochs(train_config.epochs)
        self.main_epochs = train_config.epochs - avg_epochs
        self.averaging = (
            WeightAveraging(self.main_epochs, moon_config.average_fraction) if avg_epochs else None
        )
        self.schedule = (
            MoonSchedule(
                MoonScheduleConfig(
                    train_config.epochs,
                    moon_config.warmup_epochs,
                    moon_config.init_factor,
                    moon_config.a_final,
                ),
                all_reduce_sum=self.dist.all_reduce_sum if self.dist.enabled else None,
            )
            if moon_config.enabled
            else None
        )
        if self.schedule is not None and moon_config.warmup_epochs >= train_config.epochs:
            logger.warning(
                "warm-up (%d epochs) covers the whole run (%d epochs): the MOON loss never "
                "starts; training is plain cross-entropy on the K+1 head",
                moon_config.warmup_epochs,
                train_config.epochs,
            )
        self.optimizer = torch.optim.SGD(
            model.parameters(),
            lr=train_config.lr,
            momentum=train_config.momentum,
            nesterov=train_config.nesterov and train_config.momentum > 0,
            weight_decay=train_config.weight_decay,
        )
        end_step = min(
            int(train_config.update_end * self.total_steps), self.main_epochs * self.steps_per_epoch
        )
        self.masker.prepare(
            model,
            TopologySchedule(self.total_steps, end_step, self.steps_per_epoch),
            self.optimizer,
        )
        self.start_epoch = 0
        self.history: list[EpochInfo] = []
        self.lr_scale = 1.0  # halved by each rollback of a diverged epoch
        self.rollbacks: list[Rollback] = []
        self._outputs = 2  # the model's output width, read from the first batch
        # synthesized unknowns (moonprune.unknowns): only with the K+1 head
        self.unknowns = UNKNOWNS.resolve(moon_config.unknowns) if moon_config.enabled else ()

    def run(self, stop_after_epoch: int | None = None) -> TrainResult:
        """Train from ``start_epoch`` to the end; ``stop_after_epoch`` interrupts (tests).

        A diverged epoch (non-finite loss, or an epoch loss above ``divergence_factor``
        times the first epoch's) is rolled back to the last good epoch's state and rerun
        at half the lr, at most ``max_rollbacks`` times; then a ConfigError says which lr
        to try. The last good state is kept in memory (one copy of the training state).
        """
        good = copy.deepcopy(self.state_dict())
        epoch = self.start_epoch
        while epoch < self.cfg.epochs:
            try:
                self._run_epoch(epoch)
                self._check_divergence(epoch)
            except _Diverged as exc:
                self._roll_back(good, epoch, str(exc))
                continue
            self.start_epoch = epoch + 1
            good = copy.deepcopy(self.state_dict())
            if self.state_path is not None and self.dist.is_main:
                with atomic_path(self.state_path) as tmp:
                    torch.save(good, tmp)
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                self.dist.barrier()  # no rank leaves before the state file is written
                raise StopTraining(f"stopped after epoch {epoch}")
            epoch += 1
        masks = self.masker.finalize()
        final = self.model
        if self.averaging is not None and self.averaging.result() is not None:
            final = self.averaging.result()  # type: ignore[assignment]
        else:
            self.recompute_batchnorm()
        final.eval()
        return TrainResult(final, masks, self.history, list(self.rollbacks))


def train(
    model: nn.Module,
    masker: Masker,
    train_set: ImageSet,
    train_config: TrainConfig,
    moon_config: MoonConfig,
    *,
    state_path: Path | None = None,
    resume: bool = False,
    callback: TrainCallback | None = None,
    dist: DistContext | None = None,
) -> TrainResult:
    """One-call training: build a :class:`Trainer`, resume if asked, run to the end.

    Example::

        >>> import moonprune
        >>> splits = moonprune.load_splits("digits:0-2")
        >>> model = moonprune.models.demo_cnn(num_classes=3, width=4)
        >>> masker = moonprune.MASKERS.create("magnitude", moonprune.MaskerConfig(sparsity=0.5))
        >>> result = moonprune.train(model, masker, splits.train, moonprune.TrainConfig(epochs=1),
        ...                          moonprune.MoonConfig(enabled=False))
        >>> len(result.history)
        1
    """
    trainer = Trainer(
        model,
        masker,
        train_set,
        train_config,
        moon_config,
        state_path=state_path,
        callback=callback,
        dist=dist,
    )
    if resume:
        if state_path is None or not state_path.is_file():
            raise ConfigError(
                f"--resume was given but there is no training state at {state_path}; "
                "run without --resume to start afresh"
            )
        trainer.load_state(state_path)
    return trainer.run()
