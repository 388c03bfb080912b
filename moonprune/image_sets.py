"""The containers of model-ready data: an :class:`ImageSet` and the ID :class:`Splits`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moonprune.preprocessing import Preprocessing
from moonprune.streaming import LazyImages


@dataclass(frozen=True)
class ImageSet:
    """Model-ready tensors: ``x`` float32 ``(N, C, H, W)``, ``y`` int64 ``(N,)`` (-1 = none).

    ``x`` is a tensor, or for data read lazily a :class:`~moonprune.streaming.LazyImages`
    with the same ``len``/``shape``/``split``/indexing, read in batches on demand.
    """

    name: str
    x: torch.Tensor | LazyImages
    y: torch.Tensor
    classes: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class Splits:
    """The ID data: train (fine-tuning), val (threshold, BN), test (the report)."""

    train: ImageSet
    val: ImageSet
    test: ImageSet
    preprocessing: Preprocessing

    @property
    def classes(self) -> tuple[str, ...]:
        return self.train.classes

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)
