"""The ``uniform`` channel allocation: every layer loses the same fraction of its channels.

Torch-Pruning's ``MetaPruner`` (local pruning, ``steps`` iterative steps) does the
pruning; the ratio that reaches the target is found by bisection on copies
(:meth:`UniformAllocator.solve_ratio`). Used by
:class:`moonprune.sparsity.channel.pruner.ChannelPruner` with ``allocation="uniform"``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moonprune.errors import ConfigError
from moonprune.sparsity.channel.structure import require_torch_pruning


class UniformAllocator:
    """``MetaPruner`` at the ratio that keeps ``keep`` of the dense measure.

    ``fraction(net)`` is the kept fraction of ``net`` (MACs or parameters, as
    ``measure`` says); ``taylor(net)``, when given, fills ``net``'s gradients for a
    Taylor importance; ``new_importance()`` makes the importance.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, head_layer: str, *,
                 keep: float, measure: str, steps: int, round_to: int | None,
                 new_importance: Callable[[], Any], fraction: Callable[[nn.Module], float],
                 taylor: Callable[[nn.Module], None] | None) -> None:  # fmt: skip
        self.model, self.example, self.head_layer = model, example, head_layer
        self.keep, self.measure, self.round_to = keep, measure, round_to
        self.new_importance, self.fraction, self.taylor = new_importance, fraction, taylor
        self.ratio = self.solve_ratio()
        self.pruner = self._make_pruner(model, self.ratio, steps)

    def _make_pruner(self, model: nn.Module, ratio: float, steps: int) -> Any:
        tp = require_torch_pruning()
        return tp.pruner.MetaPruner(
            model, self.example, importance=self.new_importance(), pruning_ratio=ratio,
            iterative_steps=steps, ignored_layers=[model.get_submodule(self.head_layer)],
            round_to=self.round_to,
        )  # fmt: skip

    def solve_ratio(self) -> float:
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
            if self.taylor is not None:
                self.taylor(trial)
            pruner.step()
            if self.fraction(trial) > self.keep:
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

    def step(self) -> None:
        """One iterative step (gradients for a Taylor importance already filled)."""
        self.pruner.step()

    def resume_after(self, done: int) -> None:
        """Continue after ``done`` steps of an interrupted run: call it while the model is
        still dense, before it is re-shaped.

        ``MetaPruner`` counts every layer's initial channels on its first step and prunes
        each later step relative to them, so that first step is run dry here (ranked,
        nothing removed: Torch-Pruning's interactive mode, without pruning any group)
        before the step count is set.
        """
        if self.taylor is not None:
            self.taylor(self.model)
        for _group in self.pruner.step(interactive=True):
            pass
        self.model.zero_grad(set_to_none=True)
        self.pruner.current_step = done
