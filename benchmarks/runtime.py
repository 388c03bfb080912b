"""Runtime table: dense fp32, 90%-sparse fp32 and 90%-sparse int8 in onnxruntime.

    python benchmarks/runtime.py        # updates its section of benchmarks/RESULTS.md

Model: CIFAR-style ResNet-20 (3x32x32 input, 10 classes + the unknown output). The
sparse model is the dense one pruned to 90% by one-shot magnitude (ERK) -- speed and
size depend on the zeros, not on how they were trained. int8: static quantization
calibrated on 32x32 crops of scikit-image's photographs. Also measured: the bare
classifier without the rejector, to price the rejector's extra operators.
"""

from __future__ import annotations

import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from moonprune.exporters import export_onnx, gzip_size
from moonprune.exporters.inspection import bench_onnx
from moonprune.exporters.onnx_export import quiet_exporter, strip_debug_info
from moonprune.exporters.quantize import quantize_int8
from results_file import update_section  # benchmarks/ is on sys.path when run as a script

from moonprune.heads import add_unknown_output_
from moonprune.models import resnet20
from moonprune.sources import conform, photos
from moonprune.sparsity import MASKERS, MaskerConfig, TopologySchedule

RUNS = 300
THREADS = 1


def _export_bare(model: torch.nn.Module, path: Path) -> None:
    """The classifier alone (no rejector), stripped like moonprune's own export."""
    import onnx

    with quiet_exporter():
        torch.onnx.export(model, (torch.randn(2, 3, 32, 32),), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("N")},),
                          dynamo=True, external_data=False, verbose=False)  # fmt: skip
    proto = onnx.load(str(path))
    strip_debug_info(proto)
    onnx.save(proto, str(path))


def main() -> None:
    torch.manual_seed(0)
    start = time.perf_counter()
    dense = resnet20(num_classes=10, in_channels=3).eval()
    add_unknown_output_(dense, torch.randn(2, 3, 32, 32))
    sparse = resnet20(num_classes=10, in_channels=3).eval()
    add_unknown_output_(sparse, torch.randn(2, 3, 32, 32))
    sparse.load_state_dict(dense.state_dict())
    masker = MASKERS.create("magnitude", MaskerConfig(sparsity=0.9))
    masker.prepare(sparse, TopologySchedule(1, 0, 1))
    masker.finalize()
    calib = conform(photos().images[:128], 3, (32, 32))
    calib = ((calib - 0.5) / 0.25).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        kw = {"num_known": 10, "input_shape": (3, 32, 32), "threshold": 0.5,
              "example_inputs": torch.from_numpy(calib[:32])}  # fmt: skip
        export_onnx(dense, d / "dense.onnx", **kw)
        _export_bare(dense, d / "dense_bare.onnx")
        export_onnx(sparse, d / "sparse.onnx", sparsity=0.9, **kw)
        quantize_int8(d / "sparse.onnx", d / "sparse_int8.onnx", calib)
        files = {
            "dense fp32, classifier only": d / "dense_bare.onnx",
            "dense fp32 + rejector": d / "dense.onnx",
            "90% sparse fp32 + rejector": d / "sparse.onnx",
            "90% sparse int8 + rejector": d / "sparse_int8.onnx",
        }
        for label, path in files.items():
            r = bench_onnx(path, batch_sizes=(1, 64), threads=THREADS, warmup=20, runs=RUNS)
            rows.append((label, r, path.stat().st_size, gzip_size(path)))
    seconds = time.perf_counter() - start
    b1 = {label: r["batches"]["1"]["p50_ms"] for label, r, _, _ in rows}
    overhead = b1["dense fp32 + rejector"] / b1["dense fp32, classifier only"] - 1
    dense_gz = rows[1][3]
    lines = [
        "## Runtime (onnxruntime CPU, ResNet-20 3x32x32, K=10+1)",
        "",
        "Command: `python benchmarks/runtime.py`  ",
        f"Machine: {platform.platform()}, {platform.processor() or 'cpu'}, onnxruntime "
        f"{ort.__version__}, intra-op threads {THREADS}, {RUNS} timed runs  ",
        f"Wall time: {seconds:.0f} s",
        "",
        "| file | p50 ms (b=1) | p95 ms (b=1) | images/s (b=64) | raw KiB | gzip KiB "
        "| gzip vs dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r, raw, gz in rows:
        one, many = r["batches"]["1"], r["batches"]["64"]
        lines.append(
            f"| {label} | {one['p50_ms']:.3f} | {one['p95_ms']:.3f} | {many['throughput']:.0f} | "
            f"{raw / 1024:.1f} | {gz / 1024:.1f} | {gz / dense_gz:.2f}x |"
        )
    lines += [
        "",
        f"Rejector overhead at batch 1: {100 * overhead:+.1f}% latency (target: at most +5%).  ",
        f"90%-sparse fp32 gzip size: {rows[2][3] / dense_gz:.2f}x the dense file's "
        "(target: at most 0.25x).  ",
        "Unstructured zeros do not make onnxruntime faster on a CPU (dense kernels); int8 "
        "and channel pruning do.",
        "",
    ]
    text = "\n".join(lines)
    update_section("runtime", text)
    print(text)


if __name__ == "__main__":
    main()
