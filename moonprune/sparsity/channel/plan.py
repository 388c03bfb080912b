"""What the ``latency`` allocation decides: the target, the measured candidates, the plan.

:class:`ChannelPlan` is the width of every layer that the pruning steps reach
(:meth:`moonprune.sparsity.channel.pruner.ChannelPruner.step`), with what the pruned
network measured before training. It is found once, before training, by
:func:`moonprune.sparsity.channel.search.search_plan`; under ``torchrun`` rank 0's
plan is sent to every rank (:func:`broadcast_plan`); a resumed run takes the plan
from its training state (:meth:`ChannelPlan.state_dict`), so nothing is timed again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from moonprune.errors import ConfigError
from moonprune.sparsity.channel.structure import layer_widths


@dataclass(frozen=True)
class Target:
    """What the widths must achieve: ``kind`` is ``auto``, ``speedup`` (``value`` =
    X at the deployment batch), ``macs`` or ``params`` (``value`` = the kept fraction)."""

    kind: str
    value: float = 0.0


@dataclass(frozen=True)
class Candidate:
    grid: int
    macs_fraction: float
    params_fraction: float
    widths: dict[str, int]
    speedup: dict[int, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"grid": self.grid, "macs_fraction": self.macs_fraction,
                "params_fraction": self.params_fraction,
                "speedup": {str(b): v for b, v in self.speedup.items()}}  # fmt: skip


@dataclass(frozen=True)
class ChannelPlan:
    """The widths to reach (output channels of every conv/linear layer, by module
    name), with what the pruned network measured before training."""

    widths: dict[str, int]
    grid: int
    batch: int
    threads: int
    speedup: dict[int, float]
    candidates: tuple[dict[str, Any], ...] = ()
    seconds: float = 0.0  # how long the search took

    def as_dict(self) -> dict[str, Any]:
        """The report's view (``structure.plan`` in report.json)."""
        return {"grid": self.grid, "batch": self.batch, "threads": self.threads,
                "speedup_before_training": {str(b): v for b, v in self.speedup.items()},
                "widths": dict(self.widths), "candidates": list(self.candidates),
                "search_s": self.seconds}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """Every field, as plain containers (loadable with ``weights_only=True``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ChannelPlan:
        """The plan :meth:`state_dict` saved."""
        return cls(**{**state, "candidates": tuple(state["candidates"])})


def broadcast_plan(plan: ChannelPlan | None, model: nn.Module, dist: Any, batch: int,
                   threads: int) -> ChannelPlan | None:  # fmt: skip
    """Rank 0's plan on every rank: measured once, not once per rank (the measurements
    could differ, and so the widths). Every rank calls it; rank 0 passes its plan, or
    None when planning failed there, and then the other ranks stop with an error too.
    ``model`` is the dense network (the same on every rank)."""
    if not dist.enabled:
        return plan
    names = sorted(layer_widths(model))
    values = [0.0] * (4 + len(names))
    if dist.is_main and plan is not None:
        values = [1.0, float(plan.grid), plan.speedup[1], plan.speedup[plan.batch]]
        values += [float(plan.widths[n]) for n in names]
    shared = dist.all_reduce_sum(values)
    if dist.is_main:
        return plan
    if shared[0] != 1.0:
        raise ConfigError("rank 0 could not plan the channel widths (see its error)")
    widths = {n: int(v) for n, v in zip(names, shared[4:], strict=True)}
    return ChannelPlan(widths, int(shared[1]), batch, threads, {1: shared[2], batch: shared[3]})
