"""Timing whole networks in onnxruntime against the dense one, on this machine.

Channel pruning aims at speed and multiply-accumulates do not predict it:
onnxruntime's CPU convolutions run in blocks of 8 (AVX2) or 16 (AVX-512) channels
and a fixed cost per operator dominates at batch 1, so a network with half the MACs
can be slower than the dense one. So candidates are *measured*
(:mod:`moonprune.channel_search`): each is exported as a bare classifier (the dense
weights, pruned: speed does not depend on the values) and timed against the dense
export in the same session, at batch 1 and at the deployment batch.

The measurement is a ratio. Each round times the dense file, every candidate, and
the dense file again (each the median of as many runs as fit in ``budget_s``, at
least ``min_runs``); a candidate's speed-up in that round is the mean of the two
dense times over its own, so a busy moment on a shared machine hits both sides
alike; the result is the median over ``rounds``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
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
ROUNDS = 5
BUDGET_S = 0.03  # per file, round and batch size
MIN_RUNS = 3


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
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
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


def _run_ms(session: Any, feed: dict[str, np.ndarray], budget_s: float) -> float:
    """Median ms of ``session.run`` over at least ``MIN_RUNS`` runs within ``budget_s``."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MIN_RUNS or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def time_speedups(dense: Path, candidates: Mapping[str, Path], batches: tuple[int, ...],
                  threads: int, *, rounds: int = ROUNDS,
                  budget_s: float = BUDGET_S) -> dict[str, dict[int, float]]:  # fmt: skip
    """Measured dense / candidate latency of each ONNX file at each batch size.

    The files take one float input ``[N, ...]`` (the first input; its other
    dimensions fixed); ``threads`` intra-op threads each. See the module docstring.
    """
    import onnxruntime as ort

    paths = {"": dense, **candidates}
    options = session_options(threads)
    cpu = ["CPUExecutionProvider"]
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
        ratios: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(rounds):
            before = _run_ms(sessions[""], feeds[""], budget_s)
            times = {n: _run_ms(sessions[n], feeds[n], budget_s) for n in candidates}
            after = _run_ms(sessions[""], feeds[""], budget_s)
            for name, ms in times.items():
                ratios[name].append((before + after) / 2 / ms)
        for name, values in ratios.items():
            result[name][batch] = statistics.median(values)
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
