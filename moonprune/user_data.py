"""Readers for the user's own data: one image file, an ImageFolder's listing (read
by :mod:`moonprune.folders`) and an ``.npz`` file (memory-mapped when uncompressed).

A file a user brings is untrusted input: every way it can be wrong (no rows, labels
that are not class indices, pixels that are not numbers, an image too large to
decode safely, ...) ends in one :class:`DataError` naming the file, the problem and
the fix, before anything is trained or written -- never in a traceback, never in a
silent conversion (a label 1.5 is not truncated to 1; a 16-bit pixel is not clipped
to 8 bits).
"""

from __future__ import annotations

import logging
import struct
import zipfile
from pathlib import Path

import numpy as np

from moonprune.errors import DataError
from moonprune.pixels import SIXTEEN_BIT_MODES as SIXTEEN_BIT_MODES
from moonprune.pixels import read_image as read_image
from moonprune.rows import ArraySource, LazyRows
from moonprune.sources import RawImages, reading

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
#: More classes than this is a file of ids or hashes, not class indices (and
#: ``range(max + 1)`` of such labels would exhaust memory).
MAX_CLASSES = 100_000
NPZ_FIX = "save it with numpy.savez(path, x=images, y=labels)"


# -- image folders ------------------------------------------------------------------------


def list_image_folder(root: Path) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """Files and labels of an ImageFolder ``root/<class>/<image>``, classes sorted."""
    files: list[Path] = []
    labels: list[int] = []
    with reading(root):
        classes = tuple(
            sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        )
        for index, name in enumerate(classes):
            for path in sorted((root / name).rglob("*")):
                if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                    files.append(path)
                    labels.append(index)
    if not files:
        raise DataError(
            f"no images found in {str(root)!r}; expected root/<class>/<image>.png (or .jpg)"
        )
    return files, labels, classes


# -- .npz files ---------------------------------------------------------------------------


def read_npz(path: Path) -> RawImages:
    """``x`` as (N,C,H,W), (N,H,W,C) or (N,H,W), uint8, uint16 or float; ``y`` optional.

    ``y`` holds class indices 0..K-1 (whole-number floats are accepted; a ``y`` of
    only -1, moonprune's "no label", reads as unlabelled); ``classes``, when present,
    names them.
    """
    where = repr(str(path))
    with reading(path), path.open("rb") as head:
        magic = head.read(6)
    if not magic.startswith(b"PK"):  # every zip archive, so every .npz, starts so
        what = " (it is a single .npy array)" if magic.startswith(b"\x93NUMPY") else ""
        raise DataError(f"{where} is not an .npz archive{what}; {NPZ_FIX}")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f:
                raise DataError(f"{where} has no array 'x' (found: {list(f.keys())}); {NPZ_FIX}")
            mapped = mapped_member(path, "x.npy")
            x = f["x"] if mapped is None else mapped
            y, names = f.get("y"), f.get("classes")
    except MemoryError as exc:  # a header may declare any shape (an .npz "bomb")
        raise DataError(f"{where} is too large to load ({exc}); save fewer images") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        reason = "it holds pickled Python objects" if "allow_pickle" in str(exc) else str(exc)
        raise DataError(f"cannot read {where} as .npz ({reason}); {NPZ_FIX}") from None
    images, scale = _check_pixels(x, where)
    labels: np.ndarray | None = None
    classes: tuple[str, ...] = ()
    if names is not None:
        if names.ndim != 1:
            raise DataError(f"{where}: classes must be a list of names, got shape {names.shape}")
        classes = tuple(str(c) for c in names)
    if y is not None:
        labels = _check_labels(y, len(images), where, classes)
        if labels is not None and not classes:
            classes = tuple(map(str, range(int(labels.max()) + 1)))
    return RawImages(images, labels, classes, scale)


def mapped_member(path: Path, name: str) -> np.memmap | None:
    """Array ``name`` of the .npz ``path`` as a read-only memory map, when it is stored
    uncompressed (``numpy.savez``) as a plain C-order array; else None (``savez_compressed``
    members must be decompressed into memory). ``np.load(mmap_mode=...)`` ignores .npz."""
    with zipfile.ZipFile(path) as archive:
        try:
            info = archive.getinfo(name)
        except KeyError:
            return None
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with path.open("rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the member's local header: its name and extra field follow
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return None
        offset = f.tell()
    if fortran or dtype.hasobject or 0 in shape:
        return None
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset)


def _first_nonfinite(x: np.ndarray) -> int | None:
    """The first image of ``x`` holding NaN or inf (checked in chunks), or None."""
    for start in range(0, len(x), 1024):
        ok = np.isfinite(x[start : start + 1024]).reshape(min(1024, len(x) - start), -1).all(1)
        if not ok.all():
            return start + int(np.flatnonzero(~ok)[0])
    return None


def _check_pixels(x: np.ndarray, where: str) -> tuple[np.ndarray | LazyRows, float]:
    """``x`` as float32 (N, C, H, W) in [0, 1], and the raw pixel scale. A memory-mapped
    ``x`` stays on disk: a :class:`LazyRows` view reads and scales rows on demand."""
    if x.dtype.kind not in "biuf":
        kind = "complex numbers" if x.dtype.kind == "c" else f"dtype {x.dtype}"
        raise DataError(
            f"{where}: x must hold real pixel values (uint8, uint16 or float), got {kind}; "
            "save the pixel arrays themselves"
        )
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"{where}: x must be (N,C,H,W) or (N,H,W,C), got shape {x.shape}")
    if x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.shape[1] not in (1, 3):
        raise DataError(
            f"{where}: x has shape {x.shape}, but images need 1 or 3 channels, as "
            "(N, C, H, W) or (N, H, W, C)"
        )
    if x.size == 0:
        raise DataError(f"{where} holds no images (x has shape {x.shape}); save at least one")
    bad = _first_nonfinite(x) if x.dtype.kind == "f" else None
    if bad is not None:
        raise DataError(
            f"{where}: x holds NaN or infinite pixel values (first in image {bad}); "
            "replace or drop those images"
        )
    return _scaled(x, where)


def _scaled(x: np.ndarray, where: str) -> tuple[np.ndarray | LazyRows, float]:
    if x.dtype == np.bool_:
        scale = 1.0
    elif x.dtype == np.uint8:
        scale = 1 / 255
    elif x.dtype == np.uint16:
        scale = 1 / 65535
    else:
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 255:
            raise DataError(
                f"{where}: x holds values in [{lo:.4g}, {hi:.4g}]; save raw pixels (uint8, "
                "uint16, or float in [0, 1] or [0, 255]), not normalised ones"
            )
        scale = 1.0 if hi <= 1 else 1 / 255
    if isinstance(x, np.memmap):  # read in the main process: a mapped row needs no decoding
        return LazyRows(ArraySource(x, scale), workers=0), scale
    return x.astype(np.float32) * np.float32(scale), scale


def _check_labels(y: np.ndarray, n: int, where: str, classes: tuple[str, ...]) -> np.ndarray | None:
    """``y`` as int64 class indices, or None when every label is -1 (unlabelled)."""
    fix = "labels must be class indices 0..K-1, one per image"
    if y.ndim != 1:
        hint = "; for one-hot labels save y.argmax(1)" if y.ndim == 2 else ""
        raise DataError(f"{where}: y must have shape ({n},), got shape {y.shape}; {fix}{hint}")
    if len(y) != n:
        raise DataError(f"{where}: x has {n} images but y has {len(y)} labels; {fix}")
    if y.dtype.kind not in "biuf":
        raise DataError(
            f"{where}: y holds {y.dtype} values, not numbers; {fix} (names go in 'classes')"
        )
    if y.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if len(bad):
            raise DataError(f"{where}: y[{bad[0]}] is {y[bad[0]]}, not a whole number; {fix}")
    if (y == -1).all():
        return None
    low = int(np.argmin(y))
    if y[low] < 0:
        raise DataError(f"{where}: y[{low}] is {y[low]}, a negative label; {fix}")
    top = int(y.max())
    if top >= MAX_CLASSES:
        raise DataError(
            f"{where}: y holds label {top}; {fix} (at most {MAX_CLASSES}): renumber them, "
            "e.g. numpy.unique(y, return_inverse=True)[1]"
        )
    if classes and top >= len(classes):
        raise DataError(
            f"{where}: y holds label {top} but 'classes' has only {len(classes)} names; "
            "save one name per class"
        )
    return y.astype(np.int64)
