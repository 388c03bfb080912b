"""ONNX export with the in-graph rejector, onnxruntime checks, quantization, inspection.

Installed as ``moonprune.exporters``. onnx and onnxruntime are imported inside the
functions that need them.
"""

from __future__ import annotations

from moonprune.exporters.onnx_export import (
    OUTPUT_NAMES,
    ExportReport,
    export_onnx,
    gzip_size,
    run_onnx,
)
from moonprune.exporters.rejector import RejectingClassifier

__all__ = [
    "OUTPUT_NAMES",
    "ExportReport",
    "RejectingClassifier",
    "export_onnx",
    "gzip_size",
    "run_onnx",
]
