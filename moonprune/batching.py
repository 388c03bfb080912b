"""Batches of the training rows: a seeded order (so a resumed run sees the same
batches) and a last batch never too small for BatchNorm."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from moonprune.data import ImageSet
from moonprune.errors import ConfigError
from moonprune.streaming import LazyImages


def batch_starts(n: int, batch_size: int, min_last: int = 1) -> list[int]:
    """Where each batch of ``n`` rows starts; a last batch of fewer than ``min_last``
    rows joins the one before (BatchNorm cannot train on one row per channel)."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < min_last:
        starts.pop()
    return starts


def min_rows_per_batch(model: nn.Module, world_size: int = 1) -> int:
    """2 rows per process when ``model`` has BatchNorm (one row has no variance), else 1."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return 2 * world_size if has_bn else 1


def check_batch_size(model: nn.Module, batch_size: int, world_size: int = 1) -> int:
    """Refuse a batch BatchNorm cannot train on; returns the rows a batch needs."""
    min_rows = min_rows_per_batch(model, world_size)
    if batch_size < min_rows:
        where = "a process" if world_size > 1 else "a batch"
        raise ConfigError(
            f"--batch-size {batch_size} leaves {where} with fewer than 2 rows, on which "
            f"BatchNorm cannot train; use --batch-size {min_rows} or more"
        )
    return min_rows


def index_batches(
    n: int, batch_size: int, seed: int, shuffle: bool = True, min_last: int = 1
) -> list[torch.Tensor]:
    """The row indices of each batch of ``n`` rows, in an order fixed by ``seed`` (drop
    nothing; a last batch smaller than ``min_last`` is folded into the one before)."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(n)
    starts = batch_starts(n, batch_size, min_last)
    return [order[s:e] for s, e in zip(starts, [*starts[1:], n], strict=True)]


def read_batches(
    data: ImageSet, batches: list[torch.Tensor], device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` of each index batch, on ``device``. A lazily read set streams (worker
    processes read ahead, see :mod:`moonprune.streaming`); a tensor is indexed."""
    if isinstance(data.x, LazyImages):
        pin = device.type == "cuda"
        images = data.x.batches([b.numpy() for b in batches], pin_memory=pin)
    else:
        images = (data.x[b] for b in batches)
    for idx, x in zip(batches, images, strict=True):
        yield x.to(device, non_blocking=True), data.y[idx].to(device)


def iterate_batches(
    data: ImageSet,
    batch_size: int,
    seed: int,
    device: torch.device,
    shuffle: bool = True,
    min_last: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``data`` in an order fixed by ``seed`` (drop nothing; a last batch
    smaller than ``min_last`` is folded into the one before)."""
    batches = index_batches(len(data), batch_size, seed, shuffle, min_last)
    return read_batches(data, batches, device)
