"""Data specs -> normalised image tensors, split deterministically.

A *spec* is a string (DESIGN.md): a built-in set (``digits``, ``noise``, ...), with an
optional class subset (``digits:0-5``, ``digits:0,2,4``). Every source yields
:class:`RawImages` (float images in [0, 1], ``(N, C, H, W)``); the in-distribution
(ID) set fixes the :class:`Preprocessing` (size, channels, mean/std), and every OOD
set is converted to it, so the model always sees the same kind of tensor.

Splits are stratified and deterministic in the seed: the same spec and seed give the
same train/val/test indices on every machine.

The containers live in :mod:`moonprune.image_sets`, :class:`Preprocessing` in
:mod:`moonprune.preprocessing` and OOD loading in :mod:`moonprune.ood_sets`; this
module is their public home and owns the ID splits.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from moonprune import folders, sources
from moonprune.errors import DataError
from moonprune.image_sets import ImageSet as ImageSet
from moonprune.image_sets import Splits as Splits
from moonprune.ood_sets import load_ood as load_ood
from moonprune.preprocessing import Preprocessing as Preprocessing
from moonprune.preprocessing import conform_to as conform_to
from moonprune.preprocessing import dataset_preprocessing as dataset_preprocessing
from moonprune.sources import RawImages
from moonprune.specs import ReadOptions as ReadOptions
from moonprune.specs import load_raw as load_raw
from moonprune.specs import parse_spec as parse_spec
from moonprune.specs import take_classes

logger = logging.getLogger(__name__)

#: Default train/val/test fractions when a source has no split of its own.
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


def stratified_split(
    labels: np.ndarray,
    seed: int,
    fractions: tuple[float, float, float] = SPLIT_FRACTIONS,
    allow_empty_test: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class shuffled indices cut by ``fractions``; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = round(fractions[0] * len(idx))
        n_val = round(fractions[1] * len(idx))
        parts[0].append(idx[:n_train])
        parts[1].append(idx[n_train : n_train + n_val])
        parts[2].append(idx[n_train + n_val :])
    train, val, test = (np.sort(np.concatenate(p)) for p in parts)
    if min(len(train), len(val), len(test) or int(allow_empty_test)) == 0:
        raise DataError(f"too few images ({len(labels)}) to split into train/val/test; add data")
    return train, val, test


def _predefined_splits(spec: str, options: ReadOptions) -> dict[str, RawImages] | None:
    """``root/train``, ``root/val``, ``root/test`` of an ImageFolder, when present."""
    name, subset = parse_spec(spec)
    root = Path(name)
    with sources.reading(root):
        present = [p for p in ("train", "val", "test") if root.is_dir() and (root / p).is_dir()]
    if "train" not in present:
        return None
    parts = {}
    for part in present:
        parts[part] = take_classes(
            folders.read_image_folder(
                root / part, options.size, options.channels, options.on_bad_image, options.workers
            ),
            subset,
            f"{spec}/{part}",
        )
    train = parts["train"]
    size = options.size or (train.images.shape[2], train.images.shape[3])
    for part, raw in parts.items():
        if raw.classes != train.classes:
            raise DataError(
                f"{name}/{part} has classes {list(raw.classes)} but {name}/train has "
                f"{list(train.classes)}; every split needs the same class folders"
            )
        if raw.images.shape[1:] != train.images.shape[1:]:
            parts[part] = RawImages(
                sources.conform(raw.images, train.images.shape[1], size),
                raw.labels,
                raw.classes,
                raw.pixel_scale,
            )
    return parts


def _require_two_classes(train: RawImages, spec: str) -> None:
    """A set of one class leaves nothing to tell apart: the threshold would accept all."""
    assert train.labels is not None  # every reader of ID data gives labels
    present = [train.classes[c] for c in np.unique(train.labels)]
    if len(present) < 2:
        empty = sorted(set(train.classes) - set(present))
        unused = f" (no training images for {', '.join(map(repr, empty))})" if empty else ""
        raise DataError(
            f"the ID data {spec!r} has training images of only 1 class ({present[0]!r})"
            f"{unused}; moonprune needs at least 2 classes: add classes or widen the subset"
        )


def load_splits(
    spec: str,
    seed: int = 0,
    options: ReadOptions | None = None,
    preprocessing: Preprocessing | None = None,
) -> Splits:
    """The ID data set ``spec``, normalised with its training split's mean/std, split.

    An ImageFolder with ``train/`` (and optionally ``val/``, ``test/``) keeps its
    splits; a missing ``val``/``test`` is carved from ``train``. Otherwise the whole
    set is split 60/20/20, stratified, deterministically in ``seed``.

    With ``preprocessing`` (a saved model's, or one :mod:`moonprune.normalization`
    chose), images are converted to its input and normalised with its statistics
    instead of the training split's.

    Example::

        >>> import moonprune
        >>> splits = moonprune.load_splits("digits:0-5", seed=0)
        >>> splits.num_classes, len(splits.train), len(splits.val), len(splits.test)
        (6, 650, 216, 217)
    """
    return make_splits(spec, read_split_images(spec, seed, options), preprocessing)


def read_split_images(
    spec: str, seed: int = 0, options: ReadOptions | None = None
) -> dict[str, RawImages]:
    """The ``train``/``val``/``test`` images of ``spec`` in [0, 1], not yet normalised."""
    options = options or ReadOptions()
    given = _predefined_splits(spec, options)
    if given is None:
        raw = load_raw(spec, options)
        if raw.labels is None:
            raise DataError(
                f"the ID data {spec!r} has no labels; training needs labelled images (an .npz "
                "needs y, class indices 0..K-1); an unlabelled set belongs in --ood"
            )
        idx = stratified_split(raw.labels, seed)
        parts = {
            part: RawImages(raw.images[i], raw.labels[i], raw.classes, raw.pixel_scale)
            for part, i in zip(("train", "val", "test"), idx, strict=True)
        }
    else:
        parts = dict(given)
        train = parts["train"]
        missing = [p for p in ("val", "test") if p not in parts]
        if missing:
            assert train.labels is not None
            fractions = (0.6, 0.2, 0.2) if len(missing) == 2 else (0.8, 0.2, 0.0)
            tr, va, te = stratified_split(train.labels, seed, fractions, allow_empty_test=True)
            carved = [va, te] if len(missing) == 2 else [va]
            for part, i in zip(missing, carved, strict=True):
                parts[part] = RawImages(
                    train.images[i], train.labels[i], train.classes, train.pixel_scale
                )
            parts["train"] = RawImages(
                train.images[tr], train.labels[tr], train.classes, train.pixel_scale
            )
    _require_two_classes(parts["train"], spec)
    return parts


def make_splits(
    spec: str, parts: dict[str, RawImages], preprocessing: Preprocessing | None = None
) -> Splits:
    """:func:`read_split_images`' parts normalised with ``preprocessing`` (default: the
    training split's mean/std)."""
    if preprocessing is None:
        pre = dataset_preprocessing(parts["train"])
    else:
        pre = preprocessing
        parts = {name: conform_to(raw, pre) for name, raw in parts.items()}

    def to_set(part: str) -> ImageSet:
        raw = parts[part]
        assert raw.labels is not None
        return ImageSet(
            f"{spec}/{part}", pre.normalise(raw.images), torch.from_numpy(raw.labels), raw.classes
        )

    return Splits(to_set("train"), to_set("val"), to_set("test"), pre)
