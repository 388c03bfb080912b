"""Reliability: OOD scores, detection and calibration metrics, model evaluation.

- :mod:`~moonprune.reliability.registry`: every OOD score by name (``SCORES``);
- :mod:`~moonprune.reliability.scores`: OOD scores of logits, higher = in-distribution;
- :mod:`~moonprune.reliability.metrics`: AUROC, AUPR-In/Out, FPR at a TPR, the
  rejection threshold, ECE, NLL, accuracy and bootstrap intervals (numpy);
- :mod:`~moonprune.reliability.evaluation`: a model's logits to a report row.
"""

from __future__ import annotations

from moonprune.reliability.evaluation import (
    ModelMetrics,
    collect_logits,
    evaluate_logits,
)
from moonprune.reliability.metrics import (
    OODMetric,
    OODMetrics,
    accuracy,
    aupr_in,
    aupr_out,
    auroc,
    bootstrap_ci,
    calibrate_threshold,
    expected_calibration_error,
    fpr_at_tpr,
    negative_log_likelihood,
    ood_metrics,
)
from moonprune.reliability.options import EvalOptions
from moonprune.reliability.registry import SCORES, Score, ScoreFn, ScoreRegistry
from moonprune.reliability.scores import (
    compute_score,
    energy,
    get_score,
    known_probabilities,
    max_logit,
    msp,
    not_unknown,
)

__all__ = [
    "SCORES",
    "EvalOptions",
    "ModelMetrics",
    "OODMetric",
    "OODMetrics",
    "Score",
    "ScoreFn",
    "ScoreRegistry",
    "accuracy",
    "aupr_in",
    "aupr_out",
    "auroc",
    "bootstrap_ci",
    "calibrate_threshold",
    "collect_logits",
    "compute_score",
    "energy",
    "evaluate_logits",
    "expected_calibration_error",
    "fpr_at_tpr",
    "get_score",
    "known_probabilities",
    "max_logit",
    "msp",
    "negative_log_likelihood",
    "not_unknown",
    "ood_metrics",
]
