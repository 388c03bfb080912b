"""Images read one row at a time: the lazy side of :class:`moonprune.sources.RawImages`.

A user's data set can be far larger than memory (an ImageFolder of a million JPEGs, an
``.npz`` of gigabytes). Instead of decoding it into one float array, the readers
return a :class:`LazyRows`: an ``ndarray``-like view (``shape``, ``len``, indexing
with an index array or a slice) over a :class:`RowSource` that decodes and converts
one image when asked. Nothing is read until a batch needs it; a view taken by index
(a split, a class subset) copies indices, never pixels.

A row read from a view is bit-identical to the same row of the eager reader: the same
decoder (:func:`moonprune.user_data.read_image`), the same conversion
(:func:`moonprune.sources.conform_one`) and the same float32 arithmetic, so a model
sees the same tensor whether its data streamed or not.

Example::

    >>> import numpy as np
    >>> rows = LazyRows(ArraySource(np.zeros((10, 1, 4, 4), np.uint8), 1 / 255))
    >>> part = rows[np.array([1, 3, 5])]
    >>> part.shape, part.read(np.array([0, 2])).shape
    ((3, 1, 4, 4), (2, 1, 4, 4))
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moonprune.errors import DataError
from moonprune.pixels import conform_one, read_image

#: Rows read per chunk by the statistics and validation passes.
CHUNK = 256


class RowSource(ABC):
    """``n`` images of shape ``row_shape`` (C, H, W), read one at a time as float32 in
    [0, 1]. Subclasses must be picklable (worker processes receive a copy)."""

    n: int
    row_shape: tuple[int, int, int]

    @abstractmethod
    def read(self, index: int) -> np.ndarray:
        """Image ``index`` as float32 ``row_shape`` in [0, 1]."""

    @abstractmethod
    def fingerprint(self) -> bytes:
        """Bytes that change when the data changes (what a resumed run checks)."""

    def conformed(self, channels: int, size: tuple[int, int]) -> RowSource:
        """This source converted to ``channels`` x ``size`` on read."""
        if (channels, *size) == self.row_shape:
            return self
        return ConformedSource(self, channels, size)


@dataclass
class ArraySource(RowSource):
    """Rows of an array (in memory or memory-mapped) of raw pixels: ``array[i] * scale``
    as float32, transposed from (H, W, C) when ``channels_last``."""

    array: np.ndarray
    scale: float
    channels_last: bool = False

    def __post_init__(self) -> None:
        shape = self.array.shape
        self.n = int(shape[0])
        c, h, w = (shape[3], shape[1], shape[2]) if self.channels_last else shape[1:]
        self.row_shape = (int(c), int(h), int(w))

    def read(self, index: int) -> np.ndarray:
        row = np.asarray(self.array[index])
        if self.channels_last:
            row = row.transpose(2, 0, 1)
        return row.astype(np.float32) * np.float32(self.scale)

    def fingerprint(self) -> bytes:
        digest = hashlib.sha256(str((self.array.shape, self.array.dtype)).encode())
        for start in range(0, self.n, CHUNK):
            digest.update(np.ascontiguousarray(self.array[start : start + CHUNK]).tobytes())
        return digest.digest()


@dataclass
class FolderSource(RowSource):
    """Image files decoded on read and converted to ``row_shape`` (an ImageFolder)."""

    files: list[Path]
    row_shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        self.n = len(self.files)

    def read(self, index: int) -> np.ndarray:
        path = self.files[index]
        try:
            image, _ = read_image(path)
        # the file decoded when the set was checked; it changed or vanished since
        except Exception as exc:
            raise DataError(
                f"cannot decode image {str(path)!r} ({exc}); it changed after the data was "
                "checked: restore it, or remove it and rerun"
            ) from None
        c, h, w = self.row_shape
        return conform_one(image, c, (h, w))

    def fingerprint(self) -> bytes:
        digest = hashlib.sha256(str(self.row_shape).encode())
        for path in self.files:
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.digest()


@dataclass
class ConformedSource(RowSource):
    """Another source's rows converted to ``channels`` x ``size`` (a model's input)."""

    base: RowSource
    channels: int
    size: tuple[int, int]

    def __post_init__(self) -> None:
        self.n = self.base.n
        self.row_shape = (self.channels, *self.size)

    def read(self, index: int) -> np.ndarray:
        return conform_one(self.base.read(index), self.channels, self.size)

    def fingerprint(self) -> bytes:
        return hashlib.sha256(self.base.fingerprint() + str(self.row_shape).encode()).digest()


class LazyRows:
    """An ``ndarray``-like (N, C, H, W) float32 view of some rows of a
    :class:`RowSource`; indexing returns another view, :meth:`read` the pixels.
    ``workers`` is how many processes should read it in batches (None: the default;
    see :mod:`moonprune.streaming`); every view taken from it keeps the setting."""

    ndim = 4
    dtype = np.dtype(np.float32)

    def __init__(
        self, source: RowSource, index: np.ndarray | None = None, workers: int | None = None
    ) -> None:
        self.source = source
        self.index = np.arange(source.n) if index is None else np.asarray(index, np.int64)
        self.workers = workers

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.index), *self.source.row_shape)

    def __getitem__(self, key: Any) -> LazyRows:
        return LazyRows(self.source, self.index[key], self.workers)

    def __repr__(self) -> str:
        return f"LazyRows({type(self.source).__name__}, shape={self.shape})"

    def read(self, positions: np.ndarray | slice | None = None) -> np.ndarray:
        """The rows at ``positions`` of this view (all by default) as float32 in [0, 1]."""
        chosen = self.index if positions is None else self.index[positions]
        out = np.empty((len(chosen), *self.source.row_shape), dtype=np.float32)
        for i, j in enumerate(chosen):
            out[i] = self.source.read(int(j))
        return out

    def _reduce(self, fn: Any) -> float:
        return float(fn([fn(self.read(slice(s, s + CHUNK))) for s in range(0, len(self), CHUNK)]))

    def min(self) -> float:
        """The smallest pixel value (one pass over the rows)."""
        return self._reduce(np.min)

    def max(self) -> float:
        """The largest pixel value (one pass over the rows)."""
        return self._reduce(np.max)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Every row read into one array (``np.asarray(view)``): small sets only."""
        out = self.read()
        return out if dtype is None else out.astype(dtype)

    def conformed(self, channels: int, size: tuple[int, int]) -> LazyRows:
        return LazyRows(self.source.conformed(channels, size), self.index, self.workers)

    def fingerprint(self) -> bytes:
        return hashlib.sha256(self.source.fingerprint() + self.index.tobytes()).digest()


def concat_rows(parts: list[LazyRows]) -> LazyRows | None:
    """One view of ``parts`` when they share a source, else None."""
    if not parts or any(p.source is not parts[0].source for p in parts):
        return None
    return LazyRows(parts[0].source, np.concatenate([p.index for p in parts]), parts[0].workers)
