"""``inspect`` and ``bench``: what is in a .pt or .onnx file, and how fast ORT runs it."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from moonprune.exporters.onnx_export import gzip_size
from moonprune.exporters.opsets import written_opset

from moonprune.errors import ExportError


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
    ``values``, so a file reads the same however its zeros are stored.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{str(path)!r} does not exist")
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise ExportError(f"{str(path)!r} is not a readable ONNX file ({exc})") from None
    meta = {p.key: p.value for p in model.metadata_props}
    for key in ("moonprune.classes", "moonprune.preprocessing"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    return {
        "path": str(path),
        "format": "onnx",
        "bytes": path.stat().st_size,
        "gzip_bytes": gzip_size(path),
        "opset": written_opset(model),
        "metadata": meta,
        **_layer_rows(_onnx_weights(model)),
    }


def _onnx_weights(model: Any) -> list[tuple[str, np.ndarray]]:
    """Weight tensors (rank >= 2) of an onnx ModelProto, dense and sparse initializers
    alike, in the order the graph's nodes first use them."""
    import onnx
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
    order: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            order.setdefault(name, len(order))
    ranked = sorted(weights, key=lambda name: order.get(name, len(order)))
    return [(name, weights[name]) for name in ranked]


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


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """The same view of a moonprune checkpoint (model.pt), plus what it records."""
    from moonprune.checkpoints import load_checkpoint
    from moonprune.conventions import prunable_weights

    path = Path(path)
    ckpt = load_checkpoint(path)
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
    from moonprune.structured import module_structure, size_vs_dense

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


def bench_onnx(
    path: str | Path,
    *,
    batch_sizes: tuple[int, ...] = (1, 64),
    threads: int | None = None,
    warmup: int = 10,
    runs: int = 100,
) -> dict[str, Any]:
    """onnxruntime latency (p50/p95, ms) per batch size and throughput (images/s)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load {str(path)!r}: {exc}") from None
    shape = session.get_inputs()[0].shape
    c, h, w = (int(d) for d in shape[1:])
    rng = np.random.default_rng(0)
    results = {}
    for batch in batch_sizes:
        x = rng.standard_normal((batch, c, h, w)).astype(np.float32)
        for _ in range(warmup):
            session.run(None, {"input": x})
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            session.run(None, {"input": x})
            times.append(time.perf_counter() - t0)
        times.sort()
        p50 = statistics.median(times)
        results[str(batch)] = {
            "p50_ms": 1000 * p50,
            "p95_ms": 1000 * times[min(len(times) - 1, int(0.95 * len(times)))],
            "throughput": batch / p50,
        }
    return {"path": str(path), "threads": threads, "runs": runs, "batches": results}
