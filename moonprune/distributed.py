"""Data-parallel training under ``torchrun``: which process does what.

Launched by ``torchrun --nproc-per-node N -m moonprune compress ...`` every process
runs the same pipeline on the same data (loading is deterministic), so everything
that must agree does so by construction or by one all-reduce:

- each global batch (``--batch-size``) is split row-wise over the ranks and the
  gradients are averaged by ``DistributedDataParallel`` (gloo on CPU, nccl on CUDA);
  with equal shard sizes that is the single-process gradient of the whole batch;
- masks: RigL reads the averaged (identical) gradient, SET draws from identically
  seeded generators, magnitude/GMP are deterministic -- no broadcast needed;
- MOON's statistic ``t`` is averaged over the ranks before it enters the EWMA;
- weight averaging and BatchNorm recalibration run on identical weights over the
  full training set on every rank; evaluation uses the full test set everywhere;
- only rank 0 writes files and prints.

BatchNorm layers see per-rank batch statistics while training (as with any DDP run
without SyncBatchNorm), so a network with BatchNorm differs slightly from a
single-process run; one without matches it to float rounding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """This process's rank among ``world_size`` (1 = not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (strided, so shards differ by at most 1)."""
        return batch[self.rank :: self.world_size] if self.enabled else batch

    def mean(self, value: float) -> float:
        """``value`` averaged over all ranks (itself when not distributed)."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world_size

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def from_env() -> DistContext:
    """The context ``torchrun`` describes in the environment; initialises the group once."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size())


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a ``torchrun`` launch (no group needed)."""
    return os.environ.get("RANK", "0") == "0"
