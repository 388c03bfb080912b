"""Assess one model on the ID splits and the OOD sets: metrics, threshold, intervals.

Shared by ``compress`` (dense and compressed side by side) and ``verify``. The model
runs once per data set; every number is computed from those logits:

- metrics on the ID *test* split vs each OOD set (:func:`evaluate_logits`);
- an optional temperature T (fitted on the validation split, or given), applied
  before every probability and score;
- the rejection threshold on the ID *validation* split (accepts ``tpr`` of it), with
  the ID acceptance and the per-OOD rejection it gives;
- seeded bootstrap 95% intervals for AUROC and FPR95 per OOD set;
- the raw scores and confidences, kept for the HTML report's plots.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from moonprune.calibration import TemperatureChoice, choose_temperature
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
    """What one model did; ``as_dict`` is the report's view (no raw arrays).

    Example::

        >>> import moonprune, torch
        >>> splits = moonprune.load_splits("digits:0-2")
        >>> a = moonprune.assess(moonprune.models.demo_cnn(num_classes=3, width=4), splits, {})
        >>> 0.0 <= a.metrics["accuracy"] <= 1.0 and a.threshold == a.threshold
        True
    """

    metrics: dict[str, Any]
    threshold: float
    acceptance: dict[str, Any]
    ci: dict[str, dict[str, list[float]]]
    scores: dict[str, np.ndarray] = field(repr=False)
    id_confidence: np.ndarray = field(repr=False)
    id_correct: np.ndarray = field(repr=False)
    temperature: float = 1.0
    temperature_fit: TemperatureChoice | None = None
    #: p(unknown) per row of the ID test split (``"id_test"``) and of each OOD set, at the
    #: assessment's T; empty for a model without the K+1 head.
    p_unknown: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {**self.metrics, "threshold": self.threshold, "acceptance": self.acceptance,
                "ci": self.ci, "temperature": self.temperature,
                "temperature_fit": self.temperature_record()}  # fmt: skip

    def temperature_record(self) -> dict[str, Any] | None:
        """The report's ``temperature_fit``: what was fitted, used, and why not."""
        return None if self.temperature_fit is None else self.temperature_fit.as_dict()


@dataclass
class ModelLogits:
    """One forward pass of a model over the test and validation splits and OOD sets."""

    test: torch.Tensor
    val: torch.Tensor
    ood: dict[str, torch.Tensor]


def collect(model: nn.Module, splits: Splits, ood: Mapping[str, ImageSet]) -> ModelLogits:
    """Run ``model`` once over everything an assessment needs."""
    return ModelLogits(
        collect_logits(model, splits.test.x),
        collect_logits(model, splits.val.x),
        {name: collect_logits(model, s.x) for name, s in ood.items()},
    )


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
    temperature: str | float = 1.0,
) -> Assessment:
    """Evaluate ``model``; ``temperature="auto"`` fits T on the validation split.

    Example::

        >>> import moonprune
        >>> splits = moonprune.load_splits("digits:0-2")
        >>> noise = {"noise": moonprune.load_ood("noise", splits.preprocessing)}
        >>> model = moonprune.models.demo_cnn(num_classes=3, width=4)
        >>> result = moonprune.assess(model, splits, noise, n_boot=20)
        >>> sorted(result.metrics["ood"]["noise"])
        ['aupr_in', 'aupr_out', 'auroc', 'fpr95']
    """
    logits = collect(model, splits, ood)
    choice = choose_temperature(temperature, logits.val, splits.val.y)
    return assess_logits(logits, splits, score=score, tpr=tpr, ece_bins=ece_bins,
                         n_boot=n_boot, seed=seed, threshold=threshold,
                         temperature=choice)  # fmt: skip


def assess_logits(
    logits: ModelLogits,
    splits: Splits,
    *,
    score: str = "msp",
    tpr: float = 0.95,
    ece_bins: int = 15,
    n_boot: int = 200,
    seed: int = 0,
    threshold: float | None = None,
    temperature: float | TemperatureChoice = 1.0,
) -> Assessment:
    """Metrics of ``softmax(logits / temperature)``; the threshold (on val) comes after T.

    Accuracy never depends on T; ECE and NLL do; an OOD score may (MSP's ranking can
    change when the unknown column is present), so the AUROC is that of the
    temperature-scaled score, as the exported graph computes it. A
    :class:`~moonprune.calibration.TemperatureChoice` is kept on the assessment, so
    the report can say what was fitted and why it was or was not used.
    """
    if not isinstance(temperature, TemperatureChoice):
        temperature = TemperatureChoice(temperature, None, float(temperature))
    k = splits.num_classes
    t = temperature.used
    metrics = evaluate_logits(
        logits.test / t, splits.test.y, {n: v / t for n, v in logits.ood.items()}, k,
        score=score, ece_bins=ece_bins, tpr=tpr,
    ).as_dict()  # fmt: skip

    def scores_of(values: torch.Tensor) -> np.ndarray:
        return compute_score(values, k, score, t).detach().cpu().double().numpy()

    scores = {"id_test": scores_of(logits.test), "id_val": scores_of(logits.val)}
    scores.update({name: scores_of(values) for name, values in logits.ood.items()})
    if threshold is None:
        threshold = calibrate_threshold(scores["id_val"], tpr)
    names = list(logits.ood)
    acceptance = {
        "id_val_accepted": float((scores["id_val"] >= threshold).mean()),
        "id_test_accepted": float((scores["id_test"] >= threshold).mean()),
        "ood_rejected": {name: float((scores[name] < threshold).mean()) for name in names},
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
        for name in names
    }
    known = known_probabilities(logits.test.double(), k, t)
    p_unknown = unknown_probabilities(logits, k, t)
    if p_unknown:
        metrics["p_unknown"] = {name: _summary(v) for name, v in p_unknown.items()}
    return Assessment(
        metrics=metrics,
        threshold=float(threshold),
        acceptance=acceptance,
        ci=ci,
        scores=scores,
        id_confidence=known.amax(dim=-1).numpy(),
        id_correct=(known.argmax(dim=-1) == splits.test.y).numpy(),
        temperature=t,
        temperature_fit=temperature,
        p_unknown=p_unknown,
    )


def unknown_probabilities(logits: ModelLogits, k: int, t: float) -> dict[str, np.ndarray]:
    """p(unknown) = softmax(logits / T)[:, K] for the ID test rows and each OOD set
    (empty without the K+1 head): shows whether MOON's unknown output is alive."""
    if logits.test.shape[-1] != k + 1:
        return {}
    sets = {"id_test": logits.test, **logits.ood}
    return {
        name: torch.softmax(v.double() / t, dim=-1)[:, k].cpu().numpy() for name, v in sets.items()
    }


def _summary(values: np.ndarray) -> dict[str, float]:
    """Mean and quantiles (the report's view of a p(unknown) distribution)."""
    if values.size == 0:
        return {"mean": math.nan, "q10": math.nan, "q50": math.nan, "q90": math.nan}
    q10, q50, q90 = np.quantile(values, [0.1, 0.5, 0.9])
    return {"mean": float(values.mean()), "q10": float(q10), "q50": float(q50), "q90": float(q90)}
