"""Structured (channel) pruning with Torch-Pruning's dependency graph.

Unstructured zeros make files smaller but not faster on a CPU; removing whole
channels makes every layer smaller. :class:`ChannelPruner` wraps
``torch_pruning.pruner.MetaPruner`` (the ``DependencyGraph`` keeps residual additions
and depthwise convolutions consistent) with an L2-magnitude or first-order Taylor
importance; the classifier (with its unknown output) is never pruned.

The target is a fraction of the dense model's parameters (``--sparsity``) or of its
MACs (``--macs-target``), reached in ``steps`` steps, each followed by MOON fine-tuning
(``moonprune.pipeline``). How the channels to remove are shared out between layers
(``allocation``):

- ``uniform``: every layer loses the same fraction of its channels (Torch-Pruning's
  ``MetaPruner``); the ratio that reaches the target is found by bisection on copies.
- ``global``: channels from all layers compete, ranked by importance lost per MAC
  (or parameter) saved, in chunks of ``round_to``
  (:class:`moonprune.channel_allocation.GlobalAllocator`, which says why and how).

A pruned network no longer matches its factory's shapes. :func:`module_structure`
records the changed sizes (plain integers, safe to load with ``weights_only=True``);
:func:`apply_structure_` rebuilds them on a freshly built model before its weights
are loaded.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moonprune.channel_allocation import GlobalAllocator, require_torch_pruning
from moonprune.channel_latency import CALIBRATION_ROUNDS, TOLERANCE, LatencyGoal
from moonprune.errors import ConfigError
from moonprune.latency import default_threads, nchwc_block
from moonprune.sparsity.base import Masker, MaskerConfig

logger = logging.getLogger(__name__)
__all__ = ["ChannelPruner", "KeepAllMasker", "apply_structure_", "count_macs_params",
           "module_structure", "require_torch_pruning", "size_vs_dense"]  # fmt: skip

_SIZE_ATTRS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Conv1d: ("in_channels", "out_channels", "groups"),
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.BatchNorm1d: ("num_features",),
    nn.BatchNorm2d: ("num_features",),
    nn.GroupNorm: ("num_channels", "num_groups"),
    nn.LayerNorm: (),
}


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """Multiply-accumulates for one input, and parameters."""
    tp = require_torch_pruning()
    was_training = model.training
    model.eval()
    try:
        macs, params = tp.utils.count_ops_and_params(model, example[:1])
    finally:
        model.train(was_training)
    return int(macs), int(params)


class ChannelPruner:
    """Prunes ``model`` in place to a parameter, MAC or latency fraction, in ``steps`` steps.

    ``measure="latency"``: ``keep`` is the fraction of the dense latency at batch
    ``latency_batch`` (1 / the speed-up), with ``threads`` intra-op threads. The
    ``latency`` allocation (any measure) ranks channels by importance per measured
    millisecond saved (:mod:`moonprune.channel_latency`), on a grid of ``round_to``
    (default 8) channels; with ``check_speed`` the planned network is timed against
    the dense one before any training, and a plan slower than dense is an error.
    """

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        head_layer: str,
        *,
        keep: float,
        measure: str = "params",
        steps: int = 4,
        importance: str = "magnitude",
        round_to: int | None = None,
        allocation: str = "latency",
        latency_batch: int = 64,
        threads: int | None = None,
        cache: Path | None = None,
        check_speed: bool = True,
    ) -> None:
        if not 0.0 < keep < 1.0:
            raise ConfigError(f"the kept fraction must be in (0, 1), got {keep}")
        if measure not in ("params", "macs", "latency"):
            raise ConfigError(f"measure must be 'params', 'macs' or 'latency', got {measure!r}")
        if importance not in ("magnitude", "taylor"):
            raise ConfigError(f"importance must be 'magnitude' or 'taylor', got {importance!r}")
        if allocation not in ("uniform", "global", "latency"):
            raise ConfigError(
                f"allocation must be 'uniform', 'global' or 'latency', got {allocation!r}"
            )
        if measure == "latency" and allocation == "uniform":
            raise ConfigError(
                "a speed-up target needs --allocation latency (or global), not uniform"
            )
        self.model, self.example, self.head_layer = model, example[:2], head_layer
        self.keep, self.measure, self.steps, self.importance = keep, measure, steps, importance
        self.round_to, self.allocation = round_to, allocation
        self.dense_macs, self.dense_params = count_macs_params(model, example)
        self.done = 0
        self.ratio: float | None = None
        self.target = keep  # what the allocator aims at (a latency target is calibrated)
        self.planned: dict[int, float] | None = None  # measured speed-ups of the plan
        self.goal: LatencyGoal | None = None
        self.grid = round_to or (nchwc_block() if allocation == "latency" else 1)
        if allocation == "latency" or measure == "latency":
            self.goal = LatencyGoal(model, self.example, latency_batch,
                                    threads or default_threads(), cache)  # fmt: skip
        if allocation == "uniform":
            self.ratio = self._solve_ratio()
            self._pruner = self._make_pruner(model, self.ratio, steps)
        else:
            self.floor = self._reachable_floor()
            if check_speed and self.goal is not None:
                self._calibrate(self.goal)
                self.goal.save()
            self._global = self._allocator(model)

    def _allocator(self, model: nn.Module, importance: Any = None) -> GlobalAllocator:
        latency = self.allocation == "latency" and self.goal is not None
        chunk = self.grid
        count = "macs" if self.measure == "latency" else self.measure
        return GlobalAllocator(model, self.example, self.head_layer,
                                importance or self._new_importance(), chunk, count,
                                cost=self.goal.cost(model) if latency and self.goal else None,
                                lookahead=3 if latency else 1)  # fmt: skip

    def _plan(self, target: float) -> tuple[nn.Module, bool]:
        """A pruned copy at ``target`` (magnitude ranking; True if reached)."""
        trial = copy.deepcopy(self.model)
        tp = require_torch_pruning()
        allocator = self._allocator(trial, tp.importance.MagnitudeImportance(p=2))
        return trial, allocator.prune_to(lambda: self._fraction(trial) <= target, None)

    def _calibrate(self, goal: LatencyGoal) -> None:
        """Time the planned network before training; rescale a latency target by it."""
        from moonprune.speed import speedups

        target, best = self.keep, 0.0
        planned: dict[int, float] = {}
        for _ in range(CALIBRATION_ROUNDS):
            trial, _ = self._plan(target)
            planned = speedups(self.model, trial, self.example, goal.batches, goal.threads)
            self.target, self.planned = target, planned
            best = max(best, planned[goal.batch])
            if self.measure != "latency":
                break
            want, got = 1 / self.keep, planned[goal.batch]
            if abs(got - want) <= TOLERANCE * want or (target <= self.floor and got < want):
                break
            target = min(max(target * got / want, self.floor), 0.999)
        logger.info("planned network, measured before training: %s", planned)
        threads = f"{goal.threads} thread{'s' if goal.threads > 1 else ''}"
        if self.measure == "latency" and planned[goal.batch] < (1 - 2 * TOLERANCE) / self.keep:
            raise ConfigError(
                f"channel pruning cannot reach a {1 / self.keep:.2f}x speed-up at batch "
                f"{goal.batch} ({threads}) on this machine: the best plan measured "
                f"{best:.2f}x; ask for at most that with --speedup"
            )
        if any(up < 1.0 for up in planned.values()):
            figures = ", ".join(f"{up:.2f}x at batch {b}" for b, up in planned.items())
            raise ConfigError(
                f"the planned pruned network is slower than the dense one on this machine "
                f"({figures}, {threads}); use --speedup instead of a MAC or parameter target"
            )

    def _reachable_floor(self) -> float:
        """:meth:`_check_reachable`; a grid taken from the CPU (no ``round_to``) that
        cannot reach a MAC or parameter target is halved, once (layers narrower than a
        block are slower per channel, and the table does not see it: a speed-up target
        stays on the block grid and says what it can reach)."""
        try:
            return self._check_reachable()
        except ConfigError:
            if self.round_to or self.measure == "latency" or self.grid < 2:
                raise
            self.grid //= 2
            logger.info("the target needs narrower layers: channel grid %d", self.grid)
            return self._check_reachable()

    def _check_reachable(self) -> float:
        """Fail before any training when the target cannot be reached; return the floor.

        Pruned on a copy; the smallest reachable size does not depend on the ranking
        (every group ends at one chunk), so magnitude importance serves for Taylor too.
        A latency target is pruned to the end, to know the floor (the fastest plan).
        """
        trial, reached = self._plan(0.0 if self.measure == "latency" else self.keep)
        floor = self._fraction(trial)
        if self.measure == "latency" and self.goal is not None:
            if floor > self.keep:
                best = self.goal.predicted_speedups(trial)[self.goal.batch]
                raise ConfigError(
                    f"channel pruning cannot reach a {1 / self.keep:.2f}x speed-up at batch "
                    f"{self.goal.batch} on this machine: with every layer at its narrowest "
                    f"the latency table predicts {best:.2f}x; ask for at most that with "
                    "--speedup"
                )
            return floor
        if not reached:
            chunk = self.grid
            measure = "MACs" if self.measure == "macs" else "parameters"
            raise ConfigError(
                f"channel pruning cannot reach {self.keep:.0%} of the dense {measure}: cutting "
                f"every layer to at most {chunk} channel{'s' if chunk > 1 else ''} keeps "
                f"{floor:.0%}; use a smaller round_to, or a less aggressive target"
            )
        return 0.0

    def _new_importance(self) -> Any:
        tp = require_torch_pruning()
        return (tp.importance.MagnitudeImportance(p=2) if self.importance == "magnitude"
                else tp.importance.TaylorImportance())  # fmt: skip

    def _make_pruner(self, model: nn.Module, ratio: float, steps: int) -> Any:
        tp = require_torch_pruning()
        return tp.pruner.MetaPruner(
            model, self.example, importance=self._new_importance(), pruning_ratio=ratio,
            iterative_steps=steps, ignored_layers=[model.get_submodule(self.head_layer)],
            round_to=self.round_to,
        )  # fmt: skip

    def _fraction(self, model: nn.Module) -> float:
        if self.measure == "latency" and self.goal is not None:
            return self.goal.fraction(model)
        macs, params = count_macs_params(model, self.example)
        return macs / self.dense_macs if self.measure == "macs" else params / self.dense_params

    def _solve_ratio(self) -> float:
        """Bisection on the channel ratio so that one full pruning keeps ``keep``.

        Returns the upper end of the final bracket: a ratio that was tried and reached
        the target. With ``round_to`` the kept fraction is a step function of the ratio,
        so a midpoint could land on the step's wrong side. When no tried ratio reaches
        the target (``round_to`` as wide as the layers, say), that is an error, not a
        silently dense "pruned" model.
        """
        lo, hi = 0.0, 0.95
        reached = False
        for _ in range(12):
            mid = (lo + hi) / 2
            trial = copy.deepcopy(self.model)
            pruner = self._make_pruner(trial, mid, 1)
            if self.importance == "taylor":
                self._taylor_gradients(trial)
            pruner.step()
            if self._fraction(trial) > self.keep:
                lo = mid
            else:
                hi, reached = mid, True
        if not reached:
            hint = f"a smaller round_to than {self.round_to}" if self.round_to else "a larger one"
            raise ConfigError(
                f"channel pruning cannot reach {self.keep:.0%} of the dense {self.measure} "
                f"(even pruning 95% of each layer's channels keeps more); use {hint}, or a "
                "less aggressive target"
            )
        return hi

    def _taylor_gradients(self, model: nn.Module) -> None:
        model.zero_grad()
        model(self.example).logsumexp(dim=1).sum().backward()

    def step(self, grad_batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
        """Prune one step (Taylor needs a labelled batch for its gradients)."""
        if self.done >= self.steps:
            raise RuntimeError("all pruning steps are done")
        gradients = None
        if self.importance == "taylor":

            def gradients() -> None:
                """Gradients for Taylor importance, in eval mode.

                Eval mode leaves BatchNorm's running statistics alone (the global
                ranking asks once per removed chunk) and takes Dropout's noise out of
                the scores.
                """
                was_training = self.model.training
                self.model.eval()
                try:
                    self.model.zero_grad()
                    if grad_batch is None:
                        self._taylor_gradients(self.model)
                    else:
                        x, y = grad_batch
                        nn.functional.cross_entropy(self.model(x), y).backward()
                finally:
                    self.model.train(was_training)

        if self.allocation == "uniform":
            if gradients is not None:
                gradients()
            self._pruner.step()
        else:
            target = 1 - (1 - self.target) * (self.done + 1) / self.steps
            if not self._global.prune_to(lambda: self._fraction(self.model) <= target, gradients):
                raise RuntimeError("global allocation ran out of channels after its check passed")
        self.model.zero_grad(set_to_none=True)
        self.done += 1
        return self.stats()

    def stats(self) -> dict[str, float]:
        macs, params = count_macs_params(self.model, self.example)
        return {
            "macs_fraction": macs / self.dense_macs,
            "params_fraction": params / self.dense_params,
            "dense_macs": float(self.dense_macs),
            "dense_params": float(self.dense_params),
            "macs": float(macs),
            "params": float(params),
        }

    def latency_report(self) -> dict[str, Any] | None:
        """The latency goal's settings, the plan's measured and the table's predicted
        speed-ups of the model as it is now (None without a latency goal)."""
        if self.goal is None:
            return None
        goal = self.goal
        predicted = goal.predicted_speedups(self.model)
        return {
            "batch": goal.batch, "threads": goal.threads,
            "target_speedup": 1 / self.keep if self.measure == "latency" else None,
            "dense_ms": {str(b): v for b, v in goal.dense_ms.items()},
            "predicted_speedup": {str(b): v for b, v in predicted.items()},
            "planned_measured_speedup": (
                {str(b): v for b, v in self.planned.items()} if self.planned else None
            ),
            "table_entries_measured": goal.measured_entries,
            "table_file": str(goal.tables[goal.batch].path),
        }  # fmt: skip


def size_vs_dense(model: nn.Module, dense: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """MACs and parameters of ``model`` and of its ``dense`` original, and their ratio."""
    dense_macs, dense_params = count_macs_params(dense, example)
    macs, params = count_macs_params(model, example)
    return {"dense_macs": dense_macs, "macs": macs, "macs_fraction": macs / dense_macs,
            "dense_params": dense_params, "params": params,
            "params_fraction": params / dense_params}  # fmt: skip


class KeepAllMasker(Masker):
    """No unstructured sparsity: the fine-tuning masker between channel-pruning steps."""

    name = "keep-all"
    description = "every weight kept (dense fine-tuning)"

    def __init__(self, config: MaskerConfig | None = None) -> None:
        super().__init__(config or MaskerConfig())

    def initial_masks(self) -> dict[str, torch.Tensor]:
        return {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}


def module_structure(model: nn.Module) -> dict[str, dict[str, int]]:
    """Size attributes of every conv/linear/norm module (integers only)."""
    structure = {}
    for name, module in model.named_modules():
        attrs = _SIZE_ATTRS.get(type(module))
        if attrs:
            structure[name] = {a: int(getattr(module, a)) for a in attrs}
    return structure


def apply_structure_(
    model: nn.Module, structure: dict[str, dict[str, int]], state: dict[str, torch.Tensor]
) -> None:
    """Resize ``model``'s modules to ``structure`` and its tensors to ``state``'s shapes."""
    for name, attrs in structure.items():
        module = model.get_submodule(name)
        for attr, value in attrs.items():
            setattr(module, attr, value)
        prefix = f"{name}." if name else ""
        for pname, param in list(module.named_parameters(recurse=False)):
            shape = state[prefix + pname].shape
            if param.shape != shape:
                setattr(module, pname, nn.Parameter(param.new_empty(shape)))
        for bname, buf in list(module.named_buffers(recurse=False)):
            if (
                buf is not None
                and prefix + bname in state
                and buf.shape != state[prefix + bname].shape
            ):
                module.register_buffer(bname, buf.new_empty(state[prefix + bname].shape))
