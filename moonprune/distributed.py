"""Data-parallel training under ``torchrun``: which process does what.

Launched by ``torchrun --nproc-per-node N -m moonprune compress ...`` every process
runs the same pipeline on the same data (loading is deterministic), so everything
that must agree does so by construction or by one all-reduce:

- each global batch (``--batch-size``) of ``N`` rows is split row-wise over the
  ``W`` ranks (``n_r`` rows each, possibly 0); rank ``r`` back-propagates
  ``L_r = (W / N) * sum_{i in r} l_i`` and ``DistributedDataParallel`` averages the
  gradients: ``(1/W) sum_r grad L_r = grad (1/N) sum_i l_i``, the single-process
  gradient of the batch mean, however unevenly the rows were split;
- the process group uses the backend of the training device (gloo for CPU, nccl for
  CUDA), started by :meth:`DistContext.init_group` when the trainer is built;
- masks: RigL reads the averaged (identical) gradient, SET draws from identically
  seeded generators, magnitude/GMP are deterministic -- no broadcast needed;
- MOON's statistic ``t`` is the all-reduced sum over the global batch divided by the
  all-reduced row count, so it is the global-batch mean; so is the epoch's loss;
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
from datetime import timedelta

import torch
import torch.distributed as dist

from moonprune.errors import ConfigError


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
        """This rank's rows of a global batch (strided, so shards differ by at most 1;
        a batch with fewer rows than ranks leaves the last ranks none)."""
        return batch[self.rank :: self.world_size] if self.enabled else batch

    @property
    def rows(self) -> slice:
        """Which rows of a global batch are this rank's (:meth:`shard` takes them)."""
        return slice(self.rank, None, self.world_size) if self.enabled else slice(None)

    def share_of_mean(self, row_sum: torch.Tensor, n_global: int) -> torch.Tensor:
        """``row_sum * W / N``: this rank's term of the global-batch mean loss, whose
        gradient, averaged over the ``W`` ranks by DDP, is the gradient of the mean of
        all ``N`` rows (the module docstring); a rank without rows contributes 0."""
        return row_sum * (self.world_size / n_global)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """``values`` summed element-wise over all ranks (float64; unchanged when not
        distributed). Every rank must call it, in the same order."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(tensor)
        return [float(v) for v in tensor.tolist()]

    def init_group(self, device: torch.device) -> None:
        """Start the process group once, with the backend for ``device``: nccl for CUDA,
        gloo otherwise (``--device cpu`` on a machine with GPUs trains with gloo)."""
        if not self.enabled:
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        elif device.type != "cuda" and dist.get_backend() == "nccl":
            raise ConfigError(
                f"the process group was started with nccl but the model is on {device}; "
                "start it with gloo, or train on CUDA"
            )

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


#: How long a finished rank waits at the shutdown barrier for its peers.
SHUTDOWN_BARRIER_TIMEOUT = timedelta(seconds=120)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def from_env() -> DistContext:
    """The context ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``).

    The process group is not started here but by :meth:`DistContext.init_group`, once
    the device is known; the GPU per process (``LOCAL_RANK``) is chosen by
    :func:`moonprune.pipeline.resolve_device` only when the run is on CUDA.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size())
    return DistContext(int(os.environ.get("RANK", "0")), world_size)


def shutdown(finished: bool = False) -> None:
    """End the process group if one was started, as a ``torchrun`` process should
    before it exits (PyTorch asks for it: a gloo group left to the interpreter's exit
    can abort a rank while its peer tears down, failing a finished run).

    ``finished``: this rank completed its work normally. The ranks then meet at a
    barrier first (gloo: ``monitored_barrier``, which raises after
    :data:`SHUTDOWN_BARRIER_TIMEOUT` instead of waiting forever), so no rank closes its
    connections while a peer's gloo threads still finish the last collective (a
    finished rank aborted once with "terminate called without an active exception" in a
    CI run of ``tests/test_distributed.py``; the barrier narrows that window, it is not
    shown to close it). After a failure there is no barrier (a peer that failed would
    never arrive); the group is ended at once, as before.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if finished and dist.get_world_size() > 1:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=SHUTDOWN_BARRIER_TIMEOUT)
            else:
                dist.barrier()
    finally:
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a ``torchrun`` launch (no group needed)."""
    return os.environ.get("RANK", "0") == "0"
