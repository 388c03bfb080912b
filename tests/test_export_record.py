"""``moonprune export``'s typed record keeps the keys the command always wrote."""

from __future__ import annotations

from moonprune.exporters.export_record import CheckpointExport, Int8Comparison

from moonprune.report_parts import ExportReport

METRICS = {"accuracy": 0.9, "id_val_accepted": 0.95, "auroc": {"noise": 0.99}}
FLOAT_KEYS = ["path", "bytes", "gzip_bytes", "parity_max_abs_diff", "labels_agree", "opset",
              "export_seconds", "metrics", "threshold", "temperature"]  # fmt: skip
INT8_KEYS = ["path", "opset", "bytes", "gzip_bytes", "float_bytes", "float_gzip_bytes",
             "size_ratio", "float_threshold", "temperature", "threshold", "float_metrics",
             "metrics", "parity_max_abs_diff", "speedup_vs_float"]  # fmt: skip


def _float(size: int = 4000, **extra: object) -> CheckpointExport:
    onnx = ExportReport("m.onnx", 4000, 1000, 1e-6, True, 18, 0.5)
    return CheckpointExport("m.onnx", 18, size, 1000, 0.3, 1.0, METRICS, 1e-6, onnx=onnx,
                            **extra)  # type: ignore[arg-type]  # fmt: skip


def test_float_export_json_has_the_old_keys_in_order() -> None:
    assert list(_float().to_json()) == FLOAT_KEYS
    sparse = _float(1500, sparse_storage={"sparse_initializers": 2},
                    dense_storage_bytes=4000).to_json()  # fmt: skip
    assert list(sparse) == [*FLOAT_KEYS[:7], "sparse_storage", "dense_storage_bytes",
                            *FLOAT_KEYS[7:]]  # fmt: skip
    assert sparse["bytes"] == 1500 and sparse["dense_storage_bytes"] == 4000


def test_int8_export_json_and_the_slower_batches() -> None:
    q = Int8Comparison(4000, 1000, 0.3, METRICS, {"threads": 2, "batch_1": 0.8, "batch_64": 1.4})
    record = CheckpointExport("q.onnx", 18, 1000, 400, 0.31, 1.0, METRICS, 1e-3, int8=q)
    assert list(record.to_json()) == INT8_KEYS
    assert record.to_json()["size_ratio"] == record.size_ratio == 4.0
    assert q.slower() == {1: 0.8}
    assert _float().size_ratio is None
