"""Model input streamed in batches: a tensor-like view over :class:`LazyRows`.

:class:`LazyImages` is what :attr:`moonprune.data.ImageSet.x` holds for data read
lazily (an ImageFolder, an ``.npz`` file): it has the parts of a ``(N, C, H, W)``
float32 tensor that evaluation and training use (``len``, ``shape``, ``split`` into
batches, indexing that returns a tensor), but it never holds more than a few batches.
Batches are read by :func:`stream`: a ``torch.utils.data.DataLoader`` whose worker
processes decode, convert, resize and normalise whole batches of rows chosen by the
caller, in the caller's order. The order and every random draw stay in the main
process, so the same seed gives the same batches with any number of workers, a
resumed run sees the same order, and data-parallel ranks read only their own rows.

Training-time augmentation (:mod:`moonprune.augment`) runs in the main process on
the finished batch, not in the workers: it is a few tensor operations per batch, and
drawing its offsets from one per-epoch generator keeps it identical to the in-memory
path (and across ranks) without seeding every worker.

Example::

    >>> import numpy as np
    >>> from moonprune.data import Preprocessing
    >>> from moonprune.rows import ArraySource, LazyRows
    >>> pre = Preprocessing(1, 4, 4, 1 / 255, (0.5,), (0.25,))
    >>> rows = LazyRows(ArraySource(np.zeros((10, 1, 4, 4), np.uint8), 1 / 255), workers=0)
    >>> x = LazyImages(rows, pre)
    >>> [tuple(b.shape) for b in x.split(4)]
    [(4, 1, 4, 4), (4, 1, 4, 4), (2, 1, 4, 4)]
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moonprune.errors import DataError
from moonprune.rows import CHUNK, LazyRows, concat_rows

if TYPE_CHECKING:
    from moonprune.data import Preprocessing

#: Most worker processes chosen by default (decoding rarely needs more on a CPU box).
MAX_DEFAULT_WORKERS = 4
#: Input values per evaluation batch (4 MiB of float32 input; the activations of a
#: small CNN are some tens of times that): bounds memory on large images.
EVAL_BUDGET = 2**20


def batch_rows(shape: Sequence[int], cap: int = 512) -> int:
    """Rows per batch for a forward pass without gradients over inputs of ``shape``
    ``(N, C, H, W)``: ``cap`` for small images (digits, MNIST: the historical 512),
    fewer for large ones so that a batch holds at most :data:`EVAL_BUDGET` values
    (85 rows of 3x64x64, 16 at least)."""
    per_row = max(1, int(np.prod(shape[1:])))
    return max(16, min(cap, EVAL_BUDGET // per_row))


#: glibc's ``M_MMAP_THRESHOLD`` (malloc.h) and the value :func:`limit_heap_growth` sets.
M_MMAP_THRESHOLD, MMAP_THRESHOLD = -3, 256 * 1024


def limit_heap_growth() -> bool:
    """Keep large blocks (activations, batches) out of glibc's heap; True when set.

    glibc raises its mmap threshold after every large ``free`` (up to 32 MiB), so the
    activations of later batches are carved from the heap, where the small tensors kept
    between batches (logits, features) pin them: the process's memory then grows with
    the number of rows evaluated (``benchmarks/data_scale.py``: 2.1 GB for 64k images
    of 3x64x64, against 0.27 GB with a fixed threshold, for the same evaluation). A
    fixed threshold of 256 KiB returns every larger block to the system when freed.
    ``moonprune``'s commands call this at start; a Python caller may too (it changes
    this process's allocator, nothing else). Not on other platforms or C libraries, and
    not when the environment sets ``MALLOC_MMAP_THRESHOLD_`` itself.
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # musl, or no mallopt
        return False


def default_workers() -> int:
    """Worker processes for reading: one per CPU beyond the first, at most 4 (on one
    CPU, 0: reading in the main process)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return min(MAX_DEFAULT_WORKERS, max(0, cpus - 1))


def check_workers(workers: int | None) -> int:
    """``workers`` (None: :func:`default_workers`), refused when negative."""
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise DataError(f"--workers must be 0 or a positive whole number, got {workers!r}")
    return workers


class _BatchReader(torch.utils.data.Dataset[Any]):
    """``reader[positions]``: those rows of ``rows``, normalised by ``pre`` (a float32
    tensor), or the :class:`DataError` that reading raised (a worker's exception would
    reach the main process wrapped in its traceback, not as one line)."""

    def __init__(self, rows: LazyRows, pre: Preprocessing | None) -> None:
        self.rows = rows
        self.pre = pre

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, positions: Any) -> torch.Tensor | DataError:
        try:
            images = self.rows.read(positions)
        except DataError as exc:
            return exc
        if self.pre is None:
            return torch.from_numpy(images)
        return self.pre.normalise(images)


#: the name :class:`multiprocessing.Queue` gives its feeder thread (CPython's queues.py)
FEEDER_THREAD = "QueueFeederThread"


def settle_threads(timeout: float = 0.25) -> None:
    """Wait (at most ``timeout`` seconds in all) for this process's multiprocessing
    queue feeder threads to end before a DataLoader forks its workers.

    A worker forked while another thread is ending can hang for ever on CPython 3.11:
    the child, in ``PyOS_AfterFork_Child``, waits for a runtime lock the ending thread
    held at the moment of the fork. Seen once in ``.ci/run`` (a DDP test on a streamed
    folder; gdb showed the worker in ``_PyThreadState_DeleteExcept``): the previous
    loader's index-queue feeder threads are told to close and end on their own, just as
    the next loader forks. A thread still alive after the wait is one blocked in a wait
    (another live loader's feeder), which holds no such lock. Only feeders are waited
    for: a long-lived thread (the console's progress refresh) would cost the whole
    timeout on every loader.
    """
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread.name == FEEDER_THREAD and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


def keep_as_is(batch: Any) -> Any:
    """A ``collate_fn`` for readers that return whole batches (nothing to stack)."""
    return batch


def stream(
    rows: LazyRows,
    batches: Sequence[np.ndarray | slice],
    pre: Preprocessing | None = None,
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[torch.Tensor]:
    """The rows of each of ``batches`` (positions in ``rows``), in order, as float32
    tensors (normalised by ``pre`` when given), read by ``workers`` processes."""
    reader = _BatchReader(rows, pre)
    if workers == 0 or len(batches) <= 1:
        results: Any = (reader[b] for b in batches)
    else:
        settle_threads()
        results = torch.utils.data.DataLoader(
            reader,
            sampler=batches,  # each element is one batch
            batch_size=None,
            num_workers=min(workers, len(batches)),
            collate_fn=keep_as_is,
            pin_memory=pin_memory,
            prefetch_factor=4,
        )
    for result in results:
        if isinstance(result, DataError):
            raise result
        yield result


class LazyImages:
    """Normalised model input (N, C, H, W) float32, read in batches on demand.

    ``split(b)`` streams batches of ``b`` rows in order; ``x[key]`` (a slice, an index
    array or tensor) reads those rows now and returns a tensor; :meth:`materialize`
    reads everything (for small sets only).
    """

    ndim = 4
    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, rows: LazyRows, pre: Preprocessing) -> None:
        self.rows = rows
        self.pre = pre
        self.workers = check_workers(rows.workers)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"LazyImages(shape={tuple(self.shape)}, workers={self.workers})"

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.rows.shape)

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        batch = _BatchReader(self.rows, self.pre)[key]
        if isinstance(batch, DataError):
            raise batch
        return batch

    def batches(
        self, positions: Sequence[np.ndarray | slice], pin_memory: bool = False
    ) -> Iterator[torch.Tensor]:
        """The rows at each entry of ``positions``, in order (see :func:`stream`)."""
        return stream(self.rows, positions, self.pre, self.workers, pin_memory)

    def split(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Consecutive batches of ``batch_size`` rows, like ``torch.Tensor.split``."""
        n = len(self)
        return self.batches([slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)])

    def materialize(self) -> torch.Tensor:
        """Every row as one tensor (memory: ``4 * N * C * H * W`` bytes)."""
        rows = batch_rows(self.shape)
        return torch.cat(list(self.split(rows))) if len(self) else torch.empty(self.shape)

    def numpy(self) -> np.ndarray:
        return self.materialize().numpy()

    def fingerprint(self) -> bytes:
        return self.rows.fingerprint()


def concat_images(parts: Sequence[torch.Tensor | LazyImages]) -> torch.Tensor | LazyImages:
    """``parts`` as one set: one lazy view when they are views of one source with the
    same preprocessing (the splits of a folder), else one tensor (read into memory)."""
    lazy = [p for p in parts if isinstance(p, LazyImages)]
    if len(lazy) == len(parts) and all(p.pre == lazy[0].pre for p in lazy):
        rows = concat_rows([p.rows for p in lazy])
        if rows is not None:
            return LazyImages(rows, lazy[0].pre)
    return torch.cat([p.materialize() if isinstance(p, LazyImages) else p for p in parts])


def channel_stats(rows: np.ndarray | LazyRows) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of (N, C, H, W) images in [0, 1]: numpy's
    for an array; one float64 pass in batches for a view (read by its workers)."""
    if isinstance(rows, np.ndarray):
        return rows.mean(axis=(0, 2, 3)), rows.std(axis=(0, 2, 3))
    channels = rows.shape[1]
    total, squares = np.zeros(channels), np.zeros(channels)
    n = len(rows)
    chunks = [slice(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]
    for chunk in stream(rows, chunks, None, check_workers(rows.workers)):
        chunk64 = chunk.numpy().astype(np.float64)
        total += chunk64.sum(axis=(0, 2, 3))
        squares += (chunk64**2).sum(axis=(0, 2, 3))
    count = n * rows.shape[2] * rows.shape[3]
    mean = total / count
    return mean, np.sqrt(np.maximum(squares / count - mean**2, 0.0))


#: Model input in memory or read lazily: what :attr:`moonprune.data.ImageSet.x` holds.
Images = torch.Tensor | LazyImages
