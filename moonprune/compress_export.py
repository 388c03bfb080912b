"""The export stage of ``compress``: the ONNX file, and for a channel-pruned run its
speed measured against the dense model. The exporters are imported when called, so
the library never imports them at module level."""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from moonprune.assessment import Assessment
from moonprune.checkpoints import MoonpruneCheckpoint
from moonprune.compress_inputs import Inputs
from moonprune.config import CompressConfig
from moonprune.report_parts import DeployedSpeed, ExportReport


def export_run(
    ckpt: MoonpruneCheckpoint, inputs: Inputs, path: Path, sparsity: float
) -> tuple[Path, ExportReport]:
    """``ckpt`` exported to ``path`` (validation rows as the example inputs) and the
    export's report."""
    from moonprune.exporters import export_onnx

    assert ckpt.threshold is not None
    export_report = export_onnx(
        ckpt.model,
        path,
        num_known=ckpt.num_known,
        input_shape=ckpt.preprocessing.input_shape,
        threshold=ckpt.threshold,
        tpr=ckpt.tpr,
        score=ckpt.score,
        classes=list(ckpt.classes),
        preprocessing=ckpt.preprocessing.as_dict(),
        sparsity=sparsity,
        temperature=ckpt.temperature,
        example_inputs=inputs.splits.val.x[:64],
        feature_stats=ckpt.feature_stats,
    )
    return path, export_report


def deployed_speed(
    path: Path, dense_model: nn.Module, dense: Assessment, inputs: Inputs, cfg: CompressConfig
) -> DeployedSpeed:
    """The exported channel-pruned file timed against the dense model exported with the
    same rejector (score, and the dense model's own threshold and statistics), at batch
    1 and ``--latency-batch`` (:func:`moonprune.speed.time_speedups`)."""
    import tempfile

    from moonprune.exporters import export_onnx
    from moonprune.speed import default_threads, time_speedups

    threads = cfg.sparsity.threads or default_threads()
    batches = tuple(dict.fromkeys((1, cfg.sparsity.latency_batch)))
    with tempfile.TemporaryDirectory(prefix="moonprune-dense-") as tmp:
        dense_path = Path(tmp) / "dense.onnx"
        export_onnx(copy.deepcopy(dense_model).cpu(), dense_path,
                    num_known=len(inputs.splits.classes),
                    input_shape=inputs.splits.preprocessing.input_shape,
                    threshold=dense.threshold, score=cfg.score,
                    temperature=dense.temperature, example_inputs=inputs.splits.val.x[:64],
                    feature_stats=dense.feature_stats)  # fmt: skip
        measured = time_speedups(dense_path, {"model": path}, batches, threads)["model"]
    return DeployedSpeed({str(b): v for b, v in measured.items()}, threads,
                         "the dense model exported with the same rejector")  # fmt: skip
