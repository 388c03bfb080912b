"""One forward pass per data set that yields the logits *and* the feature scores.

An assessment (:mod:`moonprune.assessment`) needs each model's logits on the ID test
and validation splits and on every OOD set; the feature scores
(:mod:`moonprune.reliability.features`) need the classifier's input on the same rows
plus statistics fitted on the ID *training* split of the same model. Both come from
:func:`collect_outputs`: the model runs once per set with its classifier's input
tapped; the statistics are fitted here unless given (a checkpoint's stored ones).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from moonprune.data import ImageSet
from moonprune.errors import CheckpointError
from moonprune.heads import find_classifier
from moonprune.reliability.evaluation import collect_logits
from moonprune.reliability.features import (
    DEFAULT_BANK_SIZE,
    DEFAULT_K,
    FEATURE_SCORES,
    FeatureScore,
    FeatureStats,
    collect_features,
    fit_feature_stats,
)
from moonprune.streaming import Images


@dataclass(frozen=True)
class FeatureOptions:
    """How feature statistics are fitted: ``bank_size`` rows at most in the KNN bank,
    similarity to the ``k``-th nearest, the bank drawn with ``seed``."""

    bank_size: int = DEFAULT_BANK_SIZE
    k: int = DEFAULT_K
    seed: int = 0


@dataclass
class FeatureScores:
    """The statistics used and, per feature score and set name, the ``(N,)`` scores."""

    stats: FeatureStats
    values: dict[str, dict[str, np.ndarray]]


def classifier_layer(model: nn.Module, example: torch.Tensor) -> str | None:
    """The final ``nn.Linear`` of ``model`` (its input is the feature), or None when no
    linear layer produces the output (feature scores are then unavailable)."""
    device = next((t.device for t in (*model.parameters(), *model.buffers())), example.device)
    try:
        return find_classifier(model, example.to(device))
    except CheckpointError:
        return None


def collect_outputs(
    model: nn.Module,
    sets: Mapping[str, Images],
    num_known: int,
    *,
    train: ImageSet | None,
    stats: FeatureStats | None = None,
    options: FeatureOptions | None = None,
) -> tuple[dict[str, torch.Tensor], FeatureScores | None]:
    """Logits of ``model`` on each input of ``sets`` (name -> (N, C, H, W)) and the
    feature scores of every row.

    The statistics are ``stats`` when given, else fitted on ``train`` (the ID training
    split, in eval mode) with ``options``. Feature scores are None when the model has
    no final linear layer or neither ``stats`` nor ``train`` is given.
    """
    first = next(iter(sets.values()))
    layer = classifier_layer(model, first[:2])
    if layer is None or (stats is None and train is None):
        return {name: collect_logits(model, x) for name, x in sets.items()}, None
    outputs = {name: collect_features(model, x, layer) for name, x in sets.items()}
    if stats is None:
        assert train is not None
        options = options or FeatureOptions()
        _, features = collect_features(model, train.x, layer)
        stats = fit_feature_stats(features, train.y, num_known, bank_size=options.bank_size,
                                  k=options.k, seed=options.seed)  # fmt: skip
    width = outputs[next(iter(outputs))][1].shape[1]
    if width != stats.dim:
        raise CheckpointError(
            f"the stored feature statistics are {stats.dim} wide but the classifier's input "
            f"has {width} features; recreate the checkpoint with `moonprune compress`"
        )
    values = {}
    for name in (n for n in FEATURE_SCORES if stats.has(n)):  # older stats lack some
        scorer = FeatureScore(name, stats)
        with torch.no_grad():
            values[name] = {s: _scored(scorer, f) for s, (_, f) in outputs.items()}
    return {name: logits for name, (logits, _) in outputs.items()}, FeatureScores(stats, values)


#: Rows scored at once: bounds the (rows, classes, D) and (rows, bank) intermediates
#: (every built-in evaluation set fits in one chunk).
SCORE_ROWS = 4096


def _scored(scorer: FeatureScore, features: torch.Tensor) -> np.ndarray:
    """``scorer`` over ``features`` (N, D), :data:`SCORE_ROWS` rows at a time, float64."""
    if len(features) == 0:
        return scorer(features).double().numpy()
    return torch.cat([scorer(chunk) for chunk in features.split(SCORE_ROWS)]).double().numpy()
