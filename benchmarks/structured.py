"""Channel pruning, measured: onnxruntime speed-up and MOON vs plain reliability.

    python benchmarks/structured.py      # updates its section of benchmarks/RESULTS.md

1. Speed: a CIFAR-style ResNet-20 (3x32x32, 10 classes + unknown) pruned to at most
   50% of its MACs by ``ChannelPruner`` vs the dense one, both exported with the
   rejector, timed in onnxruntime at batch 1 and 64 (1 and 2 intra-op threads) in the
   same run; once with free channel counts and once with ``round_to=8``. Speed does
   not depend on the weights' values, so this part uses untrained weights.
2. Reliability: the same ResNet-20 trained on digits 0-5 resized to 3x32x32, then
   ``--method channel --macs-target 0.5 --round-to 8`` with MOON and plain
   (``--no-moon``), against held-out digits 6-9, textures, photos, noise; seeds 0 1 2.
"""

from __future__ import annotations

import copy
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from moonprune.exporters import export_onnx
from moonprune.exporters.inspection import bench_onnx
from results_file import update_section  # benchmarks/ is on sys.path when run as a script
from torch import nn

from moonprune.checkpoints import ArchSpec, DenseModel
from moonprune.config import build_config
from moonprune.data import ReadOptions, load_splits
from moonprune.demo import train_dense
from moonprune.heads import add_unknown_output_
from moonprune.models import resnet20
from moonprune.pipeline import compress
from moonprune.structured import ChannelPruner

OOD = ("digits:6-9", "textures", "photos", "noise")


def speed() -> list[str]:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    dense = resnet20(num_classes=10, in_channels=3).eval()
    head = add_unknown_output_(dense, x)
    variants = {"dense": dense}
    lines = []
    for round_to in (None, 8):
        pruned = copy.deepcopy(dense)
        pruner = ChannelPruner(pruned, x, head, keep=0.5, measure="macs", steps=1,
                               round_to=round_to)  # fmt: skip
        pruner.step()
        stats = pruner.stats()
        name = "50% MACs" + (f", round_to {round_to}" if round_to else "")
        variants[name] = pruned
        widths = sorted({m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)})
        lines.append(
            f"- {name}: {100 * stats['macs_fraction']:.1f}% of the dense MACs, "
            f"{100 * stats['params_fraction']:.1f}% of the parameters, conv widths {widths} "
            "(dense: [16, 32, 64])"
        )
    lines += [
        "",
        "| threads | model | p50 ms (b=1) | p95 ms (b=1) | images/s (b=64) | speed-up b=1 "
        "| speed-up b=64 |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    best = {1: 0.0, 64: 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, model in variants.items():
            paths[name] = Path(tmp) / f"model{len(paths)}.onnx"
            export_onnx(model, paths[name], num_known=10, input_shape=(3, 32, 32), threshold=0.5,
                        example_inputs=x)  # fmt: skip
        for threads in (1, 2):
            res = {n: bench_onnx(p, batch_sizes=(1, 64), threads=threads, warmup=20, runs=200)
                   for n, p in paths.items()}  # fmt: skip
            d1, d64 = res["dense"]["batches"]["1"], res["dense"]["batches"]["64"]
            for name, r in res.items():
                b1, b64 = r["batches"]["1"], r["batches"]["64"]
                s1, s64 = d1["p50_ms"] / b1["p50_ms"], b64["throughput"] / d64["throughput"]
                if name != "dense":
                    best = {1: max(best[1], s1), 64: max(best[64], s64)}
                lines.append(
                    f"| {threads} | {name} | {b1['p50_ms']:.3f} | {b1['p95_ms']:.3f} | "
                    f"{b64['throughput']:.0f} | {s1:.2f}x | {s64:.2f}x |"
                )
    lines += [
        "",
        f"Best speed-up of a pruned model: {best[1]:.2f}x at batch 1, {best[64]:.2f}x at "
        "batch 64 (target: at least 1.8x at both).",
    ]
    return lines


def reliability(seeds: tuple[int, ...], epochs: int = 12) -> list[str]:
    options = {"image_size": [32, 32], "channels": 3}
    rows: dict[str, list[dict[str, Any]]] = {"plain": [], "MOON": []}
    for seed in seeds:
        splits = load_splits("digits:0-5", seed=seed, options=ReadOptions((32, 32), 3))
        spec = ArchSpec("moonprune.models:resnet20", {"num_classes": 6, "in_channels": 3})
        torch.manual_seed(seed)
        dense = train_dense(spec.build(), splits, epochs=10, seed=seed)
        for variant in rows:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = build_config({
                    "checkpoint": "", "data": "digits:0-5", "ood": list(OOD), **options,
                    "out": str(Path(tmp) / "o"), "arch": spec.factory, "arch_kwargs": spec.kwargs,
                    "export": False, "train": {"epochs": epochs, "seed": seed},
                    "moon": {"enabled": variant == "MOON", "warmup_epochs": 2},
                    "sparsity": {"method": "channel", "macs_target": 0.5, "steps": 4,
                                 "round_to": 8},
                })  # fmt: skip
                rep = compress(cfg, dense=DenseModel(copy.deepcopy(dense), spec)).report
            rows[variant].append(rep["models"]["compressed"] | {"dense": rep["models"]["dense"]})
            aurocs = {k: round(100 * v["auroc"], 1) for k, v in rows[variant][-1]["ood"].items()}
            print(f"seed {seed} {variant}: {aurocs}", flush=True)

    def mean_auroc(m: dict[str, Any]) -> float:
        return float(np.mean([v["auroc"] for v in m["ood"].values()]))

    def ms(values: list[float]) -> str:
        if len(values) == 1:
            return f"{100 * values[0]:.2f}"
        return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"

    lines = [
        f"Reliability (digits 0-5 at 3x32x32, {epochs} epochs, 4 pruning steps, round_to 8, seeds "
        f"{list(seeds)}; %):",
        "",
        "| model | accuracy | ECE | mean AUROC | " + " | ".join(f"AUROC {o}" for o in OOD) + " |",
        "|---|---|---|---|" + "---|" * len(OOD),
    ]
    dense = [r["dense"] for r in rows["plain"]]
    for name, ms_rows in (("dense", dense), ("channel 50% MACs, plain", rows["plain"]),
                          ("channel 50% MACs, MOON", rows["MOON"])):  # fmt: skip
        cells = [ms([m[k] for m in ms_rows]) for k in ("accuracy", "ece")]
        cells.append(ms([mean_auroc(m) for m in ms_rows]))
        cells += [ms([m["ood"][o]["auroc"] for m in ms_rows]) for o in OOD]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    diff = statistics.mean(mean_auroc(m) for m in rows["MOON"]) - statistics.mean(
        mean_auroc(m) for m in rows["plain"]
    )
    lines += ["", f"MOON - plain mean AUROC: {100 * diff:+.2f} points."]
    return lines


def main() -> None:
    torch.set_num_threads(2)
    start = time.perf_counter()
    lines = [
        "## Structured compression (channel pruning, onnxruntime CPU)",
        "",
        "Command: `python benchmarks/structured.py`  ",
        f"Machine: {platform.platform()}, onnxruntime {ort.__version__}",
        "",
        *speed(),
        "",
        *reliability((0, 1, 2)),
        "",
        f"Wall time: {(time.perf_counter() - start) / 60:.1f} min",
        "",
    ]
    text = "\n".join(lines)
    update_section("structured", text)
    print(text)


if __name__ == "__main__":
    main()
