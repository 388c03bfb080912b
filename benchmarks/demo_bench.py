"""The demo, measured: time per epoch with and without MOON, and the table for 3 seeds.

    python benchmarks/demo_bench.py            # updates its section of benchmarks/RESULTS.md
    python benchmarks/demo_bench.py --seeds 0  # quicker

For each seed: train the dense demo CNN on digits 0-5, then compress it with RigL at
90% sparsity twice, with MOON and with ``--no-moon`` (plain), on the same dense
model, and evaluate against held-out digits 6-9 and noise. Then ``moonprune demo`` is
run once as a user runs it (a subprocess, export included) and timed against its
target of 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from results_file import update_section  # benchmarks/ is on sys.path when run as a script

from moonprune.checkpoints import ArchSpec, DenseModel
from moonprune.config import CompressConfig
from moonprune.data import load_splits
from moonprune.demo import DEMO_ARCH, DEMO_DATA, demo_config, train_dense
from moonprune.pipeline import compress


def run(seeds: list[int], epochs: int) -> list[dict[str, Any]]:
    rows = []
    for seed in seeds:
        arch = ArchSpec(DEMO_ARCH, {"num_classes": 6, "in_channels": 1})
        splits = load_splits(DEMO_DATA, seed=seed)
        torch.manual_seed(seed)
        dense = train_dense(arch.build(), splits, seed=seed)
        for moon in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = demo_config(Path(tmp) / "out", seed=seed, epochs=epochs, moon=moon)
                cfg = CompressConfig(**{**vars(cfg), "export": False})
                start = time.perf_counter()
                result = compress(cfg, dense=DenseModel(_copy(dense), arch))
                total = time.perf_counter() - start
            rep = result.report
            history = rep.history
            rows.append(
                {
                    "seed": seed,
                    "variant": "MOON" if moon else "plain",
                    "dense": rep.models["dense"],
                    "compressed": rep.models["compressed"],
                    "sparsity": rep.sparsity,
                    "epoch_s": rep.timing.epoch_s_mean,
                    "train_s": rep.timing.train_s,
                    "total_s": total,
                    "epochs": len(history),
                }
            )
    return rows


def time_demo_cli() -> dict[str, float]:
    """Wall time and measured sparsity of ``python -m moonprune demo`` as a subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "moonprune", "demo", "--out", str(out)],
                       check=True, capture_output=True)  # fmt: skip
        seconds = time.perf_counter() - start
        report = json.loads((out / "report.json").read_text())
    return {"seconds": seconds, "sparsity": report["sparsity"],
            "target_sparsity": report["target_sparsity"]}  # fmt: skip


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def render(rows: list[dict[str, Any]], seconds: float, command: str, demo: dict[str, float]) -> str:
    lines = [
        "## Demo benchmark (digits 0-5, demo CNN, RigL 90%)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.platform()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}  ",
        f"Wall time: {seconds:.0f} s",
        "",
        "### Per seed (test split; AUROC / FPR95 in %, ID = digits 0-5)",
        "",
        "| seed | model | acc % | ECE % | AUROC 6-9 | FPR95 6-9 | AUROC noise | FPR95 noise "
        "| sparsity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(m: dict[str, Any]) -> str:
        o1, o2 = m["ood"]["digits:6-9"], m["ood"]["noise"]
        return (
            f"{100 * m['accuracy']:.2f} | {100 * m['ece']:.2f} | {100 * o1['auroc']:.2f} | "
            f"{100 * o1['fpr95']:.2f} | {100 * o2['auroc']:.2f} | {100 * o2['fpr95']:.2f}"
        )

    for seed in sorted({r["seed"] for r in rows}):
        per = [r for r in rows if r["seed"] == seed]
        lines.append(f"| {seed} | dense | {fmt(per[0]['dense'])} | 0 |")
        for r in per:
            lines.append(
                f"| {seed} | RigL {r['variant']} | {fmt(r['compressed'])} | {r['sparsity']:.4f} |"
            )
    lines += ["", "### Mean over seeds", "", "| model | acc % | AUROC 6-9 | AUROC noise | ECE % |",
              "|---|---|---|---|---|"]  # fmt: skip
    for variant in ("plain", "MOON"):
        sel = [r["compressed"] for r in rows if r["variant"] == variant]
        lines.append(
            f"| RigL {variant} | {100 * statistics.mean(m['accuracy'] for m in sel):.2f} | "
            f"{100 * statistics.mean(m['ood']['digits:6-9']['auroc'] for m in sel):.2f} | "
            f"{100 * statistics.mean(m['ood']['noise']['auroc'] for m in sel):.2f} | "
            f"{100 * statistics.mean(m['ece'] for m in sel):.2f} |"
        )
    plain = statistics.median(r["epoch_s"] for r in rows if r["variant"] == "plain")
    moon = statistics.median(r["epoch_s"] for r in rows if r["variant"] == "MOON")
    lines += [
        "",
        "### Training cost",
        "",
        "Median seconds per epoch (includes MOON's BatchNorm recalibration in averaging epochs).",
        "",
        "| variant | s / epoch |",
        "|---|---|",
        f"| RigL plain | {plain:.4f} |",
        f"| RigL + MOON | {moon:.4f} |",
        "",
        f"MOON costs {100 * (moon / plain - 1):+.1f}% per epoch (target: at most +10%).",
        "",
        "### `moonprune demo` as a user runs it",
        "",
        f"`python -m moonprune demo --out DIR` (subprocess, ONNX export included): "
        f"{demo['seconds']:.0f} s wall (target: under 120 s on 2 cores); measured sparsity "
        f"{demo['sparsity']:.4f} (target {demo['target_sparsity']}, tolerance 0.005).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    rows = run(args.seeds, args.epochs)
    demo = time_demo_cli()
    command = "python benchmarks/demo_bench.py" + (
        "" if args.seeds == [0, 1, 2] else " --seeds " + " ".join(map(str, args.seeds))
    )
    text = render(rows, time.perf_counter() - start, command, demo)
    update_section("demo_bench", text)
    print(text)


if __name__ == "__main__":
    main()
