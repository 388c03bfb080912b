"""Assess one model on the ID splits and the OOD sets: metrics, threshold, intervals.

Shared by ``compress`` (dense and compressed side by side) and ``verify``. The model
runs once per data set; every number is computed from those logits:

- metrics on the ID *test* split vs each OOD set (:func:`evaluate_logits`);
- the rejection threshold on the ID *validation* split (accepts ``tpr`` of it), with
  the ID acceptance and the per-OOD rejection it gives;
- seeded bootstrap 95% intervals for AUROC and FPR95 per OOD set;
- the raw scores and confidences, kept for the HTML report's plots.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from moonprune.data import ImageSet, Splits
from moonprune.reliability import (
    auroc,
    bootstrap_ci,
    calibrate_threshold,
    collect_logits,
    compute_score,
    evaluate_logits,
    fpr_at_tpr,
    known_probabilities,
)


@dataclass
class Assessment:
    """What one model did; ``as_dict`` is the report's view (no raw arrays)."""

    metrics: dict[str, Any]
    threshold: float
    acceptance: dict[str, Any]
    ci: dict[str, dict[str, list[float]]]
    scores: dict[str, np.ndarray] = field(repr=False)
    id_confidence: np.ndarray = field(repr=False)
    id_correct: np.ndarray = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {**self.metrics, "threshold": self.threshold, "acceptance": self.acceptance,
                "ci": self.ci}  # fmt: skip


def assess(
    model: nn.Module,
    splits: Splits,
    ood: Mapping[str, ImageSet],
    *,
    score: str = "msp",
    tpr: float = 0.95,
    ece_bins: int = 15,
    n_boot: int = 200,
    seed: int = 0,
    threshold: float | None = None,
) -> Assessment:
    """Evaluate ``model``; calibrate the threshold on val unless ``threshold`` is given."""
    k = splits.num_classes
    test_logits = collect_logits(model, splits.test.x)
    val_logits = collect_logits(model, splits.val.x)
    ood_logits = {name: collect_logits(model, s.x) for name, s in ood.items()}
    metrics = evaluate_logits(
        test_logits, splits.test.y, ood_logits, k, score=score, ece_bins=ece_bins, tpr=tpr
    ).as_dict()

    def scores_of(logits: torch.Tensor) -> np.ndarray:
        return compute_score(logits, k, score).detach().cpu().double().numpy()

    scores = {"id_test": scores_of(test_logits), "id_val": scores_of(val_logits)}
    scores.update({name: scores_of(logits) for name, logits in ood_logits.items()})
    if threshold is None:
        threshold = calibrate_threshold(scores["id_val"], tpr)
    acceptance = {
        "id_val_accepted": float((scores["id_val"] >= threshold).mean()),
        "id_test_accepted": float((scores["id_test"] >= threshold).mean()),
        "ood_rejected": {name: float((scores[name] < threshold).mean()) for name in ood},
    }
    ci = {
        name: {
            "auroc": list(bootstrap_ci(scores["id_test"], scores[name], auroc, n_boot, seed)),
            "fpr95": list(
                bootstrap_ci(
                    scores["id_test"], scores[name], partial(fpr_at_tpr, tpr=tpr), n_boot, seed
                )
            ),
        }
        for name in ood
    }
    known = known_probabilities(test_logits.double(), k)
    return Assessment(
        metrics=metrics,
        threshold=float(threshold),
        acceptance=acceptance,
        ci=ci,
        scores=scores,
        id_confidence=known.amax(dim=-1).numpy(),
        id_correct=(known.argmax(dim=-1) == splits.test.y).numpy(),
    )
