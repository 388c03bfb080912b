"""``inspect`` and ``bench``: what is in a .pt or .onnx file, and how fast ORT runs it."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from moonprune.exporters.onnx_contents import (
    graph_threshold,
    onnx_weights,
    score_constant_bytes,
    threshold_problems,
)
from moonprune.exporters.onnx_export import gzip_size
from moonprune.exporters.opsets import written_opset

from moonprune.errors import ConfigError, ExportError


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
        **_layer_rows(onnx_weights(model)),
    }


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def inspect_checkpoint(path: str | Path, arch: str | None = None) -> dict[str, Any]:
    """The same view of a moonprune checkpoint (model.pt), plus what it records;
    ``arch`` as for :func:`moonprune.checkpoints.load_checkpoint`."""
    from moonprune.checkpoints import load_checkpoint
    from moonprune.conventions import prunable_weights
    from moonprune.reopen import reopen_run

    path = Path(path)
    ckpt = load_checkpoint(path, arch)
    settings = reopen_run(ckpt, load_data=False).settings  # what the run records
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
            "tpr": settings.tpr,
            "score": settings.score,
            "temperature": settings.temperature,
            "temperature_setting": ckpt.run.temperature_setting,
            "preprocessing": ckpt.preprocessing.as_dict(),
            "method": settings.method,
            "data": settings.data,
            "ood": list(settings.ood),
            "seed": settings.seed,
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
