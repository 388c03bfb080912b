"""Channel pruning, measured: onnxruntime speed-up and MOON vs plain reliability.

    python benchmarks/structured.py      # updates its section of benchmarks/RESULTS.md

A CIFAR-style ResNet-20 (3x32x32) is trained on digits 0-5 resized to 3x32x32 (seeds
0 1 2), then compressed with ``--method channel --macs-target 0.5 --allocation global
--round-to 16`` twice per seed: with MOON and plain (``--no-moon``).

1. Reliability: accuracy, ECE and AUROC against held-out digits 6-9, textures, photos
   and noise, dense vs plain vs MOON.
2. Speed: the six exported compressed models (rejector included) against the dense
   one (with the same K+1 head and rejector), timed in onnxruntime at batch 1 and 64
   with 1 and 2 intra-op threads, in the same run, rounds interleaved so that a busy
   moment hits every model alike (each model's best round in the table, best and
   median rounds in the summary). For context, the same dense network pruned with
   ``--allocation uniform`` (free channel counts, and ``--round-to 8``; speed does not
   depend on fine-tuning, so these are not fine-tuned).
"""

from __future__ import annotations

import copy
import platform
import shutil
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
from moonprune.structured import ChannelPruner

OOD = ("digits:6-9", "textures", "photos", "noise")
# (name, factory, kwargs, input shape): residual and plain, of different depth and width;
# resnet8 on 1x28x28 is issue 20's small residual net (one block per stage, 16/32/64)
ARCHS = (
    ("resnet20", "moonprune.models:resnet20", {"num_classes": 6, "in_channels": 3}, (3, 32, 32)),
    ("resnet8", "moonprune.models:resnet8", {"num_classes": 6, "in_channels": 1}, (1, 28, 28)),
    ("plain cnn", "moonprune.models:demo_cnn", {"num_classes": 6, "in_channels": 1}, (1, 28, 28)),
)
# the two settings the issue asks about: a MAC target with every other option at its
# default (latency allocation), and a speed-up target
RECIPES = {"50% MACs": {"method": "channel", "macs_target": 0.5},
           "--speedup 2": {"method": "channel", "speedup": 2.0}}  # fmt: skip
PREDICTION_TOLERANCE = 0.15  # |predicted - measured| / measured speed-up, stated in README
RECIPE = {"method": "channel", "macs_target": 0.5, "steps": 4, "round_to": 16,
          "allocation": "global"}  # fmt: skip
SPEC = ArchSpec("moonprune.models:resnet20", {"num_classes": 6, "in_channels": 3})


def conv_widths(model: nn.Module) -> str:
    """Output channels of every convolution in order, runs compressed (``16x13``)."""
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    runs: list[list[int]] = []
    for w in widths:
        if runs and runs[-1][0] == w:
            runs[-1][1] += 1
        else:
            runs.append([w, 1])
    return ", ".join(f"{w}x{n}" if n > 1 else str(w) for w, n in runs)


def export(model: nn.Module, path: Path, example: torch.Tensor) -> None:
    export_onnx(model, path, num_known=6, input_shape=(3, 32, 32), threshold=0.5,
                example_inputs=example)  # fmt: skip


def compress_variants(seeds: tuple[int, ...], epochs: int, models_dir: Path) -> dict[str, Any]:
    """Train, compress (MOON and plain), keep the reports and the exported models."""
    from moonprune.pipeline import compress

    rows: dict[str, list[dict[str, Any]]] = {"plain": [], "MOON": []}
    models: dict[str, dict[str, Any]] = {}
    example = torch.randn(4, 3, 32, 32)
    for seed in seeds:
        splits = load_splits("digits:0-5", seed=seed, options=ReadOptions((32, 32), 3))
        torch.manual_seed(seed)
        dense = train_dense(SPEC.build(), splits, epochs=10, seed=seed).eval()
        if seed == seeds[0]:
            with_head = copy.deepcopy(dense)
            head = add_unknown_output_(with_head, example)
            export(with_head, models_dir / "dense.onnx", example)
            models["dense"] = {"path": models_dir / "dense.onnx", "macs": 1.0,
                               "widths": conv_widths(with_head)}  # fmt: skip
            for round_to in (None, 8):  # context: the same net, uniform allocation
                pruned = copy.deepcopy(with_head)
                pruner = ChannelPruner(pruned, example, head, keep=0.5, measure="macs",
                                       steps=1, round_to=round_to,
                                       allocation="uniform")  # fmt: skip
                macs = pruner.step()["macs_fraction"]
                name = "uniform" + (f", round_to {round_to}" if round_to else "")
                export(pruned, models_dir / f"{len(models)}.onnx", example)
                models[name] = {"path": models_dir / f"{len(models)}.onnx", "macs": macs,
                                "widths": conv_widths(pruned)}  # fmt: skip
        for variant in rows:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = build_config({
                    "checkpoint": "", "data": "digits:0-5", "ood": list(OOD),
                    "image_size": [32, 32], "channels": 3, "out": str(Path(tmp) / "o"),
                    "arch": SPEC.factory, "arch_kwargs": SPEC.kwargs,
                    "train": {"epochs": epochs, "seed": seed},
                    "moon": {"enabled": variant == "MOON", "warmup_epochs": 2},
                    "sparsity": RECIPE,
                })  # fmt: skip
                result = compress(cfg, dense=DenseModel(copy.deepcopy(dense), SPEC))
                name = f"global, round_to 16, {variant}, seed {seed}"
                path = models_dir / f"{len(models)}.onnx"
                shutil.copy(result.files["model.onnx"], path)
            rep = result.report
            rows[variant].append(rep["models"]["compressed"] | {"dense": rep["models"]["dense"]})
            models[name] = {"path": path, "macs": rep["structure"]["macs_fraction"],
                            "widths": conv_widths(result.checkpoint.model)}  # fmt: skip
            aurocs = {k: round(100 * v["auroc"], 1) for k, v in rows[variant][-1]["ood"].items()}
            print(f"seed {seed} {variant}: {aurocs}, widths {models[name]['widths']}", flush=True)
    return {"rows": rows, "models": models}


def timed(models: dict[str, dict[str, Any]], rounds: int = 7) -> list[str]:
    """Latency (batch 1) and throughput (batch 64) per model and thread count.

    Each round times every model once, so a busy moment on the machine hits them
    alike. The table gives each model's best round (the fastest p50 latency, the
    highest throughput): what the model can do, less the interference, as ``timeit``
    recommends. The summary also gives the speed-ups from the median round.
    """
    lines = [
        "| threads | model | MACs | conv widths | p50 ms (b=1) | images/s (b=64) "
        "| speed-up b=1 | speed-up b=64 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    latency: dict[int, dict[str, float]] = {}
    pruned = [n for n in models if n.startswith("global")]
    for threads in (1, 2):
        p50: dict[str, list[float]] = {n: [] for n in models}
        thr: dict[str, list[float]] = {n: [] for n in models}
        for _ in range(rounds):
            for name, m in models.items():
                r = bench_onnx(m["path"], batch_sizes=(1,), threads=threads, warmup=20, runs=200)
                p50[name].append(r["batches"]["1"]["p50_ms"])
                r = bench_onnx(m["path"], batch_sizes=(64,), threads=threads, warmup=3, runs=15)
                thr[name].append(r["batches"]["64"]["throughput"])
        estimates = {
            "best round": ({n: min(v) for n, v in p50.items()},
                           {n: max(v) for n, v in thr.items()}),
            "median round": ({n: statistics.median(v) for n, v in p50.items()},
                             {n: statistics.median(v) for n, v in thr.items()}),
        }  # fmt: skip
        b1, b64 = estimates["best round"]
        for name, m in models.items():
            lines.append(
                f"| {threads} | {name} | {100 * m['macs']:.1f}% | {m['widths']} | "
                f"{b1[name]:.3f} | {b64[name]:.0f} | {b1['dense'] / b1[name]:.2f}x | "
                f"{b64[name] / b64['dense']:.2f}x |"
            )
        latency[threads] = b1
        for estimate, (e1, e64) in estimates.items():
            up = {1: [e1["dense"] / e1[n] for n in pruned],
                  64: [e64[n] / e64["dense"] for n in pruned]}  # fmt: skip
            verdict = ", ".join(f"batch {b} {'yes' if min(up[b]) >= 1.8 else 'no'}" for b in up)
            summary.append(
                f"- {threads} thread{'s' if threads > 1 else ''}, {estimate}: the {len(pruned)} "
                f"global round_to 16 models {statistics.median(up[1]):.2f}x at batch 1 "
                f"(lowest {min(up[1]):.2f}x), {statistics.median(up[64]):.2f}x at batch 64 "
                f"(lowest {min(up[64]):.2f}x); every model at least 1.8x: {verdict}"
            )
    gain_dense = latency[1]["dense"] / latency[2]["dense"]
    gain_pruned = statistics.median(latency[1][n] / latency[2][n] for n in pruned)
    summary.append(
        f"- At batch 1 a second thread makes the dense model {gain_dense:.2f}x faster and the "
        f"pruned ones {gain_pruned:.2f}x: handing each small operator to two threads costs a "
        "fixed time that removing channels does not shrink."
    )
    return [*lines, "", f"Speed-up of the compressed models ({rounds} rounds; target: at least "
            "1.8x at batch 1 and 64):", "", *summary]  # fmt: skip


def prediction_check(threads: int = 2, batches: tuple[int, ...] = (1, 64)) -> list[str]:
    """How far the latency table's predicted speed-up is from the exported graph's.

    Each architecture (untrained: speed does not depend on the weights) is pruned to
    50% MACs by the latency allocation; the table predicts its speed-up at each batch
    and both graphs are then exported and timed (:func:`moonprune.speed.speedups`).
    """
    from moonprune.speed import speedups

    lines = ["| architecture | batch | predicted | measured | error | within tolerance |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, factory, kwargs, shape in ARCHS:
        dense = ArchSpec(factory, kwargs).build().eval()
        example = torch.randn(4, *shape)
        head = add_unknown_output_(dense, example)
        pruned = copy.deepcopy(dense)
        try:
            pruner = ChannelPruner(pruned, example, head, keep=0.5, measure="macs", steps=1,
                                   threads=threads, check_speed=False)  # fmt: skip
        except Exception as exc:  # an unreachable target is a finding, not a crash
            lines.append(f"| {name} | - | - | - | refused: {exc} | - |")
            continue
        pruner.step()
        assert pruner.goal is not None
        predicted = pruner.goal.predicted_speedups(pruned)
        measured = speedups(dense, pruned, example, batches, threads)
        for b in batches:
            error = abs(predicted[b] - measured[b]) / measured[b]
            ok = "yes" if error <= PREDICTION_TOLERANCE else "no"
            lines.append(f"| {name} | {b} | {predicted[b]:.2f}x | {measured[b]:.2f}x | "
                         f"{100 * error:.0f}% | {ok} |")  # fmt: skip
    return lines


def reliability_table(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    def mean_auroc(m: dict[str, Any]) -> float:
        return float(np.mean([v["auroc"] for v in m["ood"].values()]))

    def ms(values: list[float]) -> str:
        if len(values) == 1:
            return f"{100 * values[0]:.2f}"
        return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"

    lines = [
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
    pairs = zip(rows["MOON"], rows["plain"], strict=True)
    diffs = [mean_auroc(moon) - mean_auroc(plain) for moon, plain in pairs]
    lines += [
        "",
        f"MOON - plain mean AUROC: {100 * statistics.mean(diffs):+.2f} points "
        f"(per seed: {', '.join(f'{100 * d:+.1f}' for d in diffs)}).",
    ]
    return lines


def main() -> None:
    torch.set_num_threads(2)
    start = time.perf_counter()
    seeds, epochs = (0, 1, 2), 12
    with tempfile.TemporaryDirectory() as tmp:
        runs = compress_variants(seeds, epochs, Path(tmp))
        speed = timed(runs["models"])
    lines = [
        "## Structured compression (channel pruning, onnxruntime CPU)",
        "",
        "Command: `python benchmarks/structured.py`  ",
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"onnxruntime {ort.__version__}",
        "",
        f"ResNet-20 (3x32x32) trained on digits 0-5 at 32x32, compressed with "
        f"`--method channel --macs-target 0.5 --allocation global --round-to 16 "
        f"--prune-steps 4`, {epochs} epochs, seeds {list(seeds)}. Conv widths list every "
        "convolution's output channels in order (`16x13`: thirteen 16-wide convolutions); "
        "dense: 16x7, 32x7, 64x7. The uniform rows prune the seed-0 dense model without "
        "fine-tuning (speed only).",
        "",
        *speed,
        "",
        f"Reliability (%, mean ± std over seeds {list(seeds)}):",
        "",
        *reliability_table(runs["rows"]),
        "",
        f"Wall time: {(time.perf_counter() - start) / 60:.1f} min",
        "",
    ]
    text = "\n".join(lines)
    update_section("structured", text)
    print(text)


if __name__ == "__main__":
    main()
