"""What ``moonprune export`` wrote, as one typed record: :class:`CheckpointExport`.

A float32 export and an int8 one share the file's facts (path, opset, sizes, the
threshold and temperature in the graph, the ONNX file's own metrics, parity with
PyTorch); a float32 export adds the exporter's record (labels agree, seconds) and,
with ``--sparse-storage``, the storage comparison; an int8 export adds the float32
file it was quantized from (:class:`Int8Comparison`). ``to_json()`` gives the same
keys the command has always printed and written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moonprune.report_parts import ExportReport


@dataclass(frozen=True)
class Int8Comparison:
    """The float32 file an int8 export was quantized from, measured the same way;
    ``speedup_vs_float``: float32 latency / int8 latency in onnxruntime on this machine
    (``threads``, ``batch_1``, ``batch_64``; > 1: int8 faster)."""

    float_bytes: int
    float_gzip_bytes: int
    float_threshold: float
    float_metrics: dict[str, Any]
    speedup_vs_float: dict[str, Any]

    def slower(self) -> dict[int, float]:
        """Batch size -> speed ratio where the int8 file is slower than the float32 one."""
        return {int(k.split("_")[1]): v for k, v in self.speedup_vs_float.items()
                if k.startswith("batch_") and v < 1}  # fmt: skip


@dataclass(frozen=True)
class CheckpointExport:
    """One exported file: see the module docstring. ``metrics``: accuracy, ID
    validation acceptance and AUROC per OOD set of the file itself (onnxruntime)."""

    path: str
    opset: int
    bytes: int
    gzip_bytes: int
    threshold: float
    temperature: float
    metrics: dict[str, Any]
    parity_max_abs_diff: float
    #: float32 exports: the exporter's record (None for int8)
    onnx: ExportReport | None = None
    #: ``--sparse-storage``: what the sparse initializers saved, and the dense size
    sparse_storage: dict[str, Any] | None = None
    dense_storage_bytes: int | None = None
    #: ``--quantize int8``: the float32 file beside it
    int8: Int8Comparison | None = None

    @property
    def size_ratio(self) -> float | None:
        """float32 size / int8 size (None for a float32 export)."""
        return None if self.int8 is None else self.int8.float_bytes / self.bytes

    def to_json(self) -> dict[str, Any]:
        """The command's JSON: the keys a float32 or an int8 export has always had."""
        if self.int8 is not None:
            q = self.int8
            return {
                "path": self.path, "opset": self.opset, "bytes": self.bytes,
                "gzip_bytes": self.gzip_bytes, "float_bytes": q.float_bytes,
                "float_gzip_bytes": q.float_gzip_bytes, "size_ratio": self.size_ratio,
                "float_threshold": q.float_threshold, "temperature": self.temperature,
                "threshold": self.threshold, "float_metrics": q.float_metrics,
                "metrics": self.metrics, "parity_max_abs_diff": self.parity_max_abs_diff,
                "speedup_vs_float": q.speedup_vs_float,
            }  # fmt: skip
        out: dict[str, Any] = self.onnx.as_dict() if self.onnx is not None else {}
        out.update(path=self.path, bytes=self.bytes, gzip_bytes=self.gzip_bytes,
                   parity_max_abs_diff=self.parity_max_abs_diff, opset=self.opset)  # fmt: skip
        if self.sparse_storage is not None:
            out["sparse_storage"] = self.sparse_storage
            out["dense_storage_bytes"] = self.dense_storage_bytes
        out.update(metrics=self.metrics, threshold=self.threshold, temperature=self.temperature)
        return out
