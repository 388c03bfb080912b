"""``--method channel``: iterative channel pruning interleaved with MOON fine-tuning.

The run's epochs are split over ``steps`` stages; each stage prunes one step
(:class:`~moonprune.structured.ChannelPruner`) and fine-tunes the slimmer network with
the same loss and averaging as every other method. Pruning replaces parameters, so
each stage gets a fresh optimizer. The MOON warm-up happens in the first stage only,
weight averaging in the last stage only (the architecture must not change while a
running average is kept); the schedule of ``a`` restarts per stage, reaching
``a_final`` at the end of each one. A channel-pruning run cannot be resumed
mid-way: the shapes in a saved state would not match a fresh model.

Under ``torchrun`` the candidate networks of the ``latency`` allocation are timed
once, by rank 0, and its plan is sent to every rank
(:func:`~moonprune.channel_search.broadcast_plan`); every rank prunes its own copy
(the same weights, ranked on the same batch, give the same channels; this is checked
after every step) and each stage's fine-tuning is data-parallel like every other
method's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from moonprune.channel_search import ChannelPlan, broadcast_plan
from moonprune.config import DEFAULT_CHANNEL_SPEEDUP, CompressConfig, SparsityConfig
from moonprune.data import ImageSet
from moonprune.distributed import DistContext
from moonprune.errors import ConfigError
from moonprune.speed import default_threads
from moonprune.structured import (
    ChannelPruner,
    KeepAllMasker,
    module_structure,
    require_torch_pruning,
)
from moonprune.training import EpochInfo, StepInfo, TrainCallback, Trainer, TrainResult

DEFAULT_STEPS = 4
CHANNEL_DESCRIPTION = (
    "structured: removes whole channels; widths chosen by timing candidate networks in "
    "onnxruntime (--speedup X, default auto: faster at batch 1 and --latency-batch)"
)


def resolved_steps(steps: int | None, epochs: int) -> int:
    """The pruning steps: as configured, or ``min(DEFAULT_STEPS, epochs)``."""
    return steps if steps is not None else max(1, min(DEFAULT_STEPS, epochs))


def channel_target(sp: SparsityConfig) -> tuple[float | None, str]:
    """(kept fraction, measure): ``auto`` (no fraction), 1 / speed-up of latency, a MAC
    or a parameter fraction."""
    if sp.speedup == DEFAULT_CHANNEL_SPEEDUP:
        return None, "auto"
    if isinstance(sp.speedup, int | float):
        return 1 / sp.speedup, "latency"
    if sp.macs_target is not None:
        return sp.macs_target, "macs"
    return 1 - sp.sparsity, "params"


def stage_epochs(epochs: int, steps: int) -> list[int]:
    """Epochs per stage: as equal as possible, at least one each."""
    if epochs < steps:
        raise ConfigError(
            f"--method channel prunes in {steps} steps and fine-tunes after each: it needs "
            f"at least {steps} epochs, got {epochs}"
        )
    base, extra = divmod(epochs, steps)
    return [base + (1 if i >= steps - extra else 0) for i in range(steps)]


def train_channel_pruned(
    model: nn.Module,
    train_set: ImageSet,
    head_layer: str,
    cfg: CompressConfig,
    callback: TrainCallback | None = None,
    dist: DistContext | None = None,
) -> tuple[TrainResult, dict[str, Any]]:
    """Prune ``model`` in place to the configured target while fine-tuning it."""
    dist = dist or DistContext()
    dist.init_group(next(model.parameters()).device)
    sp = cfg.sparsity
    keep, measure = channel_target(sp)
    steps = resolved_steps(sp.steps, cfg.train.epochs)
    example = train_set.x[:2].to(next(model.parameters()).device)
    pruner = _make_pruner(model, example, head_layer, cfg, keep, measure, steps, dist)
    plan = stage_epochs(cfg.train.epochs, steps)
    average = min(cfg.moon.resolved_average_epochs(cfg.train.epochs), plan[-1] - 1)
    history: list[EpochInfo] = []
    final: nn.Module = model
    for stage, epochs in enumerate(plan):
        batch = (train_set.x[:64].to(example.device), train_set.y[:64].to(example.device))
        pruner.step(batch)
        _check_ranks_agree(model, dist)
        moon = dataclasses.replace(
            cfg.moon,
            warmup_epochs=cfg.moon.warmup_epochs if stage == 0 else 0,
            average_epochs=average if stage == len(plan) - 1 else 0,
        )
        train_cfg = dataclasses.replace(cfg.train, epochs=epochs, seed=cfg.train.seed + stage)
        stage_callback = _RunEpochs(callback, sum(plan[:stage])) if callback else None
        result = Trainer(model, KeepAllMasker(), train_set, train_cfg, moon,
                         callback=stage_callback, dist=dist).run()  # fmt: skip
        history += [
            dataclasses.replace(h, epoch=h.epoch + sum(plan[:stage])) for h in result.history
        ]
        final = result.model
    final.eval()
    stats: dict[str, Any] = dict(pruner.stats())
    stats.update({"ratio": pruner.ratio, "steps": steps, "importance": sp.importance,
                  "round_to": sp.round_to, "allocation": sp.allocation, "grid": pruner.grid,
                  "target": keep, "measure": measure})  # fmt: skip
    if pruner.plan is not None:
        stats["plan"] = pruner.plan.as_dict()
    return TrainResult(final, {}, history), stats


def _make_pruner(model: nn.Module, example: torch.Tensor, head_layer: str, cfg: CompressConfig,
                 keep: float | None, measure: str, steps: int,
                 dist: DistContext) -> ChannelPruner:  # fmt: skip
    """The pruner; with the latency allocation, rank 0 times the candidates and every
    other rank takes its plan (a refusal on rank 0 stops them all)."""
    sp = cfg.sparsity

    def make(plan: ChannelPlan | None = None) -> ChannelPruner:
        return ChannelPruner(model, example, head_layer, keep=keep, measure=measure,
                             steps=steps, importance=sp.importance, round_to=sp.round_to,
                             allocation=sp.allocation, latency_batch=sp.latency_batch,
                             threads=sp.threads, plan=plan)  # fmt: skip

    if sp.allocation != "latency" or not dist.enabled:
        return make()
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


def check_channel_config(cfg: CompressConfig, resume: bool) -> None:
    """Fail early on options that cannot work with channel pruning."""
    if resume:
        raise ConfigError("--resume is not supported for --method channel; rerun from the start")
    stage_epochs(cfg.train.epochs, resolved_steps(cfg.sparsity.steps, cfg.train.epochs))
    require_torch_pruning()
