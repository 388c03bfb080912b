"""The ``latency`` channel allocation: widths chosen by timing whole candidate networks.

What we chose, and why. NetAdapt (Yang et al., 2018) proposes pruned networks and
keeps the one whose *measured* latency meets the budget; HALP (Shen et al., 2022)
reads each layer's latency from a per-layer table and solves a knapsack. We tried the
table first: summed per-layer entries mispredicted onnxruntime's whole-graph
speed-ups by 5-52% (a layer timed alone pays the layout conversions that an inner
layer of the graph does not), which refused ordinary targets. So here the candidates
are whole networks, timed directly, and there are few of them:

- for each channel grid (onnxruntime's block, :func:`~moonprune.speed.nchwc_block`,
  and 8; or ``round_to`` alone when the user set it), the dense weights are pruned by
  the MAC-aware global ranking (:class:`~.allocation.GlobalAllocator`) to a few MAC
  fractions (``FRACTIONS``, down to 15% for ``--speedup``; for ``auto`` not below
  ``AUTO_MIN_FRACTION``; for a MAC or parameter target, that target);
- every candidate is timed against the dense network at batch 1 and the deployment
  batch (:func:`moonprune.speed.measure_speedups`); ``compress`` wraps both in a stand-in
  of the deployed rejector first (:mod:`~.deployed_timing`), the API's default timer
  times them bare;
- for ``--speedup X`` the gap between the two candidates around ``X`` on one grid is
  bisected (a new MAC fraction interpolated on the measured speed-ups) up to
  ``REFINEMENTS`` times, until one is within ``AIM`` of ``X``; if none is, then
  NetAdapt's own move, up to ``NETADAPT_ROUNDS`` rounds: from the fastest candidate still
  slower than ``X`` not yet a base, each layer group narrowed by one grid step on its own
  (:func:`_neighbours`). The global ranking narrows the layers in one order, so its
  candidates can jump over ``X`` (plain CNN of ``benchmarks/structured.py``: 1.71x at 51%
  of the MACs, 2.54x at 26%). AIM is half the tolerance: the deployed file lands a
  median 5% from its plan; a plan at the edge (1.85x for 2x) gave a file 12% short.

Which candidate is kept (:func:`choose`): ``auto`` (``--method channel`` with no
target): the least-pruned one at least ``DEFAULT_SPEEDUP[batch]`` faster at both
batches, else the fastest one when it is ``FALLBACK_SPEEDUP`` faster at both, else an
error before training. ``--speedup X``: the one nearest ``X`` at the deployment
batch among those faster than dense at batch 1. A MAC or parameter target: the
fastest grid, unless even that is measurably slower than dense at either batch (an
MLP at batch 1 may be no faster: a smaller file is still what the user asked for). What is kept is a
:class:`~moonprune.sparsity.channel.plan.ChannelPlan`: the width of every layer, which
the pruning steps then reach (:meth:`moonprune.sparsity.channel.pruner.ChannelPruner.step`),
so the trained network has exactly the measured shape.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

import torch
from torch import nn

from moonprune.errors import ConfigError
from moonprune.sparsity.channel.allocation import GlobalAllocator, group_roots, prune_to_widths_
from moonprune.sparsity.channel.plan import Candidate, ChannelPlan, Target
from moonprune.sparsity.channel.structure import layer_widths, require_torch_pruning

logger = logging.getLogger(__name__)
FRACTIONS = (0.8, 0.65, 0.5, 0.4, 0.3, 0.2, 0.15)  # MAC fractions of the candidates per grid
#: ``auto`` (no target) never keeps less than this share of the MACs: in
#: benchmarks/structured.py ResNet-20 at 15% reached 1.87x at batch 64 but lost 5 accuracy
#: points and 16 of mean AUROC; the narrower candidates serve an explicit ``--speedup``
AUTO_MIN_FRACTION = 0.3
TOLERANCE = 0.10  # a --speedup target is met within 10%
AIM = 0.05  # the search stops early only on a candidate this near (module docstring)
REFINEMENTS = 4  # 2 left the plain CNN's 48%-38% bracket (1.71x-2.37x) unsplit
NETADAPT_ROUNDS = 3
NEVER_SLOWER = 1.05  # faster than dense by this margin (timing noise) at every batch
FALLBACK_SPEEDUP = 1.1  # auto: the fastest candidate, when at least this at both batches
DEFAULT_SPEEDUP = {"batch 1": 1.5, "deployment batch": 1.8}  # auto: issue 20's acceptance
Timer = Callable[[nn.Module, Mapping[str, nn.Module], torch.Tensor, tuple[int, ...], int],
                 dict[str, dict[int, float]]]  # fmt: skip


class _Search:
    """Candidates for one dense network; see the module docstring."""

    def __init__(self, model: nn.Module, example: torch.Tensor, head_layer: str,
                 fraction: Callable[[nn.Module], tuple[float, float]], batch: int,
                 threads: int, timer: Timer) -> None:  # fmt: skip
        self.model, self.example, self.head = model, example, head_layer
        self.fraction, self.batch, self.threads, self.timer = fraction, batch, threads, timer
        self.batches = tuple(dict.fromkeys((1, batch)))
        self.roots: set[str] | None = None  # layer-group roots, found on first use

    def prune(self, grid: int, fractions: tuple[float, ...], measure: str) -> list[Candidate]:
        """Pruned copies at each fraction on ``grid`` (fewer when the grid runs out)."""
        tp = require_torch_pruning()
        trial = copy.deepcopy(self.model)
        importance = tp.importance.MagnitudeImportance(p=2)
        allocator = GlobalAllocator(trial, self.example, self.head, importance, grid, measure)
        found = []
        if measure == "macs":  # the allocator's own count: no full count per chunk
            dense = allocator.total()

            def kept() -> float:
                return allocator.total() / dense
        else:

            def kept() -> float:
                return self.fraction(trial)[1]

        for target in sorted(fractions, reverse=True):

            def done(t: float = target) -> bool:
                return kept() <= t

            def exact(t: float = target) -> bool:
                return self.fraction(trial)[0 if measure == "macs" else 1] <= t

            # the cheap count first, then the exact one (a few more chunks at most)
            reached = allocator.prune_to(done, None) and allocator.prune_to(exact, None)
            if reached or len(fractions) > 1:  # else the floor: the grid's narrowest
                macs, params = self.fraction(trial)
                found.append(Candidate(grid, macs, params, layer_widths(trial)))
            if not reached:
                break
        return found

    def time(self, candidates: list[Candidate]) -> list[Candidate]:
        """The candidates with their measured speed-ups (networks rebuilt from widths)."""
        nets = {str(i): self.build(c) for i, c in enumerate(candidates)}
        measured = self.timer(self.model, nets, self.example, self.batches, self.threads)
        return [replace(c, speedup=measured[str(i)]) for i, c in enumerate(candidates)]

    def narrowed(self, base: Candidate) -> list[Candidate]:
        """``base`` with one layer group at a time one grid step narrower (new widths
        only; one network per group: its root's width is the one pruning reads)."""
        if self.roots is None:
            self.roots = group_roots(self.model, self.example, self.head)
        made: list[Candidate] = []
        for name, width in base.widths.items():
            narrower = (width - 1) // base.grid * base.grid
            if name == self.head or name not in self.roots or narrower < base.grid:
                continue
            trial = self.build(replace(base, widths={**base.widths, name: narrower}))
            widths = layer_widths(trial)
            if widths != base.widths and all(widths != c.widths for c in made):
                macs, params = self.fraction(trial)
                made.append(Candidate(base.grid, macs, params, widths))
        return made

    def build(self, candidate: Candidate) -> nn.Module:
        """The dense network pruned to ``candidate``'s widths (magnitude ranking)."""
        tp = require_torch_pruning()
        trial = copy.deepcopy(self.model)
        prune_to_widths_(trial, self.example, self.head, candidate.widths,
                         tp.importance.MagnitudeImportance(p=2))  # fmt: skip
        return trial


def search_plan(model: nn.Module, example: torch.Tensor, head_layer: str, target: Target, *,
                grids: tuple[int, ...], batch: int, threads: int,
                fraction: Callable[[nn.Module], tuple[float, float]],
                timer: Timer) -> ChannelPlan:  # fmt: skip
    """Measure candidates for ``target`` and return the chosen plan (see the module
    docstring); a ConfigError before any training when none will do.

    ``fraction(net)`` is ``(MAC fraction, parameter fraction)`` of the dense network.
    """
    start = time.perf_counter()
    search = _Search(model, example, head_layer, fraction, batch, threads, timer)
    if target.kind == "speedup":
        fractions: tuple[float, ...] = FRACTIONS
    elif target.kind == "auto":
        fractions = tuple(f for f in FRACTIONS if f >= AUTO_MIN_FRACTION)
    else:
        fractions = (target.value,)
    measure = "params" if target.kind == "params" else "macs"
    candidates: list[Candidate] = []
    for grid in dict.fromkeys(grids):
        for c in search.prune(grid, fractions, measure):
            if all(c.widths != o.widths for o in candidates):
                candidates.append(c)
    if not candidates:
        what = "parameters" if measure == "params" else "MACs"
        raise ConfigError(
            f"channel pruning cannot reach {target.value:.0%} of the dense {what} with channel "
            f"counts on a grid of {min(grids)}; use a smaller --round-to, --allocation global, "
            "or a less aggressive target"
        )
    candidates = search.time(candidates)
    logger.debug("measured candidates: %s", [c.as_dict() for c in candidates])
    if target.kind == "speedup":
        candidates = _close_in(search, candidates, target.value)
    chosen = choose(candidates, target, batch)
    logger.info("channel plan: grid %d, %.0f%% MACs, measured %s", chosen.grid,
                100 * chosen.macs_fraction, chosen.speedup)  # fmt: skip
    return ChannelPlan(chosen.widths, chosen.grid, batch, threads, chosen.speedup,
                       tuple(c.as_dict() for c in candidates),
                       time.perf_counter() - start)  # fmt: skip


def _close_in(search: _Search, found: list[Candidate], want: float) -> list[Candidate]:
    """``found`` plus candidates timed to close in on ``want`` (module docstring)."""
    found = list(found)
    for _ in range(REFINEMENTS):
        if (extra := _refinement(search, found, want)) is None:
            break
        found += search.time([extra])
    used: list[Candidate] = []
    for _ in range(NETADAPT_ROUNDS):
        if not (proposals := _neighbours(search, found, want, used)):
            break
        found += search.time(proposals)
    return found


def _met(found: list[Candidate], want: float, batch: int) -> bool:
    """Whether a candidate measured within ``AIM`` of ``want`` at ``batch``."""
    return any(abs(c.speedup[batch] - want) <= AIM * want for c in found)


def _refinement(search: _Search, found: list[Candidate], want: float) -> Candidate | None:
    """A candidate between the two around ``want`` on one grid, or None when one is
    within tolerance already (or no pair brackets it)."""
    b = search.batch
    if _met(found, want, b):
        return None
    pairs = [(lo, hi) for lo in found for hi in found
             if lo.grid == hi.grid and lo.macs_fraction > hi.macs_fraction
             and lo.speedup[b] < want < hi.speedup[b]]  # fmt: skip
    # the tightest bracket first; one whose interpolated fraction lands on widths
    # already timed (a grid's step can jump past the gap) gives way to the next
    for lo, hi in sorted(pairs, key=lambda p: p[0].macs_fraction - p[1].macs_fraction):
        share = (want - lo.speedup[b]) / (hi.speedup[b] - lo.speedup[b])
        at = lo.macs_fraction + share * (hi.macs_fraction - lo.macs_fraction)
        made = search.prune(lo.grid, (at,), "macs")
        if made and all(made[0].widths != c.widths for c in found):
            return made[0]
    return None


def _neighbours(search: _Search, found: list[Candidate], want: float,
                used: list[Candidate] | None = None) -> list[Candidate]:  # fmt: skip
    """NetAdapt's proposals (:meth:`_Search.narrowed`) from the fastest candidate still
    slower than ``want`` at the deployment batch (and not slower than dense at batch 1)
    that is not in ``used`` (the bases of earlier rounds, appended to here), new widths
    only; none when a candidate is within ``AIM`` already. So the next round starts
    from the best proposal even when timing noise rated it below its base."""
    b, used = search.batch, [] if used is None else used
    if _met(found, want, b):
        return []
    slower = [c for c in found if c.speedup[b] < want and c.speedup[1] >= NEVER_SLOWER]
    for base in sorted(slower, key=lambda c: -c.speedup[b]):
        if all(base.widths != u.widths for u in used):
            used.append(base)
            made = [c for c in search.narrowed(base) if all(c.widths != o.widths for o in found)]
            if made:
                return made
    return []


def _figures(c: Candidate) -> str:
    return ", ".join(f"{v:.2f}x at batch {b}" for b, v in c.speedup.items())


def choose(candidates: list[Candidate], target: Target, batch: int) -> Candidate:
    """The candidate kept for ``target`` (module docstring); a ConfigError if none."""
    best = max(candidates, key=lambda c: (min(c.speedup.values()), c.speedup[batch]))
    hint = f"the fastest candidate measured {_figures(best)} ({best.macs_fraction:.0%} MACs)"
    if target.kind == "auto":
        wanted = [c for c in candidates if c.speedup[1] >= DEFAULT_SPEEDUP["batch 1"]
                  and c.speedup[batch] >= DEFAULT_SPEEDUP["deployment batch"]]  # fmt: skip
        if wanted:
            return max(wanted, key=lambda c: c.macs_fraction)
        if min(best.speedup.values()) >= FALLBACK_SPEEDUP:
            return best
        raise ConfigError(
            "channel pruning cannot make this network faster than the dense one at batch 1 "
            f"and batch {batch} on this machine: {hint}; for a smaller rather than faster "
            "model give --macs-target with --allocation global, or use --method rigl"
        )
    if target.kind == "speedup":
        usable = [c for c in candidates if c.speedup[1] >= NEVER_SLOWER]
        reach = max((c.speedup[batch] for c in usable), default=0.0)
        if reach < (1 - TOLERANCE) * target.value:
            raise ConfigError(
                f"channel pruning cannot reach a {target.value:.2f}x speed-up at batch {batch} "
                f"on this machine: the best measured {reach:.2f}x (among candidates not slower "
                f"at batch 1; {hint}); ask for at most that with --speedup"
            )
        nearest = min(usable, key=lambda c: abs(c.speedup[batch] - target.value))
        if abs(nearest.speedup[batch] - target.value) > TOLERANCE * target.value:
            logger.warning(
                "--speedup %.2f: no candidate measured within %.0f%% of it at batch %d; "
                "keeping the nearest, %.2fx (%.0f%% of the MACs)", target.value,
                100 * TOLERANCE, batch, nearest.speedup[batch], 100 * nearest.macs_fraction,
            )  # fmt: skip
        return nearest
    if min(best.speedup.values()) < 1 / NEVER_SLOWER:  # measurably slower somewhere
        what = "parameters" if target.kind == "params" else "MACs"
        raise ConfigError(
            f"channel pruning to {target.value:.0%} of the dense {what} makes this network "
            f"slower than the dense one on this machine ({hint}); use --speedup, or "
            "--allocation global to prune to the target regardless of speed"
        )
    return best
