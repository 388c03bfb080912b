"""Reliability metrics as pure numpy functions.

OOD detection is a binary problem: the ID test set is the positive class, an OOD
set the negative one, and a score is "higher = more in-distribution"
(:mod:`moonprune.conventions`). The rejector accepts an input as in-distribution
when ``score >= threshold``. :func:`fpr_at_tpr` is the standard FPR at TPR of the
ROC curve; :func:`calibrate_threshold` deploys a threshold accepting the same ID
inputs with a margin from every validation score (see there).

``auroc``, ``aupr_in`` and ``aupr_out`` equal scikit-learn's ``roc_auc_score`` and
``average_precision_score`` (ties included) without importing it. Every function
validates its inputs and raises :class:`~moonprune.errors.DataError` for empty,
non-finite or mismatched arrays, :class:`~moonprune.errors.ConfigError` for bad
options.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from moonprune.errors import ConfigError, DataError

Scores = NDArray[np.float64]
#: ``metric(id_scores, ood_scores) -> float``, e.g. :func:`auroc`.
OODMetric = Callable[[ArrayLike, ArrayLike], float]


def _scores(values: ArrayLike, name: str) -> Scores:
    """``values`` as a non-empty, finite 1-D float64 array, or a DataError naming it."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {arr.shape}; flatten it first")
    if arr.size == 0:
        raise DataError(f"{name} is empty; metrics need at least one value")
    bad = int(np.count_nonzero(~np.isfinite(arr)))
    if bad:
        raise DataError(
            f"{name} has {bad} non-finite value(s) (NaN or inf) out of {arr.size}; "
            "the model produced NaN/inf outputs or the inputs contain them"
        )
    return arr


def _check_tpr(tpr: float) -> None:
    if not 0.0 < tpr <= 1.0:
        raise ConfigError(f"tpr must be in (0, 1], got {tpr}; e.g. 0.95")


def _same_length(a: NDArray[np.generic], b: NDArray[np.generic], names: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise DataError(f"{names} differ in length: {a.shape[0]} vs {b.shape[0]}")


def _labels(values: ArrayLike, name: str, num_classes: int | None = None) -> NDArray[np.int64]:
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.size == 0:
        raise DataError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{name} must hold integers, got dtype {arr.dtype}")
    if num_classes is not None and (arr.min() < 0 or arr.max() >= num_classes):
        raise DataError(f"{name} must lie in [0, {num_classes}), got [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int64)


def auroc(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Area under the ROC curve, ID positive.

    Mann-Whitney form: with average ranks ``r`` of the pooled scores (ties share the
    mean of their ranks), ``AUROC = (sum_{i in ID} r_i - n1 (n1 + 1) / 2) / (n1 n0)``
    ``= P(s_id > s_ood) + 0.5 P(s_id == s_ood)``; ``n1`` ID and ``n0`` OOD scores.
    """
    pos = _scores(id_scores, "id_scores")
    neg = _scores(ood_scores, "ood_scores")
    pooled = np.concatenate([pos, neg])
    order = np.argsort(pooled, kind="stable")
    ordered = pooled[order]
    starts_group = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.append(starts[1:], pooled.size)
    # Positions starts..ends-1 hold ranks starts+1..ends; their mean is (starts+1+ends)/2.
    ranks = np.empty(pooled.size)
    ranks[order] = ((starts + 1 + ends) / 2.0)[group]
    n1, n0 = pos.size, neg.size
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def _average_precision(pos: Scores, neg: Scores) -> float:
    """Step-wise AP of ``pos`` (positive) vs ``neg``: ``sum_k (R_k - R_{k-1}) P_k``.

    One operating point per distinct score, from the highest down; ``P_k`` and ``R_k``
    are precision and recall when accepting every score ``>= t_k``; ``R_0 = 0``.
    """
    pooled = np.concatenate([pos, neg])
    positive = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-pooled, kind="stable")
    ordered = pooled[order]
    # Last index of each run of equal scores: one threshold per distinct value.
    last = np.append(np.flatnonzero(ordered[1:] != ordered[:-1]), pooled.size - 1)
    true_pos = np.cumsum(positive[order])[last]
    precision = true_pos / (last + 1)
    recall = true_pos / pos.size
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def aupr_in(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Average precision with ID as the positive class, scores as they are."""
    return _average_precision(_scores(id_scores, "id_scores"), _scores(ood_scores, "ood_scores"))


def aupr_out(id_scores: ArrayLike, ood_scores: ArrayLike) -> float:
    """Average precision with OOD as the positive class, scores negated."""
    pos = -_scores(ood_scores, "ood_scores")
    return _average_precision(pos, -_scores(id_scores, "id_scores"))


def _boundary(id_sorted_desc: Scores, tpr: float) -> float:
    """The k-th largest ID score, k the smallest count with ``k / n >= tpr``.

    ``k`` is found in floating point exactly as the acceptance fraction is measured
    (``count / n``), so e.g. ``tpr=0.07`` on 100 scores gives k = 7, not 8.
    """
    n = id_sorted_desc.size
    k = min(max(math.ceil(tpr * n), 1), n)
    while k > 1 and (k - 1) / n >= tpr:
        k -= 1
    while k < n and k / n < tpr:
        k += 1
    return float(id_sorted_desc[k - 1])


def calibrate_threshold(id_scores: ArrayLike, tpr: float = 0.95) -> float:
    """The threshold to deploy: accept when ``score >= t``, ``mean(id_scores >= t) >= tpr``.

    With ``s`` the smallest ID score that must be accepted (the ``k``-th largest, ``k``
    the smallest count with ``k / n >= tpr``) and ``s'`` the largest ID score below
    ``s``, ``t = (s + s') / 2``: it accepts exactly the scores ``>= s`` (so at least
    ``tpr``, and no threshold accepting fewer inputs does), yet no validation score
    lies on it. A threshold equal to a score flips that input on the smallest
    arithmetic difference -- onnxruntime's float32 softmax vs PyTorch's moved the
    demo's ID acceptance from 95.4% to 94.9% -- while the midpoint keeps half the gap
    as a margin on both sides. When no ID score lies below ``s`` (e.g. ``tpr = 1``),
    ``t = s``. With ties at ``s`` the accepted fraction exceeds ``tpr`` by the tied count.
    For float32 scores (a model's), ``float32(t)`` -- what the exported graph holds --
    still lies strictly between ``s'`` and ``s`` whenever a float32 value does.
    """
    _check_tpr(tpr)
    scores = _scores(id_scores, "id_scores")
    boundary = _boundary(np.sort(scores)[::-1], tpr)
    below = scores[scores < boundary]
    if below.size == 0:
        return boundary
    midpoint = 0.5 * boundary + 0.5 * float(below.max())
    # Two adjacent doubles have no midpoint; rounding must not accept the lower one.
    return midpoint if midpoint > below.max() else boundary


def fpr_at_tpr(id_scores: ArrayLike, ood_scores: ArrayLike, tpr: float = 0.95) -> float:
    """FPR at TPR (FPR95 for ``tpr=0.95``): the ROC curve's FPR at its first point with
    TPR >= ``tpr``, as read off ``sklearn.metrics.roc_curve``. Lower is better.

    That point's threshold is ``s``, the ``k``-th largest ID score
    (:func:`calibrate_threshold`), so ``FPR = mean(ood_scores >= s)``. The deployed
    threshold lies just below ``s`` (halfway to the next ID score), so it may also
    accept OOD scores in that gap; the report's per-OOD rejection at the threshold
    is measured with the deployed threshold itself.
    """
    _check_tpr(tpr)
    boundary = _boundary(np.sort(_scores(id_scores, "id_scores"))[::-1], tpr)
    neg = _scores(ood_scores, "ood_scores")
    return float(np.mean(neg >= boundary))


def calibration_bin(confidences: np.ndarray, n_bins: int) -> np.ndarray:
    """The ECE bin of each confidence (see :func:`expected_calibration_error`)."""
    edges = np.arange(n_bins + 1) / n_bins
    return np.clip(np.searchsorted(edges, confidences, side="left") - 1, 0, n_bins - 1)


def expected_calibration_error(
    confidences: ArrayLike, correct: ArrayLike, n_bins: int = 15
) -> float:
    """ECE over ``n_bins`` equal-width bins of [0, 1].

    Bin ``b`` is ``(b / n_bins, (b + 1) / n_bins]``, the first one also holding 0;
    an edge is the double nearest ``b / n_bins``, so ``0.2`` is the top of bin 2
    with 15 bins. ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``, with ``acc`` the
    fraction correct and ``conf`` the mean confidence in the bin; empty bins add 0.

    ``confidences`` (N,) in [0, 1]; ``correct`` (N,) bool or 0/1.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ConfigError(f"n_bins must be a positive integer, got {n_bins!r}; e.g. 15")
    conf = _scores(confidences, "confidences")
    hits = _scores(correct, "correct")
    _same_length(conf, hits, "confidences and correct")
    if conf.min() < 0.0 or conf.max() > 1.0:
        raise DataError(
            f"confidences must lie in [0, 1], got [{conf.min()}, {conf.max()}]; "
            "pass probabilities, not logits"
        )
    if not np.all((hits == 0.0) | (hits == 1.0)):
        raise DataError("correct must hold booleans or 0/1 values")
    bins = calibration_bin(conf, n_bins)
    # |B| * |acc(B) - conf(B)| = |sum over B of (correct - confidence)|.
    gap = np.bincount(bins, weights=hits - conf, minlength=n_bins)
    return float(np.abs(gap).sum() / conf.size)


def negative_log_likelihood(probabilities: ArrayLike, labels: ArrayLike) -> float:
    """Mean ``-log p[n, y_n]`` over rows, ``p`` clipped to at least ``1e-12``.

    ``probabilities`` (N, C), rows summing to 1; ``labels`` (N,) ints in [0, C).
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise DataError(f"probabilities must be a non-empty (N, C) array, got {probs.shape}")
    if not np.all(np.isfinite(probs)):
        raise DataError("probabilities contain NaN or inf; check the model outputs")
    ys = _labels(labels, "labels", probs.shape[1])
    _same_length(probs, ys, "probabilities and labels")
    picked = np.clip(probs[np.arange(ys.size), ys], 1e-12, None)
    return float(-np.log(picked).mean())


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of ``predictions`` (N,) equal to ``labels`` (N,), both integer class ids."""
    preds = _labels(predictions, "predictions")
    ys = _labels(labels, "labels")
    _same_length(preds, ys, "predictions and labels")
    return float(np.mean(preds == ys))


@dataclass(frozen=True)
class OODMetrics:
    """ID-vs-one-OOD-set detection metrics; ``fpr95`` is the FPR at the chosen ``tpr``."""

    auroc: float
    fpr95: float
    aupr_in: float
    aupr_out: float

    def as_dict(self) -> dict[str, float]:
        """``{"auroc", "fpr95", "aupr_in", "aupr_out"}`` as plain floats (report.json)."""
        return {key: float(value) for key, value in asdict(self).items()}


def ood_metrics(id_scores: ArrayLike, ood_scores: ArrayLike, tpr: float = 0.95) -> OODMetrics:
    """All four detection metrics of ``id_scores`` (positive) vs ``ood_scores``."""
    pos = _scores(id_scores, "id_scores")
    neg = _scores(ood_scores, "ood_scores")
    return OODMetrics(
        auroc=auroc(pos, neg),
        fpr95=fpr_at_tpr(pos, neg, tpr),
        aupr_in=aupr_in(pos, neg),
        aupr_out=aupr_out(pos, neg),
    )


def bootstrap_ci(
    id_scores: ArrayLike,
    ood_scores: ArrayLike,
    metric: OODMetric,
    n_boot: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval ``(lo, hi)`` of ``metric(id_scores, ood_scores)``.

    Each of the ``n_boot`` replicates resamples the ID and the OOD scores
    independently, with replacement, keeping both sizes; all indices come from one
    ``numpy.random.default_rng(seed)`` draw, so the interval depends only on the data
    and ``seed``. ``lo`` and ``hi`` are the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles of the replicates.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ConfigError(f"n_boot must be a positive integer, got {n_boot!r}; e.g. 200")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level must be in (0, 1), got {level}; e.g. 0.95")
    pos = _scores(id_scores, "id_scores")
    neg = _scores(ood_scores, "ood_scores")
    rng = np.random.default_rng(seed)
    pos_boot = pos[rng.integers(0, pos.size, size=(n_boot, pos.size))]
    neg_boot = neg[rng.integers(0, neg.size, size=(n_boot, neg.size))]
    values = np.array([metric(p, q) for p, q in zip(pos_boot, neg_boot, strict=True)])
    lo, hi = np.quantile(values, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)
