"""Timing whole networks in onnxruntime: the dense model against a pruned one.

The latency table (:mod:`moonprune.latency`) predicts; this module measures. Before
any training, :class:`moonprune.structured.ChannelPruner` exports the planned
network (the dense weights, pruned: speed does not depend on the values) and the dense
one as bare classifiers to a temporary folder and times them here, rounds interleaved
so that a busy moment hits both alike, each model's fastest round kept. A run of
``budget_s`` seconds per model and batch bounds it.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moonprune.latency import session_options, time_session

logger = logging.getLogger(__name__)


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
    """``model`` alone (no rejector) as ONNX with a dynamic batch, for timing only."""
    was_training = model.training
    model.eval()
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(model, (example[:1],), str(path), input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "N"}},
                              dynamo=False)  # fmt: skip
    finally:
        model.train(was_training)


def time_files(paths: dict[str, Path], batch: int, threads: int, *, rounds: int = 3,
               budget_s: float = 0.15) -> dict[str, float]:  # fmt: skip
    """Median latency (ms) of each ONNX file at ``batch``, best of ``rounds`` interleaved."""
    import onnxruntime as ort

    sessions, feeds = {}, {}
    for name, path in paths.items():
        session = ort.InferenceSession(str(path), session_options(threads),
                                       providers=["CPUExecutionProvider"])  # fmt: skip
        first = session.get_inputs()[0]
        sample = [int(d) for d in first.shape[1:]]
        x = np.random.default_rng(0).standard_normal((batch, *sample)).astype(np.float32)
        sessions[name], feeds[name] = session, {first.name: x}
    best = {name: float("inf") for name in paths}
    for _ in range(rounds):
        for name, session in sessions.items():
            ms = 1000 * time_session(session, feeds[name], budget_s, min_runs=3)
            best[name] = min(best[name], ms)
    return best


def speedups(dense: nn.Module, pruned: nn.Module, example: torch.Tensor,
             batches: tuple[int, ...], threads: int) -> dict[int, float]:  # fmt: skip
    """Measured dense / pruned latency at each batch size (bare classifiers)."""
    with tempfile.TemporaryDirectory(prefix="moonprune-speed-") as tmp:
        paths = {"dense": Path(tmp) / "dense.onnx", "pruned": Path(tmp) / "pruned.onnx"}
        export_bare(dense, example, paths["dense"])
        export_bare(pruned, example, paths["pruned"])
        result = {}
        for batch in dict.fromkeys(batches):
            ms = time_files(paths, batch, threads)
            result[batch] = ms["dense"] / ms["pruned"]
    return result


def dense_latency(model: nn.Module, example: torch.Tensor, batch: int, threads: int) -> float:
    """Measured latency (ms) of ``model`` at ``batch``."""
    with tempfile.TemporaryDirectory(prefix="moonprune-speed-") as tmp:
        path = Path(tmp) / "model.onnx"
        export_bare(model, example, path)
        return time_files({"model": path}, batch, threads)["model"]
