"""Assess one model on the ID splits and the OOD sets: metrics, threshold, intervals.

Shared by ``compress`` (dense and compressed side by side) and ``verify``. The model
runs once per data set; every number is computed from those logits:

- metrics on the ID *test* split vs each OOD set (:func:`evaluate_logits`), with one
  :class:`~moonprune.reliability.options.EvalOptions` record (score, TPR, ECE bins,
  bootstrap size and seed) for every step;
- an optional temperature T (fitted on the validation split, or given), applied
  before every probability and score;
- the rejection threshold on the ID *validation* split (accepts ``tpr`` of it), with
  the ID acceptance and the per-OOD rejection it gives;
- seeded bootstrap 95% intervals for AUROC and FPR95 per OOD set;
- AUROC and FPR95 of *every* score (logit and feature scores), so a user sees which
  one works on their data; the chosen ``score`` is the one the threshold is set on;
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
from moonprune.errors import CheckpointError, ConfigError
from moonprune.feature_scores import FeatureOptions, FeatureScores, collect_outputs
from moonprune.reliability import (
    auroc,
    bootstrap_ci,
    calibrate_threshold,
    compute_score,
    evaluate_logits,
    fpr_at_tpr,
    known_probabilities,
    ood_metrics,
)
from moonprune.reliability.features import FeatureStats
from moonprune.reliability.options import EvalOptions
from moonprune.reliability.registry import SCORES
from moonprune.reliability.scores import is_feature_score


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
    #: AUROC and FPR95 of every available score: ``{score: {ood: {"auroc", "fpr95"}}}``.
    score_table: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    #: The feature statistics the feature scores used (None without a final linear layer).
    feature_stats: FeatureStats | None = field(default=None, repr=False)
    #: The ECE's bins (the report's reliability diagram uses the same ones).
    ece_bins: int = 15

    def as_dict(self) -> dict[str, Any]:
        return {**self.metrics, "threshold": self.threshold, "acceptance": self.acceptance,
                "ci": self.ci, "temperature": self.temperature,
                "temperature_fit": self.temperature_record()}  # fmt: skip

    def temperature_record(self) -> dict[str, Any] | None:
        """The report's ``temperature_fit``: what was fitted, used, and why not."""
        return None if self.temperature_fit is None else self.temperature_fit.as_dict()


@dataclass
class ModelLogits:
    """One forward pass of a model over the test and validation splits and OOD sets,
    with the feature scores of the same rows (keyed ``id_test``, ``id_val``, OOD name)."""

    test: torch.Tensor
    val: torch.Tensor
    ood: dict[str, torch.Tensor]
    features: FeatureScores | None = None


def collect(
    model: nn.Module,
    splits: Splits,
    ood: Mapping[str, ImageSet],
    *,
    feature_stats: FeatureStats | None = None,
    fit_on: ImageSet | None = None,
    options: FeatureOptions | None = None,
) -> ModelLogits:
    """Run ``model`` once over everything an assessment needs. The feature scores use
    ``feature_stats`` (a checkpoint's), else statistics fitted on ``fit_on`` (default:
    the training split) with ``options``."""
    if feature_stats is None and fit_on is None:
        fit_on = splits.train
    sets = {"id_test": splits.test.x, "id_val": splits.val.x, **{n: s.x for n, s in ood.items()}}
    logits, features = collect_outputs(model, sets, splits.num_classes, train=fit_on,
                                       stats=feature_stats, options=options)  # fmt: skip
    ood_logits = {name: logits[name] for name in ood}
    return ModelLogits(logits["id_test"], logits["id_val"], ood_logits, features)


def assess(
    model: nn.Module,
    splits: Splits,
    ood: Mapping[str, ImageSet],
    options: EvalOptions | None = None,
    *,
    threshold: float | None = None,
    temperature: str | float = 1.0,
    feature_stats: FeatureStats | None = None,
    fit_on: ImageSet | None = None,
) -> Assessment:
    """Evaluate ``model`` with ``options`` (default :class:`EvalOptions`):
    :func:`collect`, then the temperature (``"auto"`` fits T on the validation split),
    then :func:`assess_logits`. Feature scores use ``feature_stats``, else fit them on
    ``fit_on`` (default: the training split) as :func:`collect` does.

    Example::

        >>> import moonprune
        >>> splits = moonprune.load_splits("digits:0-2")
        >>> noise = {"noise": moonprune.load_ood("noise", splits.preprocessing)}
        >>> model = moonprune.models.demo_cnn(num_classes=3, width=4)
        >>> result = moonprune.assess(model, splits, noise, moonprune.EvalOptions(n_boot=20))
        >>> sorted(result.metrics["ood"]["noise"])
        ['aupr_in', 'aupr_out', 'auroc', 'fpr95']
    """
    logits = collect(model, splits, ood, feature_stats=feature_stats, fit_on=fit_on)
    choice = choose_temperature(temperature, logits.val, splits.val.y)
    return assess_logits(logits, splits, options, threshold=threshold, temperature=choice)


def assess_logits(
    logits: ModelLogits,
    splits: Splits,
    options: EvalOptions | None = None,
    *,
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
    options = options or EvalOptions()
    score, tpr, n_boot, seed = options.score, options.tpr, options.n_boot, options.seed
    if not isinstance(temperature, TemperatureChoice):
        temperature = TemperatureChoice(temperature, None, float(temperature))
    k = splits.num_classes
    t = temperature.used
    scores = score_sets(logits, k, score, t)
    metrics = evaluate_logits(
        logits.test / t, splits.test.y, {n: v / t for n, v in logits.ood.items()}, k, options,
        scores=scores if is_feature_score(score) else None,
    ).as_dict()  # fmt: skip
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
        score_table=score_table(logits, k, t, tpr),
        feature_stats=None if logits.features is None else logits.features.stats,
        ece_bins=options.ece_bins,
    )


def score_sets(logits: ModelLogits, k: int, score: str, t: float) -> dict[str, np.ndarray]:
    """``(N,)`` float64 scores ``score`` of ``id_test``, ``id_val`` and each OOD set; a
    logit score at temperature ``t``, a feature score from ``logits.features``."""
    if is_feature_score(score):
        if logits.features is None:
            raise ConfigError(
                f"the {score!r} score reads the input of the model's final nn.Linear, and "
                "this model has none; choose a logit score (msp, energy, max_logit, unknown)"
            )
        if score not in logits.features.values:  # statistics saved before the score existed
            raise CheckpointError(
                f"the model's feature statistics were saved before the {score!r} score "
                "existed; recreate it with `moonprune compress`, or choose another --score"
            )
        return dict(logits.features.values[score])

    def of(values: torch.Tensor) -> np.ndarray:
        return compute_score(values, k, score, t).detach().cpu().double().numpy()

    return {"id_test": of(logits.test), "id_val": of(logits.val),
            **{name: of(values) for name, values in logits.ood.items()}}  # fmt: skip


def score_table(
    logits: ModelLogits, k: int, t: float, tpr: float
) -> dict[str, dict[str, dict[str, float]]]:
    """AUROC and FPR95 (ID test vs each OOD set) of every score this model offers: the
    logit scores at ``t`` (``unknown`` only with the K+1 head) and the feature scores."""
    has_unknown = logits.test.shape[-1] == k + 1
    names = [n for n in SCORES.names("logits") if SCORES.get(n).available(has_unknown, False)]
    names += list(logits.features.values) if logits.features is not None else []
    table = {}
    for name in names:
        sets = score_sets(logits, k, name, t)
        table[name] = {
            ood: {key: ood_metrics(sets["id_test"], sets[ood], tpr).as_dict()[key]
                  for key in ("auroc", "fpr95")}
            for ood in logits.ood
        }  # fmt: skip
    return table


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
