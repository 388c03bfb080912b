"""Measured onnxruntime latency of convolutions and linear layers, per width.

Channel pruning aims at speed, and multiply-accumulates do not predict it:
onnxruntime's CPU convolutions run in blocks of 8 (AVX2) or 16 (AVX-512) channels,
so a layer cut from 16 to 11 channels can cost as much as before, while a fixed cost
per operator dominates at batch 1. So the channel allocation is driven by a
**latency lookup table** measured on this machine, as in NetAdapt (Yang et al., 2018:
layer-wise look-up tables of measured latency, summed to estimate the network) and
HALP (Shen et al., 2022: the latency of each layer as a function of its input and
output channel counts, read from a table, as the cost of a global knapsack on
importance). Per-layer tables rather than timing every candidate network: the greedy
allocation asks for thousands of candidates, a table entry serves them all, and it
is reused across runs (the cache below).

An entry is one operator alone in a graph (``Conv`` + ``Relu``, or ``Gemm``) with the
layer's exact signature (channels, kernel, stride, padding, groups, input size) at a
batch size and an intra-op thread count, timed by onnxruntime (median of a bounded
number of runs) less the cost of running an empty graph. The network's latency is
predicted from its measured dense latency plus the table's change for every layer:
``T(pruned) = T(dense) + sum_l [t_l(pruned widths) - t_l(dense widths)]``; operators
outside the table (additions, pooling, the rejector) are taken as unchanged.
``benchmarks/structured.py`` measures how far that prediction is from the exported
graph.

The cache is a JSON file per (CPU model, onnxruntime version, batch, threads) under
``$MOONPRUNE_CACHE_DIR`` or ``~/.cache/moonprune/latency`` (a folder moonprune
creates and owns); a damaged file is measured again, never trusted.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

logger = logging.getLogger(__name__)
CACHE_ENV = "MOONPRUNE_CACHE_DIR"
CACHE_VERSION = 1


def default_threads() -> int:
    """The CPUs this process may run on (onnxruntime's intra-op thread count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def nchwc_block() -> int:
    """Channels per block of onnxruntime's NCHWc convolutions on this CPU.

    onnxruntime (MLAS) moves a convolution into its blocked layout only when the
    channel counts are multiples of the block: 16 floats with AVX-512, 8 with AVX2.
    A width between blocks runs the plain NCHW kernel with layout changes around it,
    which a layer timed alone does not show; so the latency allocation keeps widths on
    this grid.
    """
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return 16 if "avx512f" in line.split() else 8
    return 8


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine() or "cpu"


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "moonprune" / "latency"


@dataclass(frozen=True)
class LayerShape:
    """What a layer's latency depends on (``c_in``/``c_out`` are the pruned sizes)."""

    kind: str  # "conv" or "linear"
    c_in: int
    c_out: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    spatial: tuple[int, ...] = ()  # the input's spatial size

    def key(self) -> str:
        return json.dumps([self.kind, self.c_in, self.c_out, self.kernel, self.stride,
                           self.padding, self.dilation, self.groups, self.spatial])  # fmt: skip

    def with_widths(self, c_in: int, c_out: int) -> LayerShape:
        depthwise = self.groups > 1 and self.groups == self.c_in
        groups = c_in if depthwise else self.groups
        return LayerShape(self.kind, c_in, c_out, self.kernel, self.stride, self.padding,
                          self.dilation, groups, self.spatial)  # fmt: skip


def layer_shape(module: nn.Module, spatial: tuple[int, ...]) -> LayerShape | None:
    """The signature of a Conv1d/Conv2d/Linear at its current size; None for others."""
    if isinstance(module, nn.Linear):
        return LayerShape("linear", module.in_features, module.out_features)
    if isinstance(module, nn.Conv1d | nn.Conv2d) and isinstance(module.padding, tuple):
        return LayerShape("conv", module.in_channels, module.out_channels,
                          tuple(module.kernel_size), tuple(module.stride), tuple(module.padding),
                          tuple(module.dilation), module.groups, spatial)  # fmt: skip
    return None


def _operator_graph(shape: LayerShape | None, batch: int) -> tuple[bytes, tuple[int, ...]]:
    """One operator (or, for ``None``, an empty-work graph) as serialized ONNX."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if shape is None:
        x_shape: tuple[int, ...] = (1,)
        nodes = [helper.make_node("Relu", ["x"], ["y"])]
        inits = []
    elif shape.kind == "linear":
        x_shape = (batch, shape.c_in)
        w = rng.standard_normal((shape.c_out, shape.c_in)).astype(np.float32)
        b = np.zeros(shape.c_out, np.float32)
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    else:
        x_shape = (batch, shape.c_in, *shape.spatial)
        w_shape = (shape.c_out, shape.c_in // shape.groups, *shape.kernel)
        w = (0.1 * rng.standard_normal(w_shape)).astype(np.float32)
        b = np.zeros(shape.c_out, np.float32)
        nodes = [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=list(shape.kernel),
                             strides=list(shape.stride), pads=list(shape.padding) * 2,
                             dilations=list(shape.dilation), group=shape.groups),
            helper.make_node("Relu", ["c"], ["y"]),
        ]  # fmt: skip
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    graph = helper.make_graph(
        nodes, "op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(), x_shape


def time_session(session: Any, feed: dict[str, np.ndarray], budget_s: float,
                 min_runs: int = 5, max_runs: int = 200) -> float:  # fmt: skip
    """Median seconds of ``session.run`` over at least ``min_runs`` runs, within a budget."""
    for _ in range(2):
        session.run(None, feed)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (
        len(times) < min_runs or time.perf_counter() - start < budget_s
    ):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def session_options(threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


class LatencyTable:
    """Latency (ms) of single layers at one batch size and thread count, cached on disk."""

    def __init__(self, batch: int, threads: int, cache: Path | None = None,
                 budget_s: float = 0.02) -> None:  # fmt: skip
        import onnxruntime as ort

        self.batch, self.threads, self.budget_s = batch, threads, budget_s
        tag = "".join(c if c.isalnum() else "-" for c in cpu_model())[:60]
        self.path = (cache or cache_dir()) / f"{tag}_ort{ort.__version__}_b{batch}_t{threads}.json"
        self.entries: dict[str, float] = self._read()
        self.measured = 0
        self._dirty = False

    def _read(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") == CACHE_VERSION and isinstance(data.get("entries"), dict):
                return {str(k): float(v) for k, v in data["entries"].items()}
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        return {}

    def save(self) -> None:
        """Write the table if new entries were measured (atomically: temp file, rename)."""
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"version": CACHE_VERSION, "cpu": cpu_model(), "batch": self.batch,
                              "threads": self.threads, "entries": self.entries})  # fmt: skip
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".latency-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(payload)
        os.replace(tmp, self.path)
        self._dirty = False

    def _measure(self, shape: LayerShape | None) -> float:
        import onnxruntime as ort

        blob, x_shape = _operator_graph(shape, self.batch)
        session = ort.InferenceSession(blob, session_options(self.threads),
                                       providers=["CPUExecutionProvider"])  # fmt: skip
        x = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)
        self.measured += 1
        self._dirty = True
        return 1000 * time_session(session, {"x": x}, self.budget_s)

    def overhead(self) -> float:
        """ms to run a graph that does no work (subtracted from every entry)."""
        if "overhead" not in self.entries:
            self.entries["overhead"] = min(self._measure(None) for _ in range(3))
        return self.entries["overhead"]

    def __call__(self, shape: LayerShape) -> float:
        """ms of ``shape`` at this batch and thread count, less the empty-graph cost."""
        key = shape.key()
        if key not in self.entries:
            self.entries[key] = self._measure(shape)
        return max(self.entries[key] - self.overhead(), 0.0)


def input_sizes(model: nn.Module, example: Any) -> dict[str, tuple[int, ...]]:
    """Each conv/linear layer's input spatial size by module name (one eval forward).

    By name, so that the sizes serve a deep copy of ``model`` too; pruning channels
    does not change them.
    """
    import torch

    sizes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear):

            def record(module: nn.Module, inputs: Any, _output: Any, name: str = name) -> None:
                conv = isinstance(module, nn.Conv1d | nn.Conv2d)
                sizes[name] = tuple(int(s) for s in inputs[0].shape[2:]) if conv else ()

            hooks.append(m.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return sizes


def layers_latency(
    model: nn.Module, sizes: dict[str, tuple[int, ...]], table: LatencyTable
) -> float:
    """Sum of the table's latency (ms) over ``model``'s conv and linear layers as they are."""
    total = 0.0
    for name, module in model.named_modules():
        if name in sizes:
            shape = layer_shape(module, sizes[name])
            if shape is not None:
                total += table(shape)
    return total


class TableCost:
    """A layer's cost for the allocator: its table latency, summed over weighted tables.

    With tables at batch 1 and at the deployment batch, each weighted by one over the
    dense network's total at that batch, a chunk's saving is its share of both
    latencies (HALP's latency cost, at two batch sizes).
    """

    def __init__(self, model: nn.Module, sizes: dict[str, tuple[int, ...]],
                 tables: list[tuple[LatencyTable, float]]) -> None:  # fmt: skip
        self.sizes = {m: sizes[n] for n, m in model.named_modules() if n in sizes}
        self.tables = tables

    def __call__(self, m: nn.Module, d_in: int = 0, d_out: int = 0) -> float:
        if m not in self.sizes:
            return 0.0
        shape = layer_shape(m, self.sizes[m])
        if shape is None:
            return 0.0
        shape = shape.with_widths(shape.c_in - d_in, shape.c_out - d_out)
        return sum(weight * table(shape) for table, weight in self.tables)
