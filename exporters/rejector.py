"""The in-graph rejector: a classifier wrapped so it answers "class, or unknown".

:class:`RejectingClassifier` is a plain ``nn.Module``; the same code runs in PyTorch
tests and, exported, inside the ONNX graph. Outputs (DESIGN.md "ONNX contract"):

==============  ===========  =====================================================
``logits``      [N, K(+1)]   raw classifier output (unknown column last, if any)
``probabilities`` [N, K]     known part of softmax(logits / T) over all columns
``confidence``  [N]          the OOD score (higher = in-distribution)
``label``       int64 [N]    argmax over the K known classes, or -1 when rejected
``is_unknown``  bool [N]     not confidence >= threshold, or a non-finite input
==============  ===========  =====================================================

A row with any NaN or infinite input is rejected, and so is a row holding a finite
value too large for float32 arithmetic (|x| above about 1.8e19, far beyond any image,
normalised or raw): the model's layers would overflow on it, and an int8 model would
silently clip it to its calibrated range and answer confidently. Both are detected by
one reduction over the squared input, ``isfinite(sum(x * x))`` (NaN and +-inf
propagate through it; 3e38 squared overflows to inf), read from the raw graph input;
an element-wise test and replacement over the whole input cost 2-3% of a ResNet-20's
latency at batch 1. A confidence that is NaN (any overflow inside the network) is
never accepted either: the test is ``not confidence >= threshold``. A rejected row's
logits and confidence may be NaN; every layer in eval mode works row by row, so the
other rows of the batch are unaffected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from moonprune.errors import ConfigError
from moonprune.reliability.features import FeatureScore, FeatureStats, tapped_input
from moonprune.reliability.scores import (
    check_score,
    compute_score,
    is_feature_score,
    known_probabilities,
)

#: Input values every exported graph must reject wherever they appear in a row: NaN,
#: +-inf, and finite values whose square overflows float32 (an int8 graph would
#: otherwise clip them to its calibrated range and answer confidently).
HOSTILE_VALUES = (float("nan"), float("inf"), float("-inf"), 3e38, -3e38)


def hostile_rows(clean: np.ndarray) -> np.ndarray:
    """Copies of ``clean[0]`` (float32 NCHW) with one hostile value each, then a row
    that is 3e38 everywhere."""
    rows = np.repeat(np.asarray(clean[:1], np.float32), len(HOSTILE_VALUES) + 1, axis=0)
    flat = rows.reshape(len(rows), -1)
    for i, value in enumerate(HOSTILE_VALUES):
        flat[i, (7 * i) % flat.shape[1]] = value
    flat[-1] = 3e38
    return rows


class RejectingClassifier(nn.Module):
    """``classifier`` + OOD score + threshold (a buffer, so it lives in the graph).

    ``normalization`` = ``(scale, mean, std)`` bakes preprocessing into the graph: the
    input is then raw pixels and becomes ``(x * scale - mean[c]) / std[c]`` first.

    A feature score (``mahalanobis``, ``knn``) needs ``feature_stats`` and
    ``feature_layer`` (the classifier's name): the input of that layer is tapped during
    the forward pass and scored by :class:`~moonprune.reliability.features.FeatureScore`,
    whose statistics become graph constants.

    Example::

        >>> import torch
        >>> from moonprune import RejectingClassifier
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))  # K = 2 + unknown
        >>> rejector = RejectingClassifier(net, num_known=2, threshold=0.5).eval()
        >>> x = torch.tensor([[[[1.0, 2.0], [3.0, float("nan")]]]])
        >>> logits, probabilities, confidence, label, is_unknown = rejector(x)
        >>> int(label), bool(is_unknown)
        (-1, True)
    """

    threshold: torch.Tensor
    temperature: torch.Tensor
    pixel_scale: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        classifier: nn.Module,
        num_known: int,
        threshold: float,
        score: str = "msp",
        temperature: float = 1.0,
        normalization: tuple[float, Sequence[float], Sequence[float]] | None = None,
        feature_stats: FeatureStats | None = None,
        feature_layer: str | None = None,
    ) -> None:
        super().__init__()
        if not math.isfinite(temperature) or temperature <= 0:
            raise ConfigError(f"temperature must be a finite number > 0, got {temperature}")
        if not math.isfinite(threshold):
            raise ConfigError(f"threshold must be a finite number, got {threshold}")
        self.feature_score: FeatureScore | None = None
        if is_feature_score(check_score(score)):
            if feature_stats is None or feature_layer is None:
                raise ConfigError(
                    f"the {score!r} score needs the feature statistics fitted on the training "
                    "split; export a moonprune checkpoint written by `moonprune compress`"
                )
            self.feature_score = FeatureScore(score, feature_stats)
        self.feature_layer = feature_layer
        self.classifier = classifier
        self.num_known = num_known
        self.score = score
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.normalize = normalization is not None
        scale, mean, std = normalization if normalization is not None else (1.0, [0.0], [1.0])
        self.register_buffer("pixel_scale", torch.tensor(float(scale)))
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        bad_row = ~torch.isfinite((x * x).flatten(1).sum(dim=1))
        if self.normalize:
            x = (x * self.pixel_scale - self.mean) / self.std
        t = self.temperature
        if self.feature_score is not None and self.feature_layer is not None:
            with tapped_input(self.classifier.get_submodule(self.feature_layer)) as seen:
                logits = self.classifier(x)
            confidence = self.feature_score(seen[-1])
        else:
            logits = self.classifier(x)
            confidence = compute_score(logits, self.num_known, self.score, t)  # type: ignore[arg-type]
        probabilities = known_probabilities(logits, self.num_known, t)  # type: ignore[arg-type]
        is_unknown = ~(confidence >= self.threshold) | bad_row  # NaN: rejected
        label = probabilities.argmax(dim=-1)
        label = torch.where(is_unknown, torch.full_like(label, -1), label)
        return logits, probabilities, confidence, label, is_unknown
