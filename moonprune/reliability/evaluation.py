"""Evaluate a classifier: accuracy, calibration, NLL and OOD detection per OOD set.

Logits are ``(N, K)`` for a plain model or ``(N, K + 1)`` with the unknown column at
index ``K`` (:mod:`moonprune.conventions`). The conventions, for both widths:

- prediction: ``argmax`` over the K known columns (the unknown column never wins a
  prediction; rejecting is the threshold's job);
- probabilities: the softmax over *all* columns, so ``p(unknown)`` lowers the known
  ones (:func:`~moonprune.reliability.scores.known_probabilities`);
- ECE confidence: the largest known-class probability; NLL: ``-log p[y]``;
- OOD score: :func:`~moonprune.reliability.scores.compute_score` ``options.score``, higher =
  more in-distribution; ID test set positive against each OOD set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from moonprune.conventions import has_unknown_output
from moonprune.errors import ConfigError, DataError
from moonprune.reliability.metrics import (
    OODMetrics,
    accuracy,
    calibration_bin,
    expected_calibration_error,
    negative_log_likelihood,
    ood_metrics,
)
from moonprune.reliability.options import EvalOptions
from moonprune.reliability.scores import compute_score, known_probabilities
from moonprune.streaming import Images, batch_rows


def _model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter (or buffer); CPU for a model with neither."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def collect_logits(model: nn.Module, x: Images, batch_size: int | None = None) -> torch.Tensor:
    """``model(x)`` in eval mode without gradients, ``batch_size`` rows at a time
    (default :func:`~moonprune.streaming.batch_rows`: 512, fewer for large images).

    ``x`` (N, C, H, W) is moved batch by batch to the device of the model's first
    parameter; the result (N, outputs) is returned on the CPU. The training flag of
    every submodule is restored afterwards, even if the forward pass raises.
    """
    if batch_size is None:
        batch_size = batch_rows(x.shape)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if x.ndim == 0 or x.shape[0] == 0:
        raise DataError(f"no inputs to evaluate (shape {tuple(x.shape)}); check the data spec")
    device = _model_device(model)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            chunks = [model(batch.to(device)).cpu() for batch in x.split(batch_size)]
    finally:
        # Pre-order: a module's own train() call comes after its ancestors' ones.
        for module, training in modes:
            module.train(training)
    return torch.cat(chunks)


@dataclass(frozen=True)
class ModelMetrics:
    """One model's row of the report: ID accuracy, ECE, NLL and OOD metrics per set."""

    accuracy: float
    ece: float
    nll: float
    ood: dict[str, OODMetrics]

    def as_dict(self) -> dict[str, Any]:
        """The report.json ``M`` object: ``{"accuracy", "ece", "nll", "ood": {name: {...}}}``."""
        return {
            "accuracy": float(self.accuracy),
            "ece": float(self.ece),
            "nll": float(self.nll),
            "ood": {name: metrics.as_dict() for name, metrics in self.ood.items()},
        }


def _check_logits(logits: torch.Tensor, num_known: int, name: str) -> None:
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise DataError(f"{name} must be a non-empty (N, C) tensor, got {tuple(logits.shape)}")
    try:
        has_unknown_output(logits, num_known)
    except ValueError as err:
        raise DataError(f"{name}: {err}; is num_known={num_known} right for this model?") from None
    if not bool(torch.isfinite(logits).all()):
        raise DataError(f"{name} contain NaN or inf; the model produced non-finite outputs")


def _ood_scores(logits: torch.Tensor, num_known: int, score: str) -> np.ndarray:
    return compute_score(logits, num_known, score).detach().cpu().double().numpy()


def evaluate_logits(
    id_logits: torch.Tensor,
    id_labels: torch.Tensor,
    ood_logits: Mapping[str, torch.Tensor],
    num_known: int,
    options: EvalOptions | None = None,
    scores: Mapping[str, np.ndarray] | None = None,
) -> ModelMetrics:
    """Metrics from precomputed logits (see the module docstring for the conventions).

    ``id_logits`` (N, K) or (N, K + 1), ``id_labels`` (N,) in [0, K), each
    ``ood_logits[name]`` (M, same width). ECE uses ``options.ece_bins`` equal-width
    bins; ``fpr95`` is the OOD acceptance at the threshold accepting ``options.tpr`` of
    ID. ``scores`` (``"id_test"`` and each OOD name -> (N,)) are precomputed OOD
    scores, e.g. of the classifier's input features; they replace ``options.score``.
    This is the metrics step of the one evaluation path; a whole model is assessed by
    :func:`moonprune.assessment.assess`.
    """
    options = options or EvalOptions()
    score, ece_bins, tpr = options.score, options.ece_bins, options.tpr
    if isinstance(num_known, bool) or not isinstance(num_known, int) or num_known < 1:
        raise ConfigError(f"num_known must be a positive integer, got {num_known!r}")
    _check_logits(id_logits, num_known, "ID logits")
    width = id_logits.shape[1]
    for name, logits in ood_logits.items():
        _check_logits(logits, num_known, f"OOD logits {name!r}")
        if logits.shape[1] != width:
            raise DataError(
                f"OOD logits {name!r} have {logits.shape[1]} columns but the ID logits "
                f"{width}; evaluate both with the same model"
            )
    labels = torch.as_tensor(id_labels).detach().cpu().numpy()
    if labels.shape != (id_logits.shape[0],):
        raise DataError(
            f"ID labels have shape {labels.shape}; expected ({id_logits.shape[0]},), "
            "one per row of the ID logits"
        )
    if labels.min() < 0 or labels.max() >= num_known:
        raise DataError(
            f"ID labels must be known classes in [0, {num_known}), got "
            f"[{labels.min()}, {labels.max()}]"
        )
    # Accuracy, ECE and NLL in float64; the OOD score in the logits' own dtype, as the
    # threshold is calibrated and the exported model scores.
    logits64 = id_logits.detach().cpu().double()
    probs = torch.softmax(logits64, dim=-1)
    known = known_probabilities(logits64, num_known)
    predictions = known.argmax(dim=-1).numpy()
    if scores is None:
        id_scores = _ood_scores(id_logits, num_known, score)
        ood_scores = {n: _ood_scores(v, num_known, score) for n, v in ood_logits.items()}
    else:
        id_scores, ood_scores = scores["id_test"], {n: scores[n] for n in ood_logits}
    return ModelMetrics(
        accuracy=accuracy(predictions, labels),
        ece=expected_calibration_error(
            known.amax(dim=-1).numpy(), predictions == labels, n_bins=ece_bins
        ),
        nll=negative_log_likelihood(probs.numpy(), labels),
        ood={name: ood_metrics(id_scores, values, tpr) for name, values in ood_scores.items()},
    )


def reliability_diagram(
    confidences: np.ndarray, correct: np.ndarray, n_bins: int
) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, rows) of every non-empty bin, binned exactly as the
    ECE of the same ``n_bins`` is (:func:`~.metrics.expected_calibration_error`), so a
    plot of it agrees with the reported ECE."""
    conf = np.asarray(confidences, dtype=np.float64)
    hits = np.asarray(correct, dtype=np.float64)
    bins = calibration_bin(conf, n_bins)
    return [
        (float(conf[bins == b].mean()), float(hits[bins == b].mean()), int((bins == b).sum()))
        for b in range(n_bins)
        if (bins == b).any()
    ]
