"""``moonprune export``: a moonprune checkpoint -> ONNX (optionally int8), measured.

The threshold is recalibrated whenever the score or TPR differs from the checkpoint's
(on the ID validation split the model was compressed with), and always after int8
quantization, on the quantized model's own confidence. The float and the int8 file
are both evaluated with onnxruntime on the test split and the OOD sets, so the cost
of quantization is reported, not assumed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from moonprune.exporters.export_record import CheckpointExport, Int8Comparison
from moonprune.exporters.onnx_checks import InputBatches
from moonprune.exporters.onnx_export import export_onnx, gzip_size, run_onnx
from moonprune.exporters.opsets import check_opset, written_opset
from moonprune.exporters.quantize import quantize_int8, recalibrate_threshold
from moonprune.exporters.sparse_storage import to_sparse_storage
from torch import nn

from moonprune import speed as speed_module
from moonprune.errors import ConfigError
from moonprune.outputs import check_output_path

if TYPE_CHECKING:
    from moonprune.data import Preprocessing


#: Most training rows the int8 calibration reads (evenly spaced over the split).
CALIBRATION_ROWS = 2048


def evaluate_onnx(
    path: str | Path, test_x: np.ndarray | InputBatches, test_y: np.ndarray,
    val_x: np.ndarray | InputBatches, ood: dict[str, np.ndarray | InputBatches],
) -> dict[str, Any]:  # fmt: skip
    """Accuracy, ID acceptance and AUROC per OOD set of an exported file (onnxruntime;
    the inputs are read and run batch by batch, only the outputs are kept)."""
    from moonprune.reliability import auroc

    test = run_onnx(path, test_x)
    val = run_onnx(path, val_x)
    return {
        "accuracy": float((test["probabilities"].argmax(1) == test_y).mean()),
        "id_val_accepted": float((~val["is_unknown"]).mean()),
        "auroc": {
            name: auroc(test["confidence"], run_onnx(path, x)["confidence"])
            for name, x in ood.items()
        },
    }


def check_out_path(out: Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an ``--out`` that is a folder, sits in a missing or read-only folder, or
    is one of ``inputs`` (a file this export reads), before anything is computed."""
    if out.is_dir():
        raise ConfigError(
            f"--out {str(out)!r} is a folder; give the file to write, e.g. "
            f"{str(out / 'model.onnx')!r}"
        )
    check_output_path(out, "--out", inputs=list(inputs))


def _check_options(
    out: Path, model_path: str | Path, quantize: str | None, sparse_storage: bool,
    tpr: float | None, opset: int | None,
) -> None:  # fmt: skip
    """The export's own flags, and ``--out`` against the model, before anything loads."""
    if quantize not in (None, "int8"):
        raise ConfigError(f"--quantize {quantize!r} is not supported; use int8")
    if quantize and sparse_storage:
        raise ConfigError("--sparse-storage applies to float weights; drop it or --quantize")
    if tpr is not None and not 0 < tpr < 1:
        raise ConfigError(f"--tpr must be in (0, 1), got {tpr}")
    if opset is not None:
        check_opset(opset)
    check_out_path(out, [model_path])
    if Path(model_path).suffix.lower() == ".onnx":
        raise ConfigError(
            f"{str(model_path)!r} is already an ONNX file; export takes the moonprune "
            "checkpoint it came from (model.pt)"
        )


def _raw_pixels(x: np.ndarray, pre: Preprocessing, baked: bool) -> np.ndarray:
    """``x`` as the graph takes it: normalised rows undone to raw pixels for a baked
    graph, unchanged otherwise."""
    if not baked:
        return x
    mean = np.asarray(pre.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pre.std, np.float32).reshape(1, -1, 1, 1)
    return ((x * std + mean) / pre.scale).astype(np.float32)


def export_checkpoint(
    model_path: str | Path,
    out: str | Path,
    *,
    tpr: float | None = None,
    score: str | None = None,
    opset: int | None = None,
    quantize: str | None = None,
    bake_preprocessing: bool = False,
    sparse_storage: bool = False,
    temperature: str | float | None = None,
    arch: str | None = None,
) -> CheckpointExport:
    """Export ``model_path`` to ``out``; returns what it wrote (:class:`CheckpointExport
    <moonprune.exporters.export_record.CheckpointExport>`): sizes, threshold, metrics.

    ``arch`` (``--arch``) names the factory of a network of your own: the factory a
    checkpoint records is called only when it is a moonprune built-in.
    """
    from moonprune.assessment import assess
    from moonprune.checkpoints import load_checkpoint, measured_sparsity
    from moonprune.reliability.options import EvalOptions
    from moonprune.reopen import RunOverrides, reopen_run

    out = Path(out)
    _check_options(out, model_path, quantize, sparse_storage, tpr, opset)
    ckpt = load_checkpoint(model_path, arch)
    if ckpt.run.data is None:
        raise ConfigError(f"{model_path} records no data spec to calibrate the threshold on")
    check_out_path(out, [ckpt.run.data, *ckpt.run.ood])  # data given as files
    run = reopen_run(ckpt, RunOverrides(score=score, tpr=tpr, temperature=temperature))
    assert run.data is not None  # reopened with its data
    splits, ood, settings = run.data.splits, run.data.ood, run.settings
    tpr, score = settings.tpr, settings.score
    threshold, t, stats = ckpt.threshold, ckpt.temperature, ckpt.feature_stats
    if threshold is None or tpr != ckpt.tpr or score != ckpt.score or temperature is not None:
        refit = assess(ckpt.model, splits, {}, EvalOptions(score, tpr, n_boot=1),
                       temperature=settings.temperature, feature_stats=stats)  # fmt: skip
        threshold, t, stats = refit.threshold, refit.temperature, refit.feature_stats
    kwargs: dict[str, Any] = dict(
        num_known=ckpt.num_known, input_shape=ckpt.preprocessing.input_shape,
        threshold=threshold, tpr=tpr, score=score, classes=list(ckpt.classes),
        preprocessing=ckpt.preprocessing.as_dict(), sparsity=measured_sparsity(ckpt.model),
        temperature=t,
        opset=opset, example_inputs=splits.val.x[:64], bake_preprocessing=bake_preprocessing,
        feature_stats=stats,
    )  # fmt: skip

    def raw(x: np.ndarray) -> np.ndarray:
        return _raw_pixels(x, ckpt.preprocessing, bake_preprocessing)

    arrays: dict[str, Any] = {
        "test_x": InputBatches(splits.test.x, raw), "test_y": splits.test.y.numpy(),
        "val_x": InputBatches(splits.val.x, raw),
        "ood": {n: InputBatches(s.x, raw) for n, s in ood.items()},
    }  # fmt: skip
    if quantize is None:
        return _export_float(ckpt.model, out, kwargs, arrays, sparse_storage)
    n = len(splits.train)
    rows = np.linspace(0, n - 1, min(n, CALIBRATION_ROWS)).round().astype(np.int64)
    return _export_int8(ckpt.model, out, kwargs, arrays, raw(splits.train.x[rows].numpy()))


def _export_float(
    model: nn.Module, out: Path, kwargs: dict[str, Any], arrays: dict[str, Any],
    sparse_storage: bool,
) -> CheckpointExport:  # fmt: skip
    """The float32 file (optionally with sparse storage): its record, metrics, threshold
    and temperature."""
    onnx_report = export_onnx(model, out, **kwargs)
    storage, dense_bytes = None, None
    if sparse_storage:
        storage, dense_bytes = to_sparse_storage(out, arrays["val_x"]), onnx_report.bytes
    return CheckpointExport(
        path=onnx_report.path, opset=onnx_report.opset, bytes=out.stat().st_size,
        gzip_bytes=gzip_size(out) if sparse_storage else onnx_report.gzip_bytes,
        threshold=kwargs["threshold"], temperature=kwargs["temperature"],
        metrics=evaluate_onnx(out, **arrays),
        parity_max_abs_diff=onnx_report.parity_max_abs_diff, onnx=onnx_report,
        sparse_storage=storage, dense_storage_bytes=dense_bytes,
    )  # fmt: skip


def _export_int8(
    model: nn.Module, out: Path, kwargs: dict[str, Any], arrays: dict[str, Any],
    calibration: np.ndarray,
) -> CheckpointExport:  # fmt: skip
    """The int8 file, quantized from a float32 export (calibrated on ``calibration``,
    the training rows), its threshold recalibrated on its own confidence, both files
    measured; the float32 one is left in a temporary folder."""
    import onnx

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        float_path, int8_path = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        float_report = export_onnx(model, float_path, **kwargs)
        float_metrics = evaluate_onnx(float_path, **arrays)
        quantize_int8(float_path, int8_path, calibration)
        recal = recalibrate_threshold(int8_path, arrays["val_x"], kwargs["tpr"])
        int8_metrics = evaluate_onnx(int8_path, **arrays)
        # int8 is not faster on every CPU: measure it against the float file, here
        threads = speed_module.default_threads()
        speed = speed_module.time_speedups(float_path, {"int8": int8_path}, (1, 64),
                                           threads)["int8"]  # fmt: skip
        os.replace(int8_path, out)  # the finished file, in one rename
    return CheckpointExport(
        path=str(out), opset=written_opset(onnx.load(str(out))), bytes=out.stat().st_size,
        gzip_bytes=gzip_size(out), threshold=recal["threshold"],
        temperature=kwargs["temperature"], metrics=int8_metrics,
        parity_max_abs_diff=float_report.parity_max_abs_diff,
        int8=Int8Comparison(
            float_bytes=float_report.bytes, float_gzip_bytes=float_report.gzip_bytes,
            float_threshold=kwargs["threshold"], float_metrics=float_metrics,
            speedup_vs_float={"threads": threads,
                              **{f"batch_{b}": v for b, v in speed.items()}},
        ),
    )  # fmt: skip
