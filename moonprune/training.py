"""The sparse fine-tuning loop: masker + MOON objective + weight averaging, resumable.

One epoch, per batch::

    logits = model(x); loss = schedule.loss(...) or cross_entropy(...)
    loss.backward(); optimizer.step(); masker.step()   # .grad is the dense gradient
    averaging.maybe_update(...)                         # last epochs only

and at the epoch's end: ``schedule.end_epoch``, BatchNorm recalibration of the
average, and (when a state path is given) an atomic training-state file holding the
model, optimiser, masker, schedule and averaging state, so an interrupted run
resumes to bit-identical final weights. Shuffling and dropout are seeded per epoch
(``seed``, ``epoch``), so a resumed run sees the same batches.
"""

from __future__ import annotations

import copy
import logging
import math
import pickle
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moonprune.augment import augment_batch
from moonprune.averaging import WeightAveraging
from moonprune.batching import batch_starts as batch_starts
from moonprune.batching import check_batch_size as check_batch_size
from moonprune.batching import index_batches, read_batches
from moonprune.batching import iterate_batches as iterate_batches
from moonprune.batching import min_rows_per_batch as min_rows_per_batch
from moonprune.config import MoonConfig, TrainConfig
from moonprune.conventions import UNKNOWN_ROW_ATTR
from moonprune.data import ImageSet
from moonprune.distributed import DistContext
from moonprune.errors import CheckpointError, ConfigError
from moonprune.objectives import MoonSchedule, MoonScheduleConfig, Reduction
from moonprune.outputs import atomic_path
from moonprune.sparsity.base import Masker, TopologySchedule
from moonprune.streaming import batch_rows
from moonprune.train_records import EpochInfo as EpochInfo
from moonprune.train_records import Rollback as Rollback
from moonprune.train_records import StepInfo as StepInfo
from moonprune.train_records import StopTraining as StopTraining
from moonprune.train_records import TrainCallback as TrainCallback
from moonprune.train_records import TrainResult as TrainResult
from moonprune.train_records import _Diverged
from moonprune.unknowns import (
    UNKNOWNS,
    epoch_generator,
    rows_for,
    synthesize,
    unknown_head,
    unknown_loss_sum,
)

logger = logging.getLogger(__name__)

STATE_VERSION = 1
#: An epoch whose ID training rows go to "unknown" (argmax K) more often than this warns.
UNKNOWN_RATE_WARNING = 0.01


def lr_factor(epoch_float: float, config: TrainConfig, main_epochs: int) -> float:
    """Cosine factor from ``lr_peak_factor`` to ``lr_floor_factor`` over ``main_epochs``,
    then held at the floor (the averaging epochs)."""
    if epoch_float >= main_epochs:
        return config.lr_floor_factor
    cos = 0.5 * (1 + math.cos(math.pi * epoch_float / main_epochs))
    return config.lr_floor_factor + (config.lr_peak_factor - config.lr_floor_factor) * cos


class Trainer:
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

    # -- state ----------------------------------------------------------------------
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

    # -- loop -----------------------------------------------------------------------
    def _loss(
        self, logits: torch.Tensor, y: torch.Tensor, epoch: int, n_global: int
    ) -> tuple[torch.Tensor, float]:
        """The loss to back-propagate and the sum of the per-row losses of ``y``'s rows.

        One process: the batch mean. Data-parallel: this rank's row sum scaled by
        :meth:`DistContext.share_of_mean`, so the averaged gradient is that of the mean
        over all ``n_global`` rows (0 from a rank without rows, never NaN).
        """
        reduction: Reduction = "sum" if self.dist.enabled else "mean"
        if self.schedule is None:
            loss = F.cross_entropy(logits, y, reduction=reduction)
        else:
            loss = self.schedule.loss(logits, y, epoch, reduction)
        if not self.dist.enabled:
            return loss, loss.item() * len(y)
        return self.dist.share_of_mean(loss, n_global), loss.item()

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
                raise StopTraining(f"stopped after epoch {epoch}")
            epoch += 1
        masks = self.masker.finalize()
        final = self.model
        if self.averaging is not None and self.averaging.result() is not None:
            final = self.averaging.result()  # type: ignore[assignment]
        final.eval()
        return TrainResult(final, masks, self.history, list(self.rollbacks))

    def _check_divergence(self, epoch: int) -> None:
        """Raise :class:`_Diverged` when this epoch's loss is non-finite, or both far
        above the first epoch's and above chance level, ``ln(outputs)`` (the loss of a
        uniform prediction). Both conditions: a pretrained model's loss can grow several
        times from a tiny start (0.02 -> 0.07 as sparsity ramps up) and stay healthy."""
        loss = self.history[-1].loss
        first = self.history[0].loss
        if not math.isfinite(loss):
            raise _Diverged(f"the epoch loss became {loss}")
        chance = math.log(max(self._outputs, 2))
        if epoch > 0 and loss > self.cfg.divergence_factor * first and loss > chance:
            raise _Diverged(
                f"the epoch loss {loss:.4g} is over {self.cfg.divergence_factor:g}x the first "
                f"epoch's ({first:.4g}) and above chance level ({chance:.3g})"
            )

    def _roll_back(self, good: dict[str, Any], epoch: int, reason: str) -> None:
        """Restore ``good``, halve the lr, record it; stop after ``max_rollbacks``."""
        loss = self.history[-1].loss if len(self.history) > len(good["history"]) else math.nan
        before = self.lr_scale
        rollbacks = list(self.rollbacks)
        if len(rollbacks) >= self.cfg.max_rollbacks:
            lr = self.cfg.lr * before
            raise ConfigError(
                f"training diverged at epoch {epoch + 1} ({reason}) even at lr {lr:.3g}, after "
                f"{len(rollbacks)} rollback(s); rerun with a lower --lr (e.g. --lr {lr / 4:.2g}) "
                "or check the data for NaN or mislabelled rows"
            )
        self._load(copy.deepcopy(good))
        self.lr_scale = before / 2
        self.rollbacks = [*rollbacks, Rollback(epoch, loss, reason, before, self.lr_scale)]
        logger.warning(
            "epoch %d diverged (%s): restored the last good state, rerunning at lr x%g",
            epoch + 1, reason, self.lr_scale,
        )  # fmt: skip

    def _run_epoch(self, epoch: int) -> None:
        start = time.perf_counter()
        torch.manual_seed(self.cfg.seed * 100_003 + epoch)
        self.model.train()
        seed = self.cfg.seed * 100_003 + epoch
        total_loss, n_seen = 0.0, 0
        lr = self.cfg.lr
        density = 1.0
        # the global batches' indices; each rank reads only its own rows of each
        global_batches = index_batches(
            len(self.data), self.cfg.batch_size, seed, min_last=self.min_last
        )
        sizes = [len(b) for b in global_batches]
        batches = read_batches(self.data, [self.dist.shard(b) for b in global_batches], self.device)
        # augmentation draws: seeded per epoch, made for the global batch on every rank
        draws = torch.Generator().manual_seed(seed + 7_919)
        # synthesized unknowns: each rank draws from its own seeded stream
        draws_u = epoch_generator(self.cfg.seed, epoch, self.dist.rank)
        n_unknown = 0
        for i, (x, y) in enumerate(batches):
            n_global = sizes[i]
            x = augment_batch(x, self.cfg.augment, draws, n_total=n_global, rows=self.dist.rows)
            lr = self.cfg.lr * self.lr_scale * self._lr_shape(epoch, i)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if self.unknowns:
                logits, unknown_loss = self._forward_with_unknowns(x, y, n_global, draws_u)
            else:
                logits = self.forward(x)
            self._outputs = logits.shape[-1]
            loss, row_sum = self._loss(logits, y, epoch, n_global)
            if self.unknowns:
                loss = loss + unknown_loss
            if self.schedule is not None:  # the guard's symptom: ID rows called unknown
                n_unknown += int((logits.detach().argmax(dim=-1) == logits.shape[-1] - 1).sum())
            if not torch.isfinite(loss):
                if self.dist.enabled:  # ranks cannot agree on a rollback mid-epoch
                    raise ConfigError(
                        f"the loss became {loss.item()} at epoch {epoch + 1}, step {i}; "
                        "lower the learning rate (--lr) or check the data for NaN"
                    )
                raise _Diverged(f"the loss became {loss.item()} at step {i}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.masker.step()
            if self.averaging is not None:
                self.averaging.maybe_update(self.model, epoch, i, self.steps_per_epoch)
            total_loss += row_sum
            n_seen += len(y)
            if self.callback is not None:  # the step's loss: the mean over this rank's rows
                if i % 20 == 0:
                    density = self.masker.stats()["density"]
                step_loss = row_sum / max(len(y), 1)
                self.callback.on_step(
                    StepInfo(
                        epoch, i, self.steps_per_epoch, step_loss, lr, self._a(), density, len(y)
                    )
                )
        a_used = self._a()  # the value this epoch trained with, before the ramp moves on
        if self.schedule is not None:
            self.schedule.end_epoch(epoch)
        if self.averaging is not None:
            recalibration = iterate_batches(
                self.data,
                batch_rows(self.data.x.shape, 256),
                0,
                self.device,
                False,
                min_rows_per_batch(self.model),
            )
            self.averaging.end_epoch(epoch, (x for x, _ in recalibration))
        stats = self.masker.stats()
        total_loss, n_rows, n_unknown_all = self.dist.all_reduce_sum(
            [total_loss, float(n_seen), float(n_unknown)]
        )
        unknown_rate = n_unknown_all / max(n_rows, 1) if self.schedule is not None else None
        if unknown_rate is not None and unknown_rate > UNKNOWN_RATE_WARNING:
            logger.warning(
                "epoch %d: the model puts %.1f%% of the ID training rows into 'unknown'; "
                "synthesized unknowns may look like ID data (try --unknowns none or a lower "
                "--unknowns-weight)", epoch + 1, 100 * unknown_rate,
            )  # fmt: skip
        info = EpochInfo(
            epoch,
            total_loss / max(n_rows, 1),
            lr,
            a_used,
            stats["density"],
            time.perf_counter() - start,
            self.averaging is not None and self.averaging.is_active(epoch),
            stats,
            unknown_rate,
        )
        self.history.append(info)
        if self.callback is not None:
            self.callback.on_epoch_end(info)

    def _forward_with_unknowns(
        self, x: torch.Tensor, y: torch.Tensor, n_global: int, draws: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the ID rows, and ``weight * mean CE(synthesized rows, K)``.

        Input-space rows are forwarded with the ID rows; feature-space rows are drawn
        from the ID rows' (detached) classifier inputs and go through the classifier
        only. The mean is over the global batch's synthesized rows (``round(fraction *
        n_r)`` per rank), so data-parallel gradients average to the single-process one.
        """
        head = unknown_head(self.model)
        k = int(getattr(head, UNKNOWN_ROW_ATTR))
        fraction, n = self.moon_cfg.unknowns_fraction, len(y)
        m = rows_for(n, fraction)
        world = self.dist.world_size
        m_global = sum(rows_for(len(range(r, n_global, world)), fraction) for r in range(world))
        x_syn = synthesize(self.unknowns, x, y, m, draws, "input")
        features: list[torch.Tensor] = []
        hook = head.register_forward_pre_hook(lambda _m, args: features.append(args[0]))
        try:
            logits = self.forward(torch.cat([x, x_syn]) if len(x_syn) else x)
        finally:
            hook.remove()
        synthetic = [logits[n:]]
        f = features[0].flatten(1)[:n].detach()
        f_syn = synthesize(self.unknowns, f, y, m, draws, "feature")
        if len(f_syn):
            synthetic.append(head(f_syn))
        total = unknown_loss_sum(torch.cat(synthetic), k)
        scale = self.moon_cfg.unknowns_weight * (world if self.dist.enabled else 1)
        return logits[:n], total * (scale / max(m_global, 1))

    def _lr_shape(self, epoch: int, step: int) -> float:
        """The schedule's factor at this step: cosine (reference) times a linear warm-up
        over the first ``lr_warmup_epochs`` (reaching 1 at its last step)."""
        t = epoch + step / self.steps_per_epoch
        factor = lr_factor(t, self.cfg, self.main_epochs)
        if self.cfg.lr_warmup_epochs > 0:
            factor *= min(1.0, (t + 1 / self.steps_per_epoch) / self.cfg.lr_warmup_epochs)
        return factor

    def _a(self) -> float | None:
        return None if self.schedule is None else self.schedule.a


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
