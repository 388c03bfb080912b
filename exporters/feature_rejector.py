"""The feature score inside the ONNX graph: its nodes named, kept in float, measured.

A rejector exported with a feature score (``mahalanobis``, ``mahalanobis++``, ``knn``)
computes it from the classifier's input with ordinary operators (Sub, MatMul,
ReduceSum/ReduceMin, or MatMul, TopK, Gather) on the statistics stored as constants.
Three things here:

- :func:`mark_score_nodes_` renames the nodes the exporter traced inside
  :class:`~moonprune.reliability.features.FeatureScore` to ``moonprune_score/...``
  (read from the exporter's per-node annotations, before they are stripped), so the
  score's part of the graph can be found after the exporter folded and renamed its
  constants;
- the int8 quantizer leaves those nodes out (:func:`score_node_names`) and
  :func:`float_score_inputs_` hands them the float tensor the quantizer put a
  Quantize/Dequantize pair on: the score's arithmetic stays float32;
- :func:`score_metadata` records the score and the bytes its statistics add.
"""

from __future__ import annotations

from typing import Any

from moonprune.reliability.features import FEATURE_SCORES, FeatureStats

SCORE_PREFIX = "moonprune_score/"
_SCORE_CLASS = "moonprune.reliability.features.FeatureScore"
_HIERARCHY_KEY = "pkg.torch.onnx.class_hierarchy"


def mark_score_nodes_(model: Any) -> int:
    """Prefix the names of ``model``'s (an onnx ModelProto, not yet stripped) nodes
    traced inside ``FeatureScore`` with :data:`SCORE_PREFIX`; return how many."""
    count = 0
    for i, node in enumerate(model.graph.node):
        hierarchy = next((p.value for p in node.metadata_props if p.key == _HIERARCHY_KEY), "")
        if _SCORE_CLASS in hierarchy:
            node.name = f"{SCORE_PREFIX}{node.name or i}"
            count += 1
    return count


def score_node_names(model: Any) -> list[str]:
    """Names of the feature score's nodes in ``model`` (empty for a logit score)."""
    return [n.name for n in model.graph.node if n.name.startswith(SCORE_PREFIX)]


def float_score_inputs_(model: Any) -> None:
    """Rewire every input of a score node that is a dequantized copy (QDQ) of a float
    tensor to that float tensor, in place."""
    graph = model.graph
    quantized_from = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    float_of = {
        n.output[0]: quantized_from[n.input[0]]
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in quantized_from
    }
    for node in graph.node:
        if node.name.startswith(SCORE_PREFIX):
            for i, name in enumerate(node.input):
                if name in float_of:
                    node.input[i] = float_of[name]


def score_metadata(score: str, stats: FeatureStats | None) -> dict[str, str]:
    """``moonprune.score_bytes`` (float32 statistics the score stores in the graph, 0
    for a logit score) and, for a feature score, ``moonprune.score_statistics``."""
    if stats is None or score not in FEATURE_SCORES:
        return {"moonprune.score_bytes": "0"}
    gaussian = (f"class means {tuple(stats.means.shape)}, whitening "
                f"{tuple(stats.whitening.shape)}")  # fmt: skip
    shapes = {
        "mahalanobis": gaussian,
        "mahalanobis++": f"{gaussian}, of L2-normalised features",
        "knn": f"feature bank {tuple(stats.bank.shape)}, k = {stats.k}",
    }
    return {
        "moonprune.score_bytes": str(stats.nbytes(score)),
        "moonprune.score_statistics": shapes[score],
    }
