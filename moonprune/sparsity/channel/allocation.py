"""The ``global`` channel allocation: layers compete for the channels removed.

Used by :class:`moonprune.sparsity.channel.pruner.ChannelPruner` with
``allocation="global"``, and by the ``latency`` allocation's search to prune the
candidates (:mod:`moonprune.sparsity.channel.search`).
Each round removes one chunk of ``round_to`` channels (one channel without
``round_to``) from the layer group whose least important chunk costs least importance
per MAC (or parameter) it saves, until the step's target is met. The importance lost
is counted relative to what the layer group has left, so every removal makes that
group's remaining channels dearer and no layer is emptied first just because its
channels cost the most.

With ``round_to``, a layer of ``round_to`` channels or fewer is left whole instead of
being cut to a width the runtime handles badly: onnxruntime's CPU convolutions run in
blocks of 8 (AVX2) or 16 (AVX-512) channels, so a uniformly pruned ResNet-20 with
widths [11, 22, 45] is hardly faster than the dense [16, 32, 64], while ``global``
with ``round_to=16`` keeps every width a multiple of 16 (``benchmarks/structured.py``).
Without ``round_to`` the ranking can take a costly group (the ResNet stem and first
stage) down to a third of its width at a 50% MAC target.

The ranking divides importance by cost, the greedy rule for a knapsack; this is our
choice (MOON's method says nothing about structured pruning), in the spirit of
hardware-aware pruning with a MAC budget. A chunk can overshoot a step's target; the
reached fraction is what ``ChannelPruner.stats()`` reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moonprune.errors import ConfigError
from moonprune.sparsity.channel.structure import require_torch_pruning


class CountCost:
    """MACs (``measure="macs"``: per output position) or parameters of a layer."""

    def __init__(self, positions: dict[nn.Module, int], measure: str) -> None:
        self.positions, self.measure = positions, measure

    def __call__(self, m: nn.Module, d_in: int = 0, d_out: int = 0) -> float:
        positions = self.positions.get(m, 1) if self.measure == "macs" else 1
        if isinstance(m, nn.Linear):
            return (m.in_features - d_in) * (m.out_features - d_out) * positions
        if not isinstance(m, (nn.Conv1d, nn.Conv2d)):
            return 0
        k = math.prod(m.kernel_size)
        depthwise = m.groups == m.in_channels and m.groups > 1
        c_in, c_out = m.in_channels - d_in, m.out_channels - d_out
        groups = c_in if depthwise else m.groups
        return c_in // max(groups, 1) * c_out * k * positions


class GlobalAllocator:
    """Greedy, cost-aware global channel ranking (``allocation="global"``).

    A chunk's saving is computed from the modules' current sizes (``in / groups * out
    * kernel`` per output position for MACs, without the positions for parameters;
    conv and linear layers only, enough to rank); whether the target is reached is
    checked with the real count after every chunk. Groups containing a grouped (not
    depthwise) convolution are left whole.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, head_layer: str,
                 importance: Any, chunk: int, measure: str) -> None:  # fmt: skip
        tp = require_torch_pruning()
        self.model, self.importance, self.chunk, self.measure = model, importance, chunk, measure
        self.head = model.get_submodule(head_layer)
        self.positions: dict[nn.Module, int] = {}

        def record(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            if isinstance(module, nn.Linear):  # (N, ..., out): every leading position
                self.positions[module] = int(output[0].numel()) // module.out_features
            else:  # (N, C, *spatial)
                self.positions[module] = int(output[0, 0].numel()) if output.dim() > 2 else 1

        layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
        hooks = [m.register_forward_hook(record) for m in layers]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(example)
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
        self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        self._layer_cost = CountCost(self.positions, measure)

    def total(self) -> float:
        """The conv and linear layers' MACs (or parameters) as they are now: the
        ranking's count, cheaper than a full count and within a few percent of it."""
        return float(sum(self._layer_cost(m) for m in self.positions))

    def saving(self, group: Any, removed: int, width: int) -> float:
        """What removing ``removed`` of the group's ``width`` channels saves.

        A member can lose more than ``removed`` indices: a Linear after a Flatten loses
        every spatial position of each removed channel, so each dependency's share is
        scaled by how many indices it has per channel of the group.
        """
        changes: dict[nn.Module, list[int]] = {}
        for dep, idxs in group:
            m = dep.target.module
            if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                continue
            lost = removed * len(idxs) // width
            delta = changes.setdefault(m, [0, 0])
            depthwise = isinstance(m, nn.Conv2d | nn.Conv1d) and m.groups == m.in_channels > 1
            if depthwise:
                delta[0] = delta[1] = lost
            elif self.dg.is_out_channel_pruning_fn(dep.handler):
                delta[1] = lost
            else:
                delta[0] = lost
        return sum(self._layer_cost(m) - self._layer_cost(m, *d) for m, d in changes.items())

    def candidates(self) -> list[tuple[float, Any, list[int]]]:
        """``(score, group, channel indices)`` of each group's next chunk; lowest goes first."""
        found = []
        for group in self.dg.get_all_groups(ignored_layers=[self.head]):
            modules = [dep.target.module for dep, _ in group]
            if any(isinstance(m, nn.Conv1d | nn.Conv2d) and 1 < m.groups < m.in_channels
                   for m in modules):  # fmt: skip
                continue
            n = self.dg.get_out_channels(group[0].dep.target.module)
            if n is None:
                continue
            keep = (n - 1) // self.chunk * self.chunk
            if keep < self.chunk:
                continue
            saving = self.saving(group, n - keep, n)
            if saving <= 0:
                continue  # saves no MACs or parameters at all
            imp = self.importance(group)
            if imp is None:
                continue
            scores = imp.detach().cpu().clamp_min(0)
            drop = torch.argsort(scores)[: n - keep]
            lost = float(scores[drop].sum()) / (float(scores.sum()) + 1e-12)
            found.append((lost / saving, group, drop.tolist()))
        return found

    def prune_to(self, reached: Callable[[], bool], gradients: Callable[[], None] | None) -> bool:
        """Remove chunks until ``reached()``; False when no chunk is left to remove."""
        while not reached():
            if gradients is not None:
                gradients()
            candidates = self.candidates()
            if not candidates:
                return False
            _, group, idxs = min(candidates, key=lambda c: c[0])
            root = group[0].dep
            pruning = self.dg.get_pruning_group(root.target.module, root.handler, idxs)
            pruning.prune()
        return True


def prune_to_widths_(model: nn.Module, example: torch.Tensor, head_layer: str,
                     widths: dict[str, int], importance: Any) -> None:  # fmt: skip
    """Prune every layer group of ``model`` down to its width in ``widths`` (output
    channels by module name, read at the group's root layer), dropping its least
    important channels; a group already that narrow (or absent) is left alone.

    All groups are ranked before any is pruned, so a Taylor importance reads one set of
    gradients; a group's channel indices are not changed by pruning another group.
    """
    tp = require_torch_pruning()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    names = {m: n for n, m in model.named_modules()}
    cuts = []
    for group in dg.get_all_groups(ignored_layers=[model.get_submodule(head_layer)]):
        root = group[0].dep
        n = dg.get_out_channels(root.target.module)
        want = widths.get(names.get(root.target.module, ""))
        if n is None or want is None or want >= n:
            continue
        imp = importance(group)
        if imp is None:
            raise ConfigError(f"no importance for layer {names[root.target.module]!r}")
        order = torch.argsort(imp.detach().cpu())
        cuts.append((root, order[: n - want].tolist()))
    for root, idxs in cuts:
        dg.get_pruning_group(root.target.module, root.handler, idxs).prune()


def group_roots(model: nn.Module, example: torch.Tensor, head_layer: str) -> set[str]:
    """Names of the layers whose width :func:`prune_to_widths_` reads: one per layer
    group (a residual chain's members share its root's width)."""
    tp = require_torch_pruning()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    names = {m: n for n, m in model.named_modules()}
    groups = dg.get_all_groups(ignored_layers=[model.get_submodule(head_layer)])
    return {names[g[0].dep.target.module] for g in groups if g[0].dep.target.module in names}
