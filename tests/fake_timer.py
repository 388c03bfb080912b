"""A deterministic stand-in for onnxruntime timing in tests (``tests/conftest.py``).

Channel tests that are not about this machine's speed replace
:func:`moonprune.speed.time_speedups` with :func:`modelled_speedups`: the latency of
an ONNX file is modelled as a fixed cost per operator (what dominates at batch 1)
plus, per convolution or matrix product, its work counted in whole blocks of
``BLOCK`` channels (as onnxruntime's NCHWc kernels run), times the batch size.
So a narrower network is faster, a width between blocks costs a whole block, and
the result never depends on how busy the machine is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

BLOCK = 16
OPERATOR_MS = 0.02
BLOCK_MS = 1e-6  # per block-padded multiply-accumulate and image


def modelled_ms(path: Path, batch: int) -> float:
    import onnx
    from onnx import shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(path)))
    graph = model.graph
    weights = {w.name: tuple(w.dims) for w in graph.initializer}
    shapes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
              for v in [*graph.value_info, *graph.output]}  # fmt: skip
    work = 0.0
    for node in graph.node:
        w = weights.get(node.input[1]) if len(node.input) > 1 else None
        if w is None:
            continue
        if node.op_type == "Conv":
            c_out, c_in, *kernel = w
            spatial = math.prod(d or 1 for d in shapes.get(node.output[0], ())[2:])
        elif node.op_type in ("Gemm", "MatMul") and len(w) == 2:
            c_out, c_in, kernel, spatial = *w, [], 1
        else:
            continue
        blocks = math.ceil(c_out / BLOCK) * math.ceil(c_in / BLOCK) * BLOCK * BLOCK
        work += blocks * math.prod(kernel) * spatial
    return OPERATOR_MS * len(graph.node) + BLOCK_MS * batch * work


def modelled_speedups(dense: Path, candidates: Mapping[str, Path], batches: tuple[int, ...],
                      threads: int, **_: object) -> dict[str, dict[int, float]]:  # fmt: skip
    """:func:`moonprune.speed.time_speedups` from :func:`modelled_ms`."""
    del threads
    return {
        name: {b: modelled_ms(dense, b) / modelled_ms(path, b) for b in dict.fromkeys(batches)}
        for name, path in candidates.items()
    }
