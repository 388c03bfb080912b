"""int8 static quantization (onnxruntime) with the threshold recalibrated afterwards.

Weights are quantized per channel to int8 and activations per tensor to uint8 (QDQ
format, "U8S8"), calibrated on ID inputs; biases stay float32 (quantizing them would
add a scale and a zero point per channel and save nothing). The activation type
decides the speed on x86: onnxruntime's int8 convolution kernels (MLAS, VNNI or
AVX2) take unsigned activations, and signed ones ("S8S8") fall back to slower paths.
Measured on an AVX-512 VNNI Xeon, an untrained ResNet-20 (3x32x32) bare against its
float export, interleaved timing (:func:`moonprune.speed.time_speedups`): QDQ U8S8
1.58x (1 thread) / 1.62x (2 threads) at batch 1 and 1.46x / 2.75x at batch 64; QDQ
S8S8 (what this module wrote before) 0.55-0.6x; the operator format (QLinearConv)
U8S8 1.2-1.4x, S8S8 0.15-0.22x. Whether int8 is faster depends on the CPU, so
measure it with ``moonprune bench --vs``.

The quantizer puts one QuantizeLinear/DequantizeLinear pair on the graph input
(the first Conv reads it) and hands the dequantized copy to every reader, the
rejector's finiteness test included, which would then see a clipped, always finite
copy and accept NaN rows. So every reader of the input that is not a quantized
operator gets the raw input back, as in the float graph, and the written file is
run on rows holding NaN, +-inf and 3e38, which it must reject.

Quantization shifts the scores a little, so the rejection threshold is chosen again
on the quantized model's own confidence over ID validation inputs and written back
into the graph (the ``threshold`` initializer) and the metadata.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from moonprune.exporters.feature_rejector import float_score_inputs_, score_node_names
from moonprune.exporters.onnx_checks import InputBatches
from moonprune.exporters.onnx_export import (
    check_hostile_rows,
    run_onnx,
    set_metadata,
    strip_debug_info,
)

from moonprune.errors import ExportError
from moonprune.outputs import atomic_path
from moonprune.reliability.metrics import calibrate_threshold

THRESHOLD_INITIALIZER = "threshold"
# The rejector's own arithmetic (softmax, comparisons, a feature score's MatMul against
# its statistics) stays in float: only the network's weight-heavy operators are quantized.
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul"]


class _Reader:
    """onnxruntime CalibrationDataReader over an array, in small batches."""

    def __init__(self, x: np.ndarray, batch: int = 32) -> None:
        self._batches = iter([x[i : i + batch] for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"input": np.ascontiguousarray(batch, np.float32)}


def quantize_int8(float_path: str | Path, out_path: str | Path, calibration: np.ndarray) -> Path:
    """Statically quantize ``float_path`` to ``out_path`` (metadata kept)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    out_path = Path(out_path)
    score_nodes = score_node_names(onnx.load(str(float_path)))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime advises pre-processing via the root logger
    try:
        with atomic_path(out_path) as tmp:
            quantize_static(
                str(float_path),
                str(tmp),
                _Reader(calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                weight_type=QuantType.QInt8,
                activation_type=QuantType.QUInt8,
                op_types_to_quantize=QUANTIZED_OPS,
                nodes_to_exclude=score_nodes,
                extra_options={"QuantizeBias": False},
            )
            source = onnx.load(str(float_path))
            model = onnx.load(str(tmp))
            set_metadata(model, {p.key: p.value for p in source.metadata_props})
            strip_debug_info(model)
            set_metadata(model, {"moonprune.quantization": "int8-static-per-channel"})
            raw_input_for_float_readers_(model)
            float_score_inputs_(model)
            onnx.save(model, str(tmp))
            check_hostile_rows(tmp, calibration[:8])
    except ExportError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"int8 quantization failed: {first}") from exc
    finally:
        root.setLevel(level)
    return out_path


def raw_input_for_float_readers_(model: Any) -> None:
    """Rewire every node of ``model`` (a QDQ onnx ModelProto) that reads the
    dequantized copy of a graph input, and is not itself a quantized operator, to the
    raw graph input."""
    graph = model.graph
    inputs = {value.name for value in graph.input}
    quantized_from = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    raw_of = {
        n.output[0]: quantized_from[n.input[0]]
        for n in graph.node
        if n.op_type == "DequantizeLinear" and quantized_from.get(n.input[0]) in inputs
    }
    for node in graph.node:
        if node.op_type in QUANTIZED_OPS:
            continue
        for i, name in enumerate(node.input):
            if name in raw_of:
                node.input[i] = raw_of[name]


def set_threshold(path: str | Path, threshold: float) -> None:
    """Write ``threshold`` into the graph's initializer and metadata, in place."""
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    if not np.isfinite(threshold):
        raise ExportError(f"the recalibrated threshold is {threshold}; check the ID data")
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name == THRESHOLD_INITIALIZER:
            init.CopyFrom(numpy_helper.from_array(np.asarray(threshold, np.float32), init.name))
            break
    else:
        raise ExportError(f"{path} has no '{THRESHOLD_INITIALIZER}' initializer to recalibrate")
    set_metadata(model, {"moonprune.threshold": repr(float(np.float32(threshold)))})
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def recalibrate_threshold(
    path: str | Path, id_val: np.ndarray | InputBatches, tpr: float
) -> dict[str, Any]:
    """Choose the threshold on ``path``'s own confidence over ``id_val``; write it."""
    confidence = run_onnx(path, id_val)["confidence"].astype(np.float64)
    threshold = calibrate_threshold(confidence, tpr)
    set_threshold(path, threshold)
    accepted = float((run_onnx(path, id_val)["is_unknown"] == 0).mean())
    return {"threshold": threshold, "id_val_accepted": accepted}
