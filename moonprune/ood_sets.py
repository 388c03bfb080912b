"""OOD sets: a spec read whole and converted to the ID data's input (:func:`load_ood`)."""

from __future__ import annotations

import numpy as np
import torch

from moonprune import sources
from moonprune.errors import DataError
from moonprune.image_sets import ImageSet
from moonprune.preprocessing import Preprocessing
from moonprune.rows import LazyRows
from moonprune.specs import ReadOptions, load_raw, parse_spec


def load_ood(
    spec: str,
    preprocessing: Preprocessing,
    seed: int = 0,
    n_noise: int = 500,
    options: ReadOptions | None = None,
) -> ImageSet:
    """An OOD set converted to the ID input (channels, size, normalisation); all of it.

    Built-in sets and image folders are converted to the model's input (they are
    images of their own size). An ``.npz`` array must already have the model's
    shape: silently resizing a tensor could hide a mistake.

    Example::

        >>> import moonprune
        >>> splits = moonprune.load_splits("digits:0-5")
        >>> moonprune.load_ood("digits:6-9", splits.preprocessing).x.shape
        torch.Size([714, 1, 8, 8])
    """
    if spec == "noise":
        rng = np.random.default_rng(seed + 7919)
        images: np.ndarray | LazyRows = rng.random(
            (n_noise, *preprocessing.input_shape), dtype=np.float32
        )
    else:
        raw = load_raw(spec, options)
        images = raw.images
        if images.shape[1:] != preprocessing.input_shape:
            if parse_spec(spec)[0].endswith(".npz"):
                raise DataError(
                    f"OOD set {spec!r} has images of shape {images.shape[1:]} but the model "
                    f"takes {preprocessing.input_shape}; save x in that shape"
                )
            images = sources.conform(
                images, preprocessing.channels, (preprocessing.height, preprocessing.width)
            )
    x = preprocessing.normalise(images)
    return ImageSet(spec, x, torch.full((len(x),), -1, dtype=torch.int64))
