"""The in-graph rejector: a classifier wrapped so it answers "class, or unknown".

:class:`RejectingClassifier` is a plain ``nn.Module``; the same code runs in PyTorch
tests and, exported, inside the ONNX graph. Outputs (DESIGN.md "ONNX contract"):

==============  ===========  =====================================================
``logits``      [N, K(+1)]   raw classifier output (unknown column last, if any)
``probabilities`` [N, K]     known part of softmax(logits / T) over all columns
``confidence``  [N]          the OOD score (higher = in-distribution)
``label``       int64 [N]    argmax over the K known classes, or -1 when rejected
``is_unknown``  bool [N]     confidence < threshold, or a non-finite input value
==============  ===========  =====================================================

A row with any NaN or infinite input is rejected. It is detected from the row's sum
(NaN and +-inf propagate through a sum; a finite row whose sum overflows float32 is
rejected too, which no normalised image reaches): one reduction instead of an
element-wise test and replacement over the whole input, which cost 2-3% of a
ResNet-20's latency at batch 1. Such a row's logits and confidence may be NaN; every
layer in eval mode works row by row, so the other rows of the batch are unaffected.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moonprune.reliability.scores import compute_score, known_probabilities


class RejectingClassifier(nn.Module):
    """``classifier`` + OOD score + threshold (a buffer, so it lives in the graph).

    ``normalization`` = ``(scale, mean, std)`` bakes preprocessing into the graph: the
    input is then raw pixels and becomes ``(x * scale - mean[c]) / std[c]`` first.

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
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        compute_score(torch.zeros(1, num_known), num_known, score)  # validates the name
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
        bad_row = ~torch.isfinite(x.flatten(1).sum(dim=1))
        if self.normalize:
            x = (x * self.pixel_scale - self.mean) / self.std
        logits = self.classifier(x)
        t = self.temperature
        probabilities = known_probabilities(logits, self.num_known, t)  # type: ignore[arg-type]
        confidence = compute_score(logits, self.num_known, self.score, t)  # type: ignore[arg-type]
        is_unknown = (confidence < self.threshold) | bad_row
        label = probabilities.argmax(dim=-1)
        label = torch.where(is_unknown, torch.full_like(label, -1), label)
        return logits, probabilities, confidence, label, is_unknown
