"""A latency goal for channel pruning: predicted from the table, checked by timing.

:class:`LatencyGoal` holds the two latency tables (batch 1 and the deployment batch,
:mod:`moonprune.latency`) and the dense network's measured latency at both. It gives
the global allocator its cost (:class:`~moonprune.latency.TableCost`) and predicts a
pruned network's latency at either batch as the measured dense latency plus the
table's change over the pruned layers.

The table sees each layer alone; in the whole graph onnxruntime keeps activations
in its blocked (NCHWc) layout between convolutions, so the prediction is off by some
percent at batch 1 and more at large batches (``benchmarks/structured.py`` states
by how much). So a latency target is calibrated once before training, NetAdapt-style
("empirical measurements" of the proposed network): the planned network is exported
and timed against the dense one (:mod:`moonprune.speed`) and the predicted target is
rescaled by what the measurement says, up to ``CALIBRATION_ROUNDS`` times, until the
measured speed-up is within ``TOLERANCE`` of the target.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moonprune.latency import LatencyTable, TableCost, input_sizes, layers_latency
from moonprune.speed import dense_latency

TOLERANCE = 0.05
CALIBRATION_ROUNDS = 3


class LatencyGoal:
    """Predicted latency of pruned copies of one dense network, at two batch sizes."""

    def __init__(self, model: nn.Module, example: torch.Tensor, batch: int, threads: int,
                 cache: Path | None = None) -> None:  # fmt: skip
        self.batch, self.threads = batch, threads
        self.batches = tuple(dict.fromkeys((1, batch)))
        self.sizes = input_sizes(model, example)
        self.tables = {b: LatencyTable(b, threads, cache) for b in self.batches}
        self.dense_layers = {
            b: layers_latency(model, self.sizes, t) for b, t in self.tables.items()
        }
        self.dense_ms = {b: dense_latency(model, example, b, threads) for b in self.batches}
        self.save()

    def save(self) -> None:
        for table in self.tables.values():
            table.save()

    @property
    def measured_entries(self) -> int:
        return sum(t.measured for t in self.tables.values())

    def cost(self, model: nn.Module) -> TableCost:
        """The allocator's cost for ``model`` (a copy of the dense one, pruned or not)."""
        weights = [(t, 1.0 / max(self.dense_layers[b], 1e-9)) for b, t in self.tables.items()]
        return TableCost(model, self.sizes, weights)

    def predicted_ms(self, model: nn.Module, batch: int) -> float:
        change = layers_latency(model, self.sizes, self.tables[batch]) - self.dense_layers[batch]
        return max(self.dense_ms[batch] + change, 1e-6)

    def fraction(self, model: nn.Module) -> float:
        """Predicted latency at the deployment batch, as a fraction of the dense one."""
        return self.predicted_ms(model, self.batch) / self.dense_ms[self.batch]

    def predicted_speedups(self, model: nn.Module) -> dict[int, float]:
        return {b: self.dense_ms[b] / self.predicted_ms(model, b) for b in self.batches}
