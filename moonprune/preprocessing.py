"""How raw pixels become model input: :class:`Preprocessing` (size, channels, mean/std).

The in-distribution (ID) data's training split fixes it (:func:`dataset_preprocessing`,
or a saved model's own), and every other set is converted to it (:func:`conform_to`),
so the model always sees the same kind of tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import torch

from moonprune import sources
from moonprune.rows import LazyRows
from moonprune.sources import RawImages
from moonprune.streaming import LazyImages, channel_stats


@dataclass(frozen=True)
class Preprocessing:
    """How raw pixels become model input: ``((raw * scale) - mean[c]) / std[c]``.

    ``raw * scale`` is the pixel in [0, 1]; ``normalize`` names the convention that
    chose ``mean``/``std`` (``--normalize``: ``none``, ``dataset``, ``imagenet``, ...;
    ``None`` in a checkpoint written before the option existed, which used ``dataset``).
    """

    channels: int
    height: int
    width: int
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    normalize: str | None = None

    @overload
    def normalise(self, images01: np.ndarray) -> torch.Tensor: ...
    @overload
    def normalise(self, images01: LazyRows) -> LazyImages: ...

    def normalise(self, images01: np.ndarray | LazyRows) -> torch.Tensor | LazyImages:
        """``(N, C, H, W)`` images in [0, 1] -> float32 model input (a lazy view gives a
        :class:`~moonprune.streaming.LazyImages`, normalised as its batches are read)."""
        if isinstance(images01, LazyRows):
            return LazyImages(images01, self)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        return torch.from_numpy(((images01.astype(np.float32) - mean) / std).copy())

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` the model takes."""
        return (self.channels, self.height, self.width)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.normalize is not None:
            d["normalize"] = self.normalize
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            channels=int(d["channels"]),
            height=int(d["height"]),
            width=int(d["width"]),
            scale=float(d["scale"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            normalize=d.get("normalize"),
        )


def dataset_preprocessing(train: RawImages) -> Preprocessing:
    """The training split's own per-channel mean/std (``--normalize dataset``)."""
    mean, std = channel_stats(train.images)
    std = np.maximum(std, 1e-3)
    _, c, h, w = train.images.shape
    return Preprocessing(
        c, h, w, float(train.pixel_scale), tuple(map(float, mean)), tuple(map(float, std)),
        "dataset",
    )  # fmt: skip


def conform_to(raw: RawImages, pre: Preprocessing) -> RawImages:
    """``raw`` converted to ``pre``'s channels and size (unchanged when they match)."""
    images = sources.conform(raw.images, pre.channels, (pre.height, pre.width))
    return RawImages(images, raw.labels, raw.classes, raw.pixel_scale)
