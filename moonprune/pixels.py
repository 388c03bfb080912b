"""One image's pixels: decoded from a file, converted to a number of channels and a size.

Pure functions of a path or an array, shared by the eager readers
(:mod:`moonprune.sources`, :mod:`moonprune.user_data`) and the lazy ones
(:mod:`moonprune.rows`), so a row reads the same either way.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

#: Pillow modes holding 16-bit samples (older Pillow opens a 16-bit PNG as "I").
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def read_image(path: Path) -> tuple[np.ndarray, float]:
    """(C, H, W) float in [0, 1] and the raw pixel scale (1/255, 1/65535, or 1 for float).

    RGB or grayscale as stored (alpha dropped). 16-bit images are divided by 65535, not
    clipped to 8 bits. Raises (Pillow's errors, ``ValueError``) for a file that cannot be
    decoded; an image over Pillow's decompression-bomb limit is one of them.
    """
    with warnings.catch_warnings():
        # over MAX_IMAGE_PIXELS Pillow only warns (an error from twice that): refuse both
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as opened:
            if opened.mode in SIXTEEN_BIT_MODES or opened.mode == "F":
                return _high_depth(np.asarray(opened, dtype=np.float64), opened.mode)
            gray = opened.mode in ("1", "L", "LA")
            array = np.asarray(opened.convert("L" if gray else "RGB"), dtype=np.float32)
    array = array / 255.0
    return (array[None] if array.ndim == 2 else array.transpose(2, 0, 1)), 1 / 255


def _high_depth(array: np.ndarray, mode: str) -> tuple[np.ndarray, float]:
    """A 16-bit or float grayscale image as (1, H, W) in [0, 1]."""
    scale = 1.0 if mode == "F" else 1 / 65535
    scaled = array * scale
    if not np.isfinite(scaled).all() or scaled.min() < 0 or scaled.max() > 1:
        limit = "[0, 1]" if mode == "F" else "0-65535"
        raise ValueError(f"mode {mode} pixels outside {limit}")
    return scaled.astype(np.float32)[None], scale


def conform_one(image: np.ndarray, channels: int, size: tuple[int, int]) -> np.ndarray:
    """One (C, H, W) image in [0, 1] converted to ``channels`` and resized to ``size``."""
    if image.shape[0] != channels:
        if channels == 1:
            weights = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)[: image.shape[0]]
            image = (image * weights[:, None, None]).sum(0, keepdims=True) / weights.sum()
        else:
            image = np.repeat(image[:1], channels, axis=0)
    if image.shape[1:] != size:
        image = np.stack(
            [
                np.asarray(
                    Image.fromarray(plane.astype(np.float32)).resize(
                        (size[1], size[0]), Image.Resampling.BILINEAR
                    )
                )
                for plane in image
            ]
        )
    return image.astype(np.float32)
