"""``--method channel``: iterative channel pruning interleaved with MOON fine-tuning.

The run's epochs are split over ``steps`` stages; each stage prunes one step
(:class:`~moonprune.sparsity.channel.pruner.ChannelPruner`) and fine-tunes the
slimmer network with the same loss and averaging as every other method. Pruning
replaces parameters, so each stage gets a fresh optimizer. The MOON warm-up happens
in the first stage only, weight averaging in the last stage only (the architecture
must not change while a running average is kept); the schedule of ``a`` restarts per
stage, reaching ``a_final`` at the end of each one.

A run resumes like the maskers' (``--resume``): after every epoch the stage's trainer
writes the training state atomically, with the channel state beside it (the stage, the
module structure, the pruner's steps and plan: :mod:`moonprune.sparsity.channel.state`).
A resumed run builds the pruner on the fresh dense network again (taking the saved
plan: nothing is timed twice), re-shapes the network to the saved structure, loads
the weights and the stage's trainer state, and goes on; the final weights are
bit-identical to an uninterrupted run's (shuffling and dropout are seeded per epoch).

Under ``torchrun`` the candidate networks of the ``latency`` allocation are timed
once, by rank 0, and its plan is sent to every rank
(:func:`~moonprune.sparsity.channel.plan.broadcast_plan`); every rank prunes its own
copy (the same weights, ranked on the same batch, give the same channels; this is
checked after every step) and each stage's fine-tuning is data-parallel like every
other method's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moonprune.config import CompressConfig
from moonprune.data import ImageSet
from moonprune.distributed import DistContext
from moonprune.errors import ConfigError
from moonprune.sparsity.base import Masker, MaskerConfig
from moonprune.sparsity.channel.deployed_timing import DeployedRejector
from moonprune.sparsity.channel.plan import ChannelPlan, broadcast_plan
from moonprune.sparsity.channel.pruner import ChannelPruner
from moonprune.sparsity.channel.settings import channel_target, resolved_steps, stage_epochs
from moonprune.sparsity.channel.state import ChannelState, StageTrainer, read_channel_state
from moonprune.sparsity.channel.structure import apply_structure_, module_structure
from moonprune.speed import default_threads, measure_speedups
from moonprune.training import EpochInfo, StepInfo, TrainCallback, TrainResult


class KeepAllMasker(Masker):
    """No unstructured sparsity: the fine-tuning masker between channel-pruning steps."""

    name = "keep-all"
    description = "every weight kept (dense fine-tuning)"

    def __init__(self, config: MaskerConfig | None = None) -> None:
        super().__init__(config or MaskerConfig())

    def initial_masks(self) -> dict[str, torch.Tensor]:
        return {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}


@dataclasses.dataclass
class _Run:
    """One channel-pruning run's fixed parts: the stages and where the state goes."""

    train_set: ImageSet
    cfg: CompressConfig
    stages: list[int]
    fingerprint: dict[str, Any]
    callback: TrainCallback | None
    dist: DistContext
    state_path: Path | None

    def trainer(self, model: nn.Module, stage: int, channel: ChannelState) -> StageTrainer:
        """Stage ``stage``'s trainer: MOON warm-up in the first stage, averaging in the last."""
        moon_cfg, last = self.cfg.moon, len(self.stages) - 1
        average = min(moon_cfg.resolved_average_epochs(self.cfg.train.epochs), self.stages[-1] - 1)
        moon = dataclasses.replace(
            moon_cfg,
            warmup_epochs=moon_cfg.warmup_epochs if stage == 0 else 0,
            average_epochs=average if stage == last else 0,
        )
        train_cfg = dataclasses.replace(
            self.cfg.train, epochs=self.stages[stage], seed=self.cfg.train.seed + stage
        )
        stage_callback = _RunEpochs(self.callback, self.offset(stage)) if self.callback else None
        return StageTrainer(model, KeepAllMasker(), self.train_set, train_cfg, moon,
                            state_path=self.state_path, callback=stage_callback, dist=self.dist,
                            channel=channel)  # fmt: skip

    def offset(self, stage: int) -> int:
        """Epochs of the run before ``stage``."""
        return sum(self.stages[:stage])


def train_channel_pruned(
    model: nn.Module,
    train_set: ImageSet,
    head_layer: str,
    cfg: CompressConfig,
    callback: TrainCallback | None = None,
    dist: DistContext | None = None,
    *,
    state_path: Path | None = None,
    resume: bool = False,
    stop_after_epoch: int | None = None,
) -> tuple[TrainResult, dict[str, Any]]:
    """Prune ``model`` in place to the configured target while fine-tuning it.

    With ``state_path`` the training state is saved after every epoch; ``resume``
    continues from it (``model`` being the same fresh dense network as the interrupted
    run's). ``stop_after_epoch`` interrupts after that epoch of the run, counted over
    all stages, with :class:`~moonprune.training.StopTraining` (tests).
    """
    dist = dist or DistContext()
    dist.init_group(next(model.parameters()).device)
    sp = cfg.sparsity
    steps = resolved_steps(sp.steps, cfg.train.epochs)
    stages = stage_epochs(cfg.train.epochs, steps)
    fingerprint = {"sparsity": dataclasses.asdict(sp), "steps": steps, "stages": stages,
                   "head_layer": head_layer, "n_train": len(train_set)}  # fmt: skip
    saved = _saved_state(state_path, fingerprint) if resume else None
    example = train_set.x[:2].to(next(model.parameters()).device)
    plan = None
    if saved is not None and saved[0].pruner["plan"] is not None:
        plan = ChannelPlan.from_state(saved[0].pruner["plan"])
    pruner = _make_pruner(model, example, head_layer, cfg, steps, dist, plan, len(train_set))
    run = _Run(train_set, cfg, stages, fingerprint, callback, dist, state_path)
    history: list[EpochInfo] = []
    first = 0
    if saved is not None:
        resumed, tensors = saved
        pruner.load_state_dict(resumed.pruner)  # on the dense network, before re-shaping
        apply_structure_(model, resumed.structure, tensors)
        model.load_state_dict(tensors)
        history = [EpochInfo(**h) for h in resumed.history]
        first = resumed.stage
    final: nn.Module = model
    for stage in range(first, steps):
        if saved is None or stage > first:
            batch = (train_set.x[:64].to(example.device), train_set.y[:64].to(example.device))
            pruner.step(batch)
            _check_ranks_agree(model, dist)
        channel = ChannelState(stage, module_structure(model), pruner.state_dict(),
                               [vars(h) for h in history], fingerprint)  # fmt: skip
        trainer = run.trainer(model, stage, channel)
        if saved is not None and stage == first and state_path is not None:
            trainer.load_state(state_path)  # the stage's own state: optimiser, schedule, ...
        offset = run.offset(stage)
        stop = None
        if stop_after_epoch is not None and stop_after_epoch >= offset:
            stop = stop_after_epoch - offset
        result = trainer.run(stop_after_epoch=stop)
        history += [dataclasses.replace(h, epoch=h.epoch + offset) for h in result.history]
        final = result.model
    final.eval()
    pruner.finalize()  # every step done
    return TrainResult(final, {}, history), _stats(pruner, cfg, steps)


def _saved_state(
    state_path: Path | None, fingerprint: dict[str, Any]
) -> tuple[ChannelState, dict[str, torch.Tensor]]:
    if state_path is None or not state_path.is_file():
        raise ConfigError(
            f"--resume was given but there is no training state at {state_path}; "
            "run without --resume to start afresh"
        )
    return read_channel_state(state_path, fingerprint)


def _stats(pruner: ChannelPruner, cfg: CompressConfig, steps: int) -> dict[str, Any]:
    """The report's ``structure``: sizes reached, and how they were chosen."""
    sp = cfg.sparsity
    keep, measure = channel_target(sp)
    stats: dict[str, Any] = dict(pruner.stats())
    stats.update({"ratio": pruner.ratio, "steps": steps, "importance": sp.importance,
                  "round_to": sp.round_to, "allocation": sp.allocation, "grid": pruner.grid,
                  "target": keep, "measure": measure})  # fmt: skip
    if pruner.plan is not None:
        stats["plan"] = pruner.plan.as_dict()
    return stats


def _make_pruner(model: nn.Module, example: torch.Tensor, head_layer: str, cfg: CompressConfig,
                 steps: int, dist: DistContext, plan: ChannelPlan | None,
                 n_train: int) -> ChannelPruner:  # fmt: skip
    """The pruner; with the latency allocation, rank 0 times the candidates and every
    other rank takes its plan (a refusal on rank 0 stops them all). A given ``plan``
    (a resumed run's, read by every rank) is taken as it is."""
    sp = cfg.sparsity
    # candidates are timed inside a stand-in of the deployed rejector (deployed_timing)
    rejector = DeployedRejector(cfg.score, head_layer, min(n_train, cfg.feature_bank), cfg.knn_k)
    timer = rejector.timer(measure_speedups)

    def make(plan: ChannelPlan | None = None) -> ChannelPruner:
        return ChannelPruner.from_config(model, example, head_layer, sp, steps, plan, timer)

    if plan is not None or sp.allocation != "latency" or not dist.enabled:
        return make(plan)
    threads = sp.threads or default_threads()
    if dist.is_main:
        try:
            pruner = make()
        except Exception:  # any failure: the other ranks wait for the plan, tell them
            broadcast_plan(None, model, dist, sp.latency_batch, threads)
            raise
        broadcast_plan(pruner.plan, model, dist, sp.latency_batch, threads)
        return pruner
    return make(broadcast_plan(None, model, dist, sp.latency_batch, threads))


@dataclasses.dataclass
class _RunEpochs:
    """Passes a stage's progress on with epochs counted over the whole run."""

    callback: TrainCallback
    offset: int

    def on_step(self, info: StepInfo) -> None:
        self.callback.on_step(dataclasses.replace(info, epoch=info.epoch + self.offset))

    def on_epoch_end(self, info: EpochInfo) -> None:
        self.callback.on_epoch_end(dataclasses.replace(info, epoch=info.epoch + self.offset))


def _check_ranks_agree(model: nn.Module, dist: DistContext) -> None:
    """Every rank must have pruned to the same channel counts (else DDP cannot start)."""
    if not dist.enabled:
        return
    sizes = [float(v) for attrs in module_structure(model).values() for v in attrs.values()]
    totals = dist.all_reduce_sum(sizes)
    if any(t != s * dist.world_size for s, t in zip(sizes, totals, strict=True)):
        raise ConfigError(
            "the processes pruned to different channel counts (nondeterministic importance "
            "scores?); rerun with one process, or with --importance magnitude"
        )
