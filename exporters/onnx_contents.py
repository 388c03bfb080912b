"""What is inside an ONNX file: its weights (dense and sparse initializers alike), the
constants only a feature score reads, and the threshold the graph compares with.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: The graph initializer holding the rejection threshold (RejectingClassifier's buffer).
THRESHOLD_NAME = "threshold"


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


def onnx_weights(model: Any) -> list[tuple[str, np.ndarray]]:
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
