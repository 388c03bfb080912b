"""Timing candidate widths as they will be deployed: inside the rejector.

The speed-up a user gets is that of the exported file, which wraps the network in the
in-graph rejector (:class:`~moonprune.exporters.rejector.RejectingClassifier`): the
OOD score, and for a feature score (``mahalanobis++``, ``mahalanobis``, ``knn``) its
matrix products over the classifier's input. That work does not shrink with the
channels, so a bare network overstates the deployed speed-up, most for small networks
pruned hard (issue 20: the plain CNN's plan measured 1.82x at batch 64 where the
deployed file gave 1.55x).

So the search times each candidate, and the dense network, wrapped in a *stand-in*
rejector: the deployed score, with statistics of the deployed shapes (class means
``(K, D)``, whitening ``(D, D)``, a bank of ``min(training rows, --feature-bank)``
unit rows, ``D`` the candidate's classifier input width) but random values. The graph's
work depends on those shapes only; the real statistics are fitted after training, on
the final weights. Exported by the fast TorchScript exporter
(:func:`moonprune.speed.export_bare`; the deployed file uses the dynamo exporter):
``benchmarks/structured.py`` reports how closely what the plan measured predicts the
deployed file, per architecture and batch size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from moonprune.conventions import UNKNOWN_ROW_ATTR
from moonprune.reliability.features import FeatureStats, tapped_input
from moonprune.reliability.scores import is_feature_score
from moonprune.sparsity.channel.search import Timer


@dataclass(frozen=True)
class DeployedRejector:
    """The shape of the rejector the exported file will carry.

    ``score`` the deployed OOD score, ``bank_rows`` the KNN bank's rows
    (``min(training rows, --feature-bank)``), ``knn_k`` its k.
    """

    score: str
    head_layer: str
    bank_rows: int
    knn_k: int

    def wrap(self, model: nn.Module, example: torch.Tensor) -> nn.Module:
        """``model`` inside a rejector of this shape (stand-in statistics), eval mode."""
        from moonprune.exporters.rejector import RejectingClassifier

        head = model.get_submodule(self.head_layer)
        with torch.no_grad(), tapped_input(head) as seen:  # one pass: outputs and D
            outputs = int(model.eval()(example[:2]).shape[1])
        unknown = getattr(head, UNKNOWN_ROW_ATTR, None)
        num_known = unknown if isinstance(unknown, int) else outputs
        stats, layer = None, None
        if is_feature_score(self.score):
            stats = stand_in_stats(num_known, int(seen[0].shape[1]), self.bank_rows, self.knn_k)
            layer = self.head_layer
        return RejectingClassifier(model, num_known, 0.5, self.score, 1.0, None, stats,
                                   layer).eval()  # fmt: skip

    def timer(self, base: Timer) -> Timer:
        """``base`` (a bare-network timer) applied to the wrapped networks."""

        def timed(
            dense: nn.Module, candidates: Mapping[str, nn.Module], example: torch.Tensor,
            batches: tuple[int, ...], threads: int,
        ) -> dict[str, dict[int, float]]:  # fmt: skip
            wrapped = {name: self.wrap(net, example) for name, net in candidates.items()}
            return base(self.wrap(dense, example), wrapped, example, batches, threads)

        return timed


def stand_in_stats(num_known: int, dim: int, bank_rows: int, k: int) -> FeatureStats:
    """Feature statistics of the deployed shapes with random values (seeded): what a
    fitted :class:`FeatureStats` puts in the graph, for timing only."""
    g = torch.Generator().manual_seed(0)

    def unit(rows: int) -> torch.Tensor:
        r = torch.randn(rows, dim, generator=g)
        return r / r.norm(dim=1, keepdim=True)

    def whitening() -> torch.Tensor:
        return torch.randn(dim, dim, generator=g) / dim**0.5

    means = torch.randn(num_known, dim, generator=g)
    return FeatureStats(means, whitening(), unit(bank_rows), min(k, bank_rows),
                        unit(num_known), whitening())  # fmt: skip
