"""An ImageFolder (``root/<class>/<image>``) read lazily: checked once, decoded per batch.

Reading a folder has two steps. The *check* decodes every file once (in worker
processes, keeping nothing but its shape and bit depth): an undecodable file is
skipped with a warning or refused (``on_bad_image``), a folder mixing bit depths is
refused, and the model's input (channels, size) is fixed, all before anything is
trained or written. The result is a :class:`~moonprune.rows.LazyRows` over the good
files: images are decoded again, one batch at a time, when training or evaluation
reads them, so memory does not grow with the number of images.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moonprune.errors import DataError
from moonprune.rows import FolderSource, LazyRows
from moonprune.sources import RawImages
from moonprune.streaming import check_workers, keep_as_is, settle_threads
from moonprune.user_data import list_image_folder, read_image

logger = logging.getLogger(__name__)

#: Files decoded per task of the check.
CHECK_CHUNK = 64
#: What the check learns of a file: (channels, height, width, pixel scale), or why it
#: cannot be decoded.
Probe = tuple[int, int, int, float] | str
DEPTH_NAMES = {1 / 255: "8-bit", 1 / 65535: "16-bit", 1.0: "float"}


class _Check(torch.utils.data.Dataset[Any]):
    """``check[chunk]``: the :data:`Probe` of each file in ``files[chunk]``."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, chunk: slice) -> list[Probe]:
        out: list[Probe] = []
        for path in self.files[chunk]:
            try:
                image, scale = read_image(path)
            # a malformed file can fail anywhere inside a Pillow plugin; each is a bad
            # image, reported with its path by the caller (never swallowed)
            except Exception as exc:
                out.append(str(exc) or type(exc).__name__)
                continue
            c, h, w = image.shape
            out.append((c, h, w, scale))
        return out


def check_files(files: list[Path], workers: int) -> list[Probe]:
    """Decode each of ``files`` once (``workers`` processes) and return its probe."""
    check = _Check(files)
    chunks = [slice(s, s + CHECK_CHUNK) for s in range(0, len(files), CHECK_CHUNK)]
    if workers == 0 or len(chunks) <= 1:
        results: Any = (check[c] for c in chunks)
    else:
        settle_threads()
        results = torch.utils.data.DataLoader(
            check, sampler=chunks, batch_size=None, collate_fn=keep_as_is,
            num_workers=min(workers, len(chunks)),
        )  # fmt: skip
    return [probe for chunk in results for probe in chunk]


def read_image_folder(
    root: Path,
    size: tuple[int, int] | None,
    channels: int | None,
    on_bad_image: str = "skip",
    workers: int | None = None,
) -> RawImages:
    """The images of an ImageFolder, conformed to ``channels`` x ``size`` on read.

    ``size``/``channels`` default to those of the first image and to RGB when any image
    is RGB (so a folder of equally sized images needs no options). ``workers``
    processes check the files and later read batches (None: the machine's default).
    """
    workers = check_workers(workers)
    files, labels, classes = list_image_folder(root)
    probes = check_files(files, workers)
    kept: list[int] = []
    for i, probe in enumerate(probes):
        if isinstance(probe, str):
            if on_bad_image == "fail":
                raise DataError(
                    f"cannot decode image {str(files[i])!r} ({probe}); remove it or pass "
                    "--on-bad-image skip"
                )
            logger.warning("skipping undecodable image %s (%s)", files[i], probe)
        else:
            kept.append(i)
    if not kept:
        raise DataError(f"none of the images in {str(root)!r} could be decoded")
    good = [p for p in probes if not isinstance(p, str)]
    scales = sorted({p[3] for p in good})
    if len(scales) > 1:
        depths = " and ".join(DEPTH_NAMES[s] for s in scales)
        raise DataError(
            f"{str(root)!r} mixes {depths} images; the exported model takes one raw pixel "
            "range, so convert them all to one bit depth"
        )
    first = good[0]
    target_c = channels or (3 if any(p[0] == 3 for p in good) else 1)
    target_hw = size or (first[1], first[2])
    source = FolderSource([files[i] for i in kept], (target_c, *target_hw))
    label_array = np.asarray([labels[i] for i in kept], dtype=np.int64)
    return RawImages(LazyRows(source, workers=workers), label_array, classes, scales[0])
