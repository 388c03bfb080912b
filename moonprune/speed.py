"""Timing whole networks in onnxruntime against the dense one, on this machine.

Channel pruning aims at speed and multiply-accumulates do not predict it:
onnxruntime's CPU convolutions run in blocks of 8 (AVX2) or 16 (AVX-512) channels
and a fixed cost per operator dominates at batch 1, so a network with half the MACs
can be slower than the dense one. So candidates are *measured*
(:mod:`moonprune.sparsity.channel.search`): each is exported (the dense weights, pruned:
speed does not depend on the values; ``compress`` wraps it in a stand-in of the
deployed rejector first, :mod:`moonprune.sparsity.channel.deployed_timing`) and timed
against the dense export in the same session, at batch 1 and at the deployment batch.

The measurement is a ratio of two timings taken together: runs of the dense file and
of the candidate alternate (which goes first alternates too), in ``ROUNDS`` rounds over
all candidates (at least ``MIN_PAIRS`` pairs per round, ``budget_s`` per candidate in
all), and the speed-up is the dense file's fastest run over the candidate's.
Interference from other processes only ever slows a run down, so the fastest of many
interleaved runs is the least disturbed figure for both (``timeit``'s advice); medians
of rounds were tried first and swung 1.0x-1.4x between two runs on a 2-core machine
shared with other jobs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)
BUDGET_S = 0.2  # per candidate and batch size, over all rounds
ROUNDS = 4
MIN_PAIRS = 3  # per candidate and round


def default_threads() -> int:
    """The CPUs this process may run on (onnxruntime's intra-op thread count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def nchwc_block() -> int:
    """Channels per block of onnxruntime's NCHWc convolutions on this CPU.

    onnxruntime (MLAS) runs a convolution in its blocked layout when the channel
    counts are multiples of the block, 16 floats with AVX-512 and 8 with AVX2; a width
    between blocks runs a plain kernel with layout changes around it.
    """
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return 16 if "avx512f" in line.split() else 8
    return 8


def session_options(threads: int) -> Any:
    """Options of a timing session: ``threads`` intra-op threads that do not spin.

    onnxruntime's pool threads spin-wait after each run by default; with two sessions
    run in turn, the idle one's spinning threads take the cores from the other, and on
    a 2-core machine the measured speed-up at batch 64 swung 0.9x-1.6x between calls
    (without spinning: within 0.05x).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def export_bare(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """``model`` alone (no rejector), on the CPU, as ONNX with a dynamic batch."""
    was_training = model.training
    model.eval()
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(model, (example[:1],), str(path), input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "N"}},
                              dynamo=False)  # fmt: skip
    finally:
        model.train(was_training)


def _run_ms(session: Any, feed: dict[str, np.ndarray]) -> float:
    t0 = time.perf_counter()
    session.run(None, feed)
    return 1000 * (time.perf_counter() - t0)


def time_speedups(dense: Path, candidates: Mapping[str, Path], batches: tuple[int, ...],
                  threads: int, *,
                  budget_s: float = BUDGET_S) -> dict[str, dict[int, float]]:  # fmt: skip
    """Measured dense / candidate latency of each ONNX file at each batch size.

    The files take one float input ``[N, ...]`` (the first input; its other
    dimensions fixed); ``threads`` intra-op threads each. See the module docstring.
    """
    import onnxruntime as ort

    options = session_options(threads)
    cpu = ["CPUExecutionProvider"]
    paths = {"": dense, **candidates}
    sessions = {name: ort.InferenceSession(str(p), options, providers=cpu)
                for name, p in paths.items()}  # fmt: skip
    result: dict[str, dict[int, float]] = {name: {} for name in candidates}
    for batch in dict.fromkeys(batches):
        feeds = {}
        for name, session in sessions.items():
            first = session.get_inputs()[0]
            shape = (batch, *(int(d) for d in first.shape[1:]))
            x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            feeds[name] = {first.name: x}
            for _ in range(2):  # warm-up: first runs allocate and pick kernels
                session.run(None, feeds[name])
        times: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in candidates}
        for _ in range(ROUNDS):  # spread over time: a busy spell hits every candidate
            for name, (dense_ms, own_ms) in times.items():
                start, n = time.perf_counter(), 0
                while n < MIN_PAIRS or time.perf_counter() - start < budget_s / ROUNDS:
                    order = ((dense_ms, ""), (own_ms, name))
                    for runs, side in order if n % 2 else order[::-1]:
                        runs.append(_run_ms(sessions[side], feeds[side]))
                    n += 1
        for name, (dense_ms, own_ms) in times.items():
            result[name][batch] = min(dense_ms) / min(own_ms)
    return result


def measure_speedups(dense: nn.Module, candidates: Mapping[str, nn.Module],
                     example: torch.Tensor, batches: tuple[int, ...],
                     threads: int) -> dict[str, dict[int, float]]:  # fmt: skip
    """:func:`time_speedups` of networks: each exported bare to a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="moonprune-speed-") as tmp:
        dense_path = Path(tmp) / "dense.onnx"
        export_bare(dense, example.cpu(), dense_path)
        paths = {}
        for i, (name, model) in enumerate(candidates.items()):
            paths[name] = Path(tmp) / f"candidate{i}.onnx"
            export_bare(model, example.cpu(), paths[name])
        return time_speedups(dense_path, paths, batches, threads)
