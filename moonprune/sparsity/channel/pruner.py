"""The channel pruner: one pruning step at a time, to a size or speed target.

Unstructured zeros make files smaller but not faster on a CPU; removing whole
channels makes every layer smaller. :class:`ChannelPruner` wraps Torch-Pruning (the
``DependencyGraph`` keeps residual additions and depthwise convolutions consistent)
with an L2-magnitude or first-order Taylor importance; the classifier (with its
unknown output) is never pruned.

The target is a speed-up (``--speedup``, or by default ``auto``), a fraction of the
dense model's MACs (``--macs-target``) or of its parameters (``--sparsity``), reached
in ``steps`` steps, each followed by MOON fine-tuning
(:mod:`moonprune.sparsity.channel.training`). How the channels to remove are shared
out between layers (``allocation``):

- ``latency`` (the default): every layer's width is chosen before training by timing
  whole candidate networks in onnxruntime on this machine
  (:mod:`moonprune.sparsity.channel.search`, which says why and how); the steps then
  reach exactly those widths, removing the least important channels.
- ``uniform``: every layer loses the same fraction of its channels (Torch-Pruning's
  ``MetaPruner``, :mod:`moonprune.sparsity.channel.uniform`); the ratio that reaches
  the target is found by bisection on copies.
- ``global``: channels from all layers compete, ranked by importance lost per MAC
  (or parameter) saved, in chunks of ``round_to``
  (:class:`moonprune.sparsity.channel.allocation.GlobalAllocator`); nothing is timed.

:meth:`ChannelPruner.state_dict` is what a resumed run needs besides the slimmer
shapes: the steps done and the plan. A resumed run builds the pruner on the fresh
dense network again (the same dense sizes, ratio or reachability check; the saved
plan, so nothing is timed twice), restores the steps done
(:meth:`ChannelPruner.load_state_dict`), then reshapes the same modules in place
(:func:`~moonprune.sparsity.channel.structure.apply_structure_`): Torch-Pruning's
graph reads the layers' current sizes at every step, so the remaining steps prune as
in an uninterrupted run.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from typing import Any

import torch
from torch import nn

from moonprune.errors import CheckpointError, ConfigError
from moonprune.sparsity.channel.allocation import GlobalAllocator, prune_to_widths_
from moonprune.sparsity.channel.plan import ChannelPlan, Target
from moonprune.sparsity.channel.search import Timer, search_plan
from moonprune.sparsity.channel.settings import channel_target
from moonprune.sparsity.channel.structure import (
    count_macs_params,
    layer_widths,
    module_structure,
    require_torch_pruning,
)
from moonprune.sparsity.channel.uniform import UniformAllocator
from moonprune.sparsity.config import SparsityConfig
from moonprune.speed import default_threads

logger = logging.getLogger(__name__)


class ChannelPruner:
    """Prunes ``model`` in place to a parameter, MAC or speed target, in ``steps`` steps.

    The lifecycle every method shares (:mod:`moonprune.sparsity.methods`): building the
    pruner prepares it (dense sizes, the allocation; the latency plan is timed here),
    :meth:`step` prunes one step, :meth:`finalize` returns the pruned structure, and
    :meth:`state_dict` / :meth:`load_state_dict` resume it.

    ``measure``: ``params`` or ``macs`` (``keep`` is the kept fraction), ``latency``
    (``keep`` is 1 / the speed-up at batch ``latency_batch``) or ``auto`` (the default
    speed-up; ``keep`` is None), the last two with the ``latency`` allocation only.
    The ``latency`` allocation chooses every layer's width before training by timing
    whole candidate networks (:mod:`moonprune.sparsity.channel.search`; or takes
    ``plan``: rank 0's under torchrun, or a resumed run's); each step then moves every
    layer a step's share of the way to its planned width, dropping its least important
    channels, so the last step gives exactly the measured shape.
    """

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        head_layer: str,
        *,
        keep: float | None,
        measure: str = "params",
        steps: int = 4,
        importance: str = "magnitude",
        round_to: int | None = None,
        allocation: str = "latency",
        latency_batch: int = 64,
        threads: int | None = None,
        plan: ChannelPlan | None = None,
        timer: Timer | None = None,
    ) -> None:
        if measure != "auto" and (keep is None or not 0.0 < keep < 1.0):
            raise ConfigError(f"the kept fraction must be in (0, 1), got {keep}")
        if measure not in ("params", "macs", "latency", "auto"):
            raise ConfigError(
                f"measure must be 'params', 'macs', 'latency' or 'auto', got {measure!r}"
            )
        if importance not in ("magnitude", "taylor"):
            raise ConfigError(f"importance must be 'magnitude' or 'taylor', got {importance!r}")
        if allocation not in ("uniform", "global", "latency"):
            raise ConfigError(
                f"allocation must be 'uniform', 'global' or 'latency', got {allocation!r}"
            )
        if measure in ("latency", "auto") and allocation != "latency":
            raise ConfigError(
                f"a speed-up target needs --allocation latency, not {allocation}; or give "
                "--macs-target / --sparsity instead"
            )
        self.model, self.example, self.head_layer = model, example[:2], head_layer
        self.keep = keep or 0.0
        self.measure, self.steps, self.importance = measure, steps, importance
        self.round_to, self.allocation = round_to, allocation
        self.dense_macs, self.dense_params = count_macs_params(model, example)
        self.done = 0
        self.ratio: float | None = None
        self.grid = round_to or 1
        self.plan = plan
        if allocation == "uniform":
            taylor = self._taylor_gradients if importance == "taylor" else None
            self._uniform = UniformAllocator(model, self.example, head_layer, keep=self.keep,
                                             measure=measure, steps=steps, round_to=round_to,
                                             new_importance=self._new_importance,
                                             fraction=self._fraction, taylor=taylor)  # fmt: skip
            self.ratio = self._uniform.ratio
        elif allocation == "global":
            self._check_reachable()
            self._global = GlobalAllocator(model, self.example, head_layer,
                                           self._new_importance(), self.grid, measure)  # fmt: skip
        else:
            if self.plan is None:
                self.plan = self._search(latency_batch, threads or default_threads(), timer)
            self.grid = self.plan.grid
            self._dense_widths = layer_widths(model)

    @classmethod
    def from_config(
        cls, model: nn.Module, example: torch.Tensor, head_layer: str, sp: SparsityConfig,
        steps: int, plan: ChannelPlan | None = None, timer: Timer | None = None,
    ) -> ChannelPruner:  # fmt: skip
        """The pruner a run's ``[sparsity]`` settings ask for, in ``steps`` steps."""
        keep, measure = channel_target(sp)
        return cls(model, example, head_layer, keep=keep, measure=measure, steps=steps,
                   importance=sp.importance, round_to=sp.round_to, allocation=sp.allocation,
                   latency_batch=sp.latency_batch, threads=sp.threads, plan=plan,
                   timer=timer)  # fmt: skip

    def _search(self, batch: int, threads: int, timer: Timer | None) -> ChannelPlan:
        """Time candidate networks before any training (on CPU copies)."""
        from moonprune.speed import measure_speedups, nchwc_block

        kind = {"latency": "speedup"}.get(self.measure, self.measure)
        target = Target(kind, 1 / self.keep if kind == "speedup" else self.keep)
        dense = copy.deepcopy(self.model).cpu()
        grids = (self.round_to,) if self.round_to else (nchwc_block(), 8)
        return search_plan(dense, self.example.cpu(), self.head_layer, target, grids=grids,
                           batch=batch, threads=threads, fraction=self._fractions,
                           timer=timer or measure_speedups)  # fmt: skip

    def _fractions(self, model: nn.Module) -> tuple[float, float]:
        macs, params = count_macs_params(model, self.example.to(next(model.parameters()).device))
        return macs / self.dense_macs, params / self.dense_params

    def _check_reachable(self) -> None:
        """Fail before any training when the global target cannot be reached.

        Pruned on a copy; the smallest reachable size does not depend on the ranking
        (every group ends at one chunk), so magnitude importance serves for Taylor too.
        """
        tp = require_torch_pruning()
        trial = copy.deepcopy(self.model)
        allocator = GlobalAllocator(trial, self.example, self.head_layer,
                                    tp.importance.MagnitudeImportance(p=2), self.grid,
                                    self.measure)  # fmt: skip
        if not allocator.prune_to(lambda: self._fraction(trial) <= self.keep, None):
            chunk = self.grid
            measure = "MACs" if self.measure == "macs" else "parameters"
            raise ConfigError(
                f"channel pruning cannot reach {self.keep:.0%} of the dense {measure}: cutting "
                f"every layer to at most {chunk} channel{'s' if chunk > 1 else ''} keeps "
                f"{self._fraction(trial):.0%}; use a smaller round_to, or a less aggressive "
                "target"
            )

    def _new_importance(self) -> Any:
        tp = require_torch_pruning()
        return (tp.importance.MagnitudeImportance(p=2) if self.importance == "magnitude"
                else tp.importance.TaylorImportance())  # fmt: skip

    def _fraction(self, model: nn.Module) -> float:
        macs, params = self._fractions(model)
        return macs if self.measure == "macs" else params

    def _taylor_gradients(self, model: nn.Module) -> None:
        model.zero_grad()
        model(self.example).logsumexp(dim=1).sum().backward()

    def _step_widths(self) -> dict[str, int]:
        """Planned widths after this step: a step's share of the way, on the grid."""
        assert self.plan is not None
        left = (self.steps - self.done - 1) / self.steps
        widths = {}
        for name, want in self.plan.widths.items():
            dense = self._dense_widths[name]
            widths[name] = min(dense, want + math.ceil((dense - want) * left / self.grid)
                               * self.grid)  # fmt: skip
        return widths

    def _gradients(self, grad_batch: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Gradients for Taylor importance, in eval mode.

        Eval mode leaves BatchNorm's running statistics alone (the global ranking asks
        once per removed chunk) and takes Dropout's noise out of the scores.
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

    def step(self, grad_batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
        """Prune one step (Taylor needs a labelled batch for its gradients)."""
        if self.done >= self.steps:
            raise RuntimeError("all pruning steps are done")
        gradients = None
        if self.importance == "taylor":
            gradients = functools.partial(self._gradients, grad_batch)
            if self.allocation != "global":  # the global ranking asks once per chunk
                gradients()
        if self.allocation == "uniform":
            self._uniform.step()
        elif self.allocation == "global":
            target = 1 - (1 - self.keep) * (self.done + 1) / self.steps
            if not self._global.prune_to(lambda: self._fraction(self.model) <= target, gradients):
                raise RuntimeError("global allocation ran out of channels after its check passed")
        else:
            prune_to_widths_(self.model, self.example, self.head_layer, self._step_widths(),
                             self._new_importance())  # fmt: skip
            planned = self.plan.widths if self.plan is not None else None
            if self.done + 1 == self.steps and layer_widths(self.model) != planned:
                raise RuntimeError("the pruned network does not have the planned widths")
        self.model.zero_grad(set_to_none=True)
        self.done += 1
        return self.stats()

    def finalize(self) -> dict[str, dict[str, int]]:
        """The lifecycle's last call (:mod:`moonprune.sparsity.methods`): every step must
        be done. Returns the pruned network's structure (module -> sizes), the record a
        checkpoint keeps to rebuild it."""
        if self.done < self.steps:
            raise RuntimeError(f"finalize after {self.done} of {self.steps} pruning steps")
        self.model.zero_grad(set_to_none=True)
        return module_structure(self.model)

    def stats(self) -> dict[str, float]:
        """The network's MACs and parameters now, also as fractions of the dense ones."""
        macs, params = count_macs_params(self.model, self.example)
        return {
            "macs_fraction": macs / self.dense_macs,
            "params_fraction": params / self.dense_params,
            "dense_macs": float(self.dense_macs),
            "dense_params": float(self.dense_params),
            "macs": float(macs),
            "params": float(params),
        }

    def state_dict(self) -> dict[str, Any]:
        """The steps done and the plan (the rest is rebuilt from the dense network)."""
        plan = None if self.plan is None else self.plan.state_dict()
        return {"done": self.done, "plan": plan, "ratio": self.ratio, "grid": self.grid}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state["done"]`` steps: call it on a pruner just built on the
        fresh dense network (with the saved plan), before the network is re-shaped to
        the shapes those steps gave it."""
        if (state["ratio"], state["grid"]) != (self.ratio, self.grid):
            raise CheckpointError(
                "the channel pruner rebuilt for --resume differs from the interrupted run's "
                f"(ratio {state['ratio']} -> {self.ratio}, grid {state['grid']} -> "
                f"{self.grid}); run without --resume to start afresh"
            )
        self.done = int(state["done"])
        if self.allocation == "uniform":
            self._uniform.resume_after(self.done)
