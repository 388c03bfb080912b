"""Runtime table: dense fp32, 90%-sparse fp32 and 90%-sparse int8 in onnxruntime.

    python benchmarks/runtime.py        # updates its section of benchmarks/RESULTS.md

Model: CIFAR-style ResNet-20 (3x32x32 input, 10 classes + the unknown output). The
sparse model is the dense one pruned to 90% by one-shot magnitude (ERK) -- speed and
size depend on the zeros, not on how they were trained. int8: static quantization
calibrated on 32x32 crops of scikit-image's photographs. Also measured: the bare
classifier without the rejector, to price the rejector's extra operators.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

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
Row = tuple[str, dict[str, Any], int, int]  # label, bench_onnx result, raw and gzip bytes


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


def cpu_name() -> str:
    """The CPU's model name: ``platform.processor()`` is empty on most Linux systems."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _speed(ratio: float) -> str:
    """How a speed ratio (> 1 = faster) reads, with 5% counted as noise."""
    if ratio > 1.05:
        return "faster than"
    return "slower than" if ratio < 0.95 else "about as fast as"


def findings(rows: list[Row]) -> list[str]:
    """The sentences under the table, each stating what *these* numbers show.

    ``rows`` are (label, bench_onnx result, raw bytes, gzip bytes) in the table order:
    dense classifier only, dense + rejector, sparse fp32 + rejector, sparse int8 +
    rejector.
    """
    (
        (_, bare, _, _),
        (_, dense, _, dense_gz),
        (_, fp32, fp32_raw, fp32_gz),
        (_, int8, int8_raw, _),
    ) = rows

    def p50(r: dict[str, Any]) -> float:
        return float(r["batches"]["1"]["p50_ms"])

    def tput(r: dict[str, Any]) -> float:
        return float(r["batches"]["64"]["throughput"])

    overhead = p50(dense) / p50(bare) - 1
    zeros_b1, zeros_b64 = p50(dense) / p50(fp32), tput(fp32) / tput(dense)
    int8_b1, int8_b64 = p50(fp32) / p50(int8), tput(int8) / tput(fp32)
    return [
        f"Rejector overhead at batch 1: {100 * overhead:+.1f}% latency (target: at most +5%).  ",
        f"90%-sparse fp32 gzip size: {fp32_gz / dense_gz:.2f}x the dense file's "
        "(target: at most 0.25x).  ",
        f"90%-sparse int8 raw size: {fp32_raw / int8_raw:.2f}x smaller than the fp32 file "
        "(target: at least 3.5x).  ",
        f"Speed on this CPU: 90%-sparse fp32 is {_speed(zeros_b1)} dense fp32 at batch 1 "
        f"({zeros_b1:.2f}x) and {_speed(zeros_b64)} it at batch 64 ({zeros_b64:.2f}x); "
        f"sparse int8 is {_speed(int8_b1)} sparse fp32 at batch 1 ({int8_b1:.2f}x) and "
        f"{_speed(int8_b64)} it at batch 64 ({int8_b64:.2f}x). Channel pruning's speed "
        "is measured by benchmarks/structured.py.",
    ]


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
    rows: list[Row] = []
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
    lines = [
        "## Runtime (onnxruntime CPU, ResNet-20 3x32x32, K=10+1)",
        "",
        "Command: `python benchmarks/runtime.py`  ",
        f"Machine: {platform.platform()}, {cpu_name()}, {os.cpu_count()} logical CPUs, "
        f"onnxruntime {ort.__version__}, intra-op threads {THREADS}, {RUNS} timed runs  ",
        f"Wall time: {seconds:.0f} s",
        "",
        "| file | p50 ms (b=1) | p95 ms (b=1) | images/s (b=64) | raw KiB | gzip KiB "
        "| gzip vs dense |",
        "|---|---|---|---|---|---|---|",
    ]
    dense_gz = rows[1][3]
    for label, r, raw, gz in rows:
        one, many = r["batches"]["1"], r["batches"]["64"]
        lines.append(
            f"| {label} | {one['p50_ms']:.3f} | {one['p95_ms']:.3f} | {many['throughput']:.0f} | "
            f"{raw / 1024:.1f} | {gz / 1024:.1f} | {gz / dense_gz:.2f}x |"
        )
    lines += ["", *findings(rows), ""]
    text = "\n".join(lines)
    update_section("runtime", text)
    print(text)


if __name__ == "__main__":
    main()
