"""One epoch of sparse fine-tuning, per batch::

    logits = model(x)
    schedule.observe(logits, y, epoch)                  # MOON: the ramp's statistic
    loss = moon_loss(logits, y, schedule.a_for(epoch))  # (no MOON: cross_entropy)
    loss.backward(); optimizer.step(); masker.step()    # .grad is the dense gradient
    averaging.maybe_update(...)                         # last epochs only

and at the epoch's end: ``schedule.end_epoch``, BatchNorm recalibration of the
average (on shuffled training batches augmented as in training, as the reference
does), and the epoch's record. Shuffling, augmentation and dropout are seeded per
epoch (``seed``, ``epoch``), so a resumed run sees the same batches. A run that ends
without an average gets its own network's BatchNorm statistics recomputed the same
way (:meth:`EpochLoop.recompute_batchnorm`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moonprune.augment import augment_batch
from moonprune.averaging import recompute_batchnorm
from moonprune.batching import index_batches, iterate_batches, min_rows_per_batch, read_batches
from moonprune.errors import ConfigError
from moonprune.lr_schedule import lr_shape
from moonprune.objectives import Reduction, moon_loss
from moonprune.streaming import batch_rows
from moonprune.train_records import EpochInfo, StepInfo, _Diverged
from moonprune.unknown_forward import SynthesizedUnknowns
from moonprune.unknowns import epoch_generator, rows_for, synthesize

logger = logging.getLogger(__name__)

#: An epoch whose ID training rows go to "unknown" (argmax K) more often than this warns.
UNKNOWN_RATE_WARNING = 0.01


@dataclass
class EpochTotals:
    """What one epoch's steps add up on this rank (and the last step's lr, density)."""

    loss: float = 0.0
    rows: int = 0
    unknown: int = 0
    lr: float = 0.0
    density: float = 1.0


@dataclass(frozen=True)
class EpochDraws:
    """The epoch's seeded random streams: augmentation (the same on every rank) and
    synthesized unknowns (each rank its own)."""

    augment: torch.Generator
    unknowns: torch.Generator


class EpochLoop(SynthesizedUnknowns):
    """The trainer's epoch: its batches, each optimisation step, and the epoch's record."""

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
            self.schedule.observe(logits, y, epoch)
            loss = moon_loss(logits, y, self.schedule.a_for(epoch), reduction)
        if not self.dist.enabled:
            return loss, loss.item() * len(y)
        return self.dist.share_of_mean(loss, n_global), loss.item()

    def _run_epoch(self, epoch: int) -> None:
        start = time.perf_counter()
        seed = self._epoch_seed(epoch)
        torch.manual_seed(seed)
        self.model.train()
        totals = EpochTotals(lr=self.cfg.lr)
        # the global batches' indices; each rank reads only its own rows of each
        global_batches = index_batches(
            len(self.data), self.cfg.batch_size, seed, min_last=self.min_last
        )
        sizes = [len(b) for b in global_batches]
        batches = read_batches(self.data, [self.dist.shard(b) for b in global_batches], self.device)
        draws = EpochDraws(
            # augmentation draws: seeded per epoch, made for the global batch on every rank
            torch.Generator().manual_seed(seed + 7_919),
            # synthesized unknowns: each rank draws from its own seeded stream
            epoch_generator(self.cfg.seed, epoch, self.dist.rank),
        )
        for i, (x, y) in enumerate(batches):
            self._train_step(epoch, i, x, y, sizes[i], draws, totals)
        self._end_epoch(epoch, totals, start)

    def _train_step(
        self, epoch: int, i: int, x: torch.Tensor, y: torch.Tensor, n_global: int,
        draws: EpochDraws, totals: EpochTotals,
    ) -> None:  # fmt: skip
        """One optimisation step on this rank's rows ``x``, ``y`` of global batch ``i``
        (``n_global`` rows), added to ``totals``."""
        x = augment_batch(x, self.cfg.augment, draws.augment, n_total=n_global, rows=self.dist.rows)
        lr = self.cfg.lr * self.lr_scale * self._lr_shape(epoch, i)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.unknowns:
            logits, unknown_loss = self._forward_with_unknowns(x, y, n_global, draws.unknowns)
        else:
            logits = self.forward(x)
        self._outputs = logits.shape[-1]
        loss, row_sum = self._loss(logits, y, epoch, n_global)
        if self.unknowns:
            loss = loss + unknown_loss
        if self.schedule is not None:  # the guard's symptom: ID rows called unknown
            totals.unknown += int((logits.detach().argmax(dim=-1) == logits.shape[-1] - 1).sum())
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
        totals.loss += row_sum
        totals.rows += len(y)
        totals.lr = lr
        if self.callback is not None:  # the step's loss: the mean over this rank's rows
            if i % 20 == 0:
                totals.density = self.masker.stats()["density"]
            step_loss = row_sum / max(len(y), 1)
            self.callback.on_step(
                StepInfo(
                    epoch, i, self.steps_per_epoch, step_loss, lr, self._a(), totals.density,
                    len(y),
                )
            )  # fmt: skip

    def _end_epoch(self, epoch: int, totals: EpochTotals, start: float) -> None:
        """Advance the schedule, recalibrate the average's BatchNorm, record the epoch."""
        a_used = self._a()  # the value this epoch trained with, before the ramp moves on
        if self.schedule is not None:
            self.schedule.end_epoch(epoch)
        if self.averaging is not None:
            self.averaging.end_epoch(epoch, self._recalibration_batches(epoch))
        stats = self.masker.stats()
        total_loss, n_rows, n_unknown_all = self.dist.all_reduce_sum(
            [totals.loss, float(totals.rows), float(totals.unknown)]
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
            totals.lr,
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

    def _recalibration_batches(self, epoch: int) -> Iterator[torch.Tensor]:
        """The rows the average's BatchNorm statistics are recomputed on: the whole
        training set in a seeded shuffled order, augmented by ``--augment`` as the
        training batches are, and with ``--unknowns`` each batch's synthesized
        input-space rows added as in training. Order, augmentation and synthesized rows
        are seeded per run and epoch, identical on every rank (each rank holds the
        whole set), and redrawn the same way by a resumed run.

        The reference recalibrates on its training loader (``bn_update(self.train_loader,
        self.model_swa)``, openood/trainers/base_trainer.py:170), whose train-split
        preprocessor flips and crops (openood/preprocessors/utils.py:23-24,
        openood/preprocessors/base_preprocessor.py:26-27) and which shuffles
        (openood/datasets/utils.py:94-96, ``shuffle=split_config.shuffle``, which
        configs/datasets/cifar10/cifar10.yml:21 sets to ``True`` for train): the
        statistics then describe the rows the network was trained on. Up to commit 7e1aa53
        the rows came in storage order, which costs where they are stored class by class
        (an image folder; mnist5k): a batch of 256 then holds one or two classes and its
        statistics miss the spread between classes. On mnist5k 0-5 at 95% sparsity (18
        runs each, ``benchmarks/unknowns_ablation.py``) shuffling gained plain sparse
        training 0.54 +- 0.16 accuracy points and 0.82 +- 0.16 near-OOD AUROC points at
        10 epochs, and ``--unknowns synth`` 0.56 +- 0.18 accuracy points with its
        synthesized rows added (-0.12 +- 0.11 without them: the network trained on
        batches that held them). Not in the reference, which synthesizes nothing.
        """
        seed = self._epoch_seed(epoch)
        draws = torch.Generator().manual_seed(seed + 15_485_863)
        # rank 0's stream on every rank: the recomputed statistics must agree
        unknowns = epoch_generator(self.cfg.seed, epoch, 0)
        batches = iterate_batches(
            self.data,
            batch_rows(self.data.x.shape, 256),
            seed + 7_919,
            self.device,
            True,
            min_rows_per_batch(self.model),
        )
        for x, y in batches:
            x = augment_batch(x, self.cfg.augment, draws)
            if self.unknowns:
                m = rows_for(len(x), self.moon_cfg.unknowns_fraction)
                x = torch.cat([x, synthesize(self.unknowns, x, y, m, unknowns, "input")])
            yield x

    def recompute_batchnorm(self) -> None:
        """Recompute the trained network's BatchNorm statistics, as the average's are
        (on :meth:`_recalibration_batches`), when the run ends without an average.

        Not in the reference, whose networks end with running statistics that have
        followed 100 epochs of about 390 steps. A fine-tuning run here can end after a
        handful of steps per epoch (digits 0-5: 650 training rows, 11 batches of 64), too few
        for the momentum-0.1 running statistics to catch up with weights that moved (a
        pruning step, then a warm-up to a high lr): on its running statistics the plain
        (``--no-moon``) channel-pruned ResNet-8 of ``benchmarks/structured.py`` fell from
        99.5% to 85.3% test accuracy, while MOON's, recomputed, kept 97.7%.
        The network's own statistics of its own training rows are what any user expects
        to ship; MOON's averaged network already gets them (part 4).
        """
        recompute_batchnorm(self._recalibration_batches(self.cfg.epochs), self.model)

    def _epoch_seed(self, epoch: int) -> int:
        """The seed of ``epoch``'s draws (batch order, augmentation, dropout,
        recalibration order): fixed by ``--seed`` and the epoch, so a resumed run redraws
        them."""
        return self.cfg.seed * 100_003 + epoch

    def _lr_shape(self, epoch: int, step: int) -> float:
        """The schedule's factor at this step (:func:`moonprune.lr_schedule.lr_shape`)."""
        return lr_shape(epoch, step, self.steps_per_epoch, self.cfg, self.main_epochs)

    def _a(self) -> float | None:
        return None if self.schedule is None else self.schedule.a
