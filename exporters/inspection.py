"""``inspect`` and ``bench``: what is in a .pt or .onnx file, and how fast ORT runs it."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from moonprune.exporters.onnx_export import gzip_size
from moonprune.exporters.opsets import written_opset

from moonprune.errors import ConfigError, ExportError

#: The graph initializer holding the rejection threshold (RejectingClassifier's buffer).
THRESHOLD_NAME = "threshold"


def _layer_rows(named: list[tuple[str, np.ndarray]]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for name, w in named:
        nz = int(np.count_nonzero(w))
        rows.append({"name": name, "shape": list(w.shape), "parameters": int(w.size),
                     "nonzeros": nz, "sparsity": 1 - nz / w.size if w.size else 0.0})  # fmt: skip
    total = sum(r["parameters"] for r in rows)
    nonzeros = sum(r["nonzeros"] for r in rows)
    prunable = [r for r in rows if len(r["shape"]) >= 2]
    p_total = sum(r["parameters"] for r in prunable)
    p_nz = sum(r["nonzeros"] for r in prunable)
    return {
        "layers": rows,
        "parameters": total,
        "nonzeros": nonzeros,
        "prunable_parameters": p_total,
        "prunable_sparsity": 1 - p_nz / p_total if p_total else 0.0,
    }


def inspect_onnx(path: str | Path) -> dict[str, Any]:
    """Per-weight shape, parameters, nonzeros, sparsity; totals; sizes; metadata.

    Weights stored as ``sparse_initializer`` (``--sparse-storage``) count like dense
    ones: their parameters are the product of ``dims``, their nonzeros the nonzero
    ``values``, so a file reads the same however its zeros are stored. ``problems``
    lists what makes the file inconsistent: metadata that is not JSON, or a
    ``moonprune.threshold`` that differs from the threshold inside the graph.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{str(path)!r} does not exist or is not a file; check the path")
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise ExportError(
            f"{str(path)!r} is not a readable ONNX file ({_first_line(exc)})"
        ) from None
    if not model.graph.input or not model.graph.output:
        raise ExportError(f"{str(path)!r} holds no ONNX graph (no inputs or outputs)")
    meta: dict[str, Any] = {p.key: p.value for p in model.metadata_props}
    problems = []
    for key in ("moonprune.classes", "moonprune.preprocessing"):
        if key in meta:
            try:
                meta[key] = json.loads(meta[key])
            except ValueError:
                problems.append(f"metadata {key} is not valid JSON")
    if "moonprune.threshold" in meta:
        problems += threshold_problems(meta["moonprune.threshold"], graph_threshold(model))
    return {
        "path": str(path),
        "format": "onnx",
        "bytes": path.stat().st_size,
        "gzip_bytes": gzip_size(path),
        "opset": written_opset(model),
        "metadata": meta,
        "score_constant_bytes": score_constant_bytes(model),
        "problems": problems,
        **_layer_rows(_onnx_weights(model)),
    }


def graph_threshold(model: Any) -> float | None:
    """The threshold the graph compares the confidence with (an onnx ModelProto's
    ``threshold`` initializer or Constant), or None when it has none."""
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == THRESHOLD_NAME:
            return float(numpy_helper.to_array(init).reshape(-1)[0])
    for node in model.graph.node:
        if node.op_type == "Constant" and list(node.output) == [THRESHOLD_NAME]:
            return float(numpy_helper.to_array(node.attribute[0].t).reshape(-1)[0])
    return None


def threshold_problems(recorded: str, in_graph: float | None) -> list[str]:
    """What is wrong between the metadata's ``moonprune.threshold`` (what a client
    reads) and the threshold inside the graph (what decides ``label``)."""
    try:
        meta_value = float(recorded)
    except ValueError:
        return [f"metadata moonprune.threshold {recorded!r} is not a number"]
    if in_graph is None:
        return [f"the graph has no {THRESHOLD_NAME!r} constant to compare with the metadata"]
    if not (math.isfinite(meta_value) and math.isfinite(in_graph)):
        return [f"threshold is not finite (metadata {meta_value}, graph {in_graph})"]
    if np.float32(meta_value) != np.float32(in_graph):
        return [
            f"metadata moonprune.threshold {meta_value!r} differs from the graph's threshold "
            f"{in_graph!r}: clients reading the metadata will disagree with its labels; "
            "re-export the model"
        ]
    return []


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _onnx_weights(model: Any) -> list[tuple[str, np.ndarray]]:
    """Weight tensors (rank >= 2) of an onnx ModelProto, dense and sparse initializers
    alike, in the order the graph's nodes first use them. A feature score's statistics
    (read only by its nodes) are not weights: :func:`score_constant_bytes` counts them."""
    import onnx
    from moonprune.exporters.feature_rejector import SCORE_PREFIX
    from onnx import numpy_helper

    weight_types = (onnx.TensorProto.FLOAT, onnx.TensorProto.INT8, onnx.TensorProto.FLOAT16)
    weights = {
        init.name: numpy_helper.to_array(init)
        for init in model.graph.initializer
        if init.data_type in weight_types and len(init.dims) >= 2
    }
    for sparse in model.graph.sparse_initializer:
        if sparse.values.data_type in weight_types and len(sparse.dims) >= 2:
            weights[sparse.values.name] = _densify(sparse)
    network = {i for n in model.graph.node if not n.name.startswith(SCORE_PREFIX) for i in n.input}
    weights = {name: w for name, w in weights.items() if name in network}
    order: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            order.setdefault(name, len(order))
    ranked = sorted(weights, key=lambda name: order.get(name, len(order)))
    return [(name, weights[name]) for name in ranked]


def score_constant_bytes(model: Any) -> int:
    """Bytes of the constants only a feature score's nodes read (its statistics)."""
    from moonprune.exporters.feature_rejector import SCORE_PREFIX
    from onnx import numpy_helper

    network = {i for n in model.graph.node if not n.name.startswith(SCORE_PREFIX) for i in n.input}
    return sum(
        numpy_helper.to_array(i).nbytes for i in model.graph.initializer if i.name not in network
    )


def _densify(sparse: Any) -> np.ndarray:
    """A SparseTensorProto as a dense array. ``indices`` are [NNZ] linear indices or
    [NNZ, rank] coordinates (ONNX allows both)."""
    from onnx import numpy_helper

    values = numpy_helper.to_array(sparse.values).reshape(-1)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    shape = tuple(int(d) for d in sparse.dims)
    dense = np.zeros(int(np.prod(shape)), dtype=values.dtype)
    if indices.ndim == 2:
        indices = np.ravel_multi_index(tuple(indices.T), shape)
    dense[indices.reshape(-1)] = values
    return dense.reshape(shape)


def inspect_checkpoint(path: str | Path, arch: str | None = None) -> dict[str, Any]:
    """The same view of a moonprune checkpoint (model.pt), plus what it records;
    ``arch`` as for :func:`moonprune.checkpoints.load_checkpoint`."""
    from moonprune.checkpoints import load_checkpoint
    from moonprune.conventions import prunable_weights

    path = Path(path)
    ckpt = load_checkpoint(path, arch)
    named = [(n, w.detach().cpu().numpy()) for n, w in prunable_weights(ckpt.model)]
    structure = _structure_view(ckpt) if ckpt.structure else None
    return {
        "structure": structure,
        "path": str(path),
        "format": "moonprune-checkpoint",
        "bytes": path.stat().st_size,
        "gzip_bytes": gzip_size(path),
        "metadata": {
            "moonprune.version": ckpt.version,
            "arch": ckpt.arch.as_dict(),
            "classes": list(ckpt.classes),
            "unknown_head": ckpt.head_layer,
            "threshold": ckpt.threshold,
            "tpr": ckpt.tpr,
            "score": ckpt.score,
            "preprocessing": ckpt.preprocessing.as_dict(),
            "method": ckpt.config.get("sparsity", {}).get("method"),
        },
        **_layer_rows(named),
    }


def _structure_view(ckpt: Any) -> dict[str, Any]:
    """Channels per layer and MACs, dense factory vs the channel-pruned model."""
    import torch

    from moonprune.heads import add_unknown_output_
    from moonprune.sparsity.channel.structure import module_structure, size_vs_dense

    dense = ckpt.arch.build().eval()
    if ckpt.head_layer is not None:
        add_unknown_output_(dense, layer=ckpt.head_layer)
    x = torch.zeros(1, *ckpt.preprocessing.input_shape)
    before, after = module_structure(dense), ckpt.structure
    layers = {
        name: {"before": attrs, "after": after.get(name, attrs)}
        for name, attrs in before.items()
        if after.get(name, attrs) != attrs
    }
    return {"changed_layers": layers, **size_vs_dense(ckpt.model, dense, x)}


def check_bench_options(
    batch_sizes: tuple[int, ...], threads: int | None, warmup: int, runs: int
) -> None:
    """Raise :class:`ConfigError` naming the option and the fix for a count below 1
    (``--warmup``: below 0)."""
    counts = [("--runs", runs, 1), ("--warmup", warmup, 0)]
    counts += [("--batch", b, 1) for b in batch_sizes]
    counts += [("--threads", threads, 1)] if threads is not None else []
    for name, value, least in counts:
        if value < least:
            raise ConfigError(f"{name} {value} is not allowed; use {name} {least} or more")


def bench_onnx(
    path: str | Path,
    *,
    batch_sizes: tuple[int, ...] = (1, 64),
    threads: int | None = None,
    warmup: int = 10,
    runs: int = 100,
) -> dict[str, Any]:
    """onnxruntime latency (p50/p95, ms) per batch size and throughput (images/s).

    A file whose input has a fixed batch dimension B (a foreign export) is measured at
    batch B only; ``fixed_batch`` then says so.
    """
    import onnxruntime as ort

    check_bench_options(batch_sizes, threads, warmup, runs)
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{str(path)!r} does not exist or is not a file; check the path")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        hint = "; bench takes an .onnx file" if path.suffix.lower() != ".onnx" else ""
        raise ExportError(
            f"onnxruntime cannot load {str(path)!r}: {_first_line(exc)}{hint}"
        ) from None
    name, fixed_batch, sample_shape = _bench_input(session, path)
    if fixed_batch is not None:
        batch_sizes = (fixed_batch,)
    rng = np.random.default_rng(0)
    results = {}
    for batch in dict.fromkeys(batch_sizes):
        x = rng.standard_normal((batch, *sample_shape)).astype(np.float32)
        try:
            for _ in range(warmup):
                session.run(None, {name: x})
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                session.run(None, {name: x})
                times.append(time.perf_counter() - t0)
        except Exception as exc:
            raise ExportError(f"onnxruntime cannot run {str(path)!r}: {_first_line(exc)}") from None
        times.sort()
        p50 = statistics.median(times)
        results[str(batch)] = {
            "p50_ms": 1000 * p50,
            "p95_ms": 1000 * times[min(len(times) - 1, int(0.95 * len(times)))],
            "throughput": batch / p50,
        }
    return {"path": str(path), "threads": threads, "runs": runs, "batches": results,
            "fixed_batch": fixed_batch}  # fmt: skip


def _bench_input(session: Any, path: Path) -> tuple[str, int | None, tuple[int, ...]]:
    """The input's name, its fixed batch size (None when dynamic) and the shape of one
    sample; :class:`ExportError` for what bench cannot feed random float32 data to."""
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].type != "tensor(float)" or not inputs[0].shape:
        raise ExportError(
            f"{str(path)!r} does not take one float32 tensor (it takes "
            f"{', '.join(f'{i.name}: {i.type} {i.shape}' for i in inputs)}); bench measures "
            "files with a single float32 input, like moonprune's exports"
        )
    batch, *rest = inputs[0].shape
    if not all(isinstance(d, int) and d > 0 for d in rest):
        raise ExportError(
            f"{str(path)!r}: input {inputs[0].name!r} has shape {inputs[0].shape}; bench needs "
            "every dimension but the first fixed; export it with a fixed sample shape"
        )
    fixed = batch if isinstance(batch, int) and batch > 0 else None
    return inputs[0].name, fixed, tuple(rest)
