"""Channel pruning, measured: onnxruntime speed-up and MOON vs plain reliability.

    python benchmarks/structured.py      # updates its section of benchmarks/RESULTS.md

Three architectures of different depth and width (ARCHS: a CIFAR ResNet-20 on
3x32x32, issue 20's small ResNet-8 on 1x28x28, a plain CNN on 1x28x28), each trained
on digits 0-5 resized to its input shape, then compressed by ``moonprune.compress``
with each recipe (RECIPES: ``--method channel`` with no target, i.e. the default
``auto`` speed target; ``--macs-target 0.5``; ``--speedup 2``), MOON; the default
recipe also plain (``--no-moon``) for the MOON vs plain comparison. Every other
option is at its default (latency allocation, ``--latency-batch 64``, threads = the
CPUs this process may use).

Reported per run, from report.json: the speed-up of the exported ``model.onnx``
(rejector included) over the dense model exported with the same rejector, at batch 1
and 64 (``structure.speed``, measured at the end of the run); what the chosen widths
measured before training inside a stand-in of the deployed rejector
(``structure.plan``; :mod:`moonprune.sparsity.channel.deployed_timing`); and their gap,
against ``PLAN_TOLERANCE`` (the check that what the plan measured predicts the
deployed file). A recipe the machine cannot meet is refused before training (exit 2
on the command line); the refusal is reported as a finding.

Ceilings: each dense network (with its K+1 head) pruned to the narrowest widths on a
channel grid (every layer at one grid step, or its own width when narrower: the
magnitude ranking, no training) and timed against the dense network, both inside a
stand-in of compress's default rejector (as the search times its candidates). On the
CPU's block (``moonprune.speed.nchwc_block``) that is the fastest network any
block-aligned plan can give; on 8 (half an AVX-512 block) layouts are converted
between layers. A target above both ceilings cannot be met on this machine by channel
pruning alone.
"""

from __future__ import annotations

import copy
import dataclasses
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from results_file import update_section  # benchmarks/ is on sys.path when run as a script

from moonprune.checkpoints import ArchSpec, DenseModel
from moonprune.config import CompressConfig, build_config
from moonprune.data import ReadOptions, load_splits
from moonprune.demo import train_dense
from moonprune.errors import ConfigError
from moonprune.speed import default_threads, nchwc_block

OOD = ("digits:6-9", "textures", "photos", "noise")
# (name, factory, kwargs, input shape): residual and plain, of different depth and width;
# resnet8 on 1x28x28 is issue 20's small residual net (one block per stage, 16/32/64)
ARCHS = (
    ("resnet20", "moonprune.models:resnet20", {"num_classes": 6, "in_channels": 3}, (3, 32, 32)),
    ("resnet8", "moonprune.models:resnet8", {"num_classes": 6, "in_channels": 1}, (1, 28, 28)),
    ("plain cnn", "moonprune.models:demo_cnn", {"num_classes": 6, "in_channels": 1}, (1, 28, 28)),
)
RECIPES: dict[str, dict[str, Any]] = {
    "default": {"method": "channel"},
    "50% MACs": {"method": "channel", "macs_target": 0.5},
    "--speedup 2": {"method": "channel", "speedup": 2.0},
}
PLAIN = ("default",)  # recipes also run with --no-moon
PLAN_TOLERANCE = 0.15  # |deployed - planned| / planned speed-up
SEED, DENSE_EPOCHS, EPOCHS = 0, 6, 5


def mean_auroc(metrics: dict[str, Any]) -> float:
    return float(np.mean([v["auroc"] for v in metrics["ood"].values()]))


def run(arch: tuple[str, str, dict[str, Any], tuple[int, ...]], dense: torch.nn.Module,
        recipe: dict[str, Any], moon: bool) -> dict[str, Any]:  # fmt: skip
    """One compress run; its report, or the refusal."""
    from moonprune.pipeline import compress

    _, factory, kwargs, shape = arch
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config({
            "checkpoint": "", "data": "digits:0-5", "ood": list(OOD),
            "image_size": list(shape[1:]), "channels": shape[0], "out": str(Path(tmp) / "o"),
            "arch": factory, "arch_kwargs": kwargs, "train": {"epochs": EPOCHS, "seed": SEED},
            "moon": {"enabled": moon, "warmup_epochs": 1}, "sparsity": recipe,
        })  # fmt: skip
        given = DenseModel(copy.deepcopy(dense), ArchSpec(factory, kwargs))
        try:
            result = compress(cfg, dense=given)
        except ConfigError as exc:
            return {"refused": str(exc)}
    return result.report.to_json()


def ceilings(dense: torch.nn.Module, shape: tuple[int, ...],
             threads: int) -> list[tuple[int, float, dict[int, float]]]:  # fmt: skip
    """(grid, MAC fraction, measured speed-up per batch) of the narrowest network on the
    CPU's block and on 8; see the module docstring."""
    import torch_pruning as tp

    from moonprune.heads import add_unknown_output_, find_classifier
    from moonprune.sparsity.channel.allocation import prune_to_widths_
    from moonprune.sparsity.channel.deployed_timing import DeployedRejector
    from moonprune.sparsity.channel.structure import count_macs_params, layer_widths
    from moonprune.speed import measure_speedups

    example = torch.randn(2, *shape)
    model = copy.deepcopy(dense).cpu().eval()
    add_unknown_output_(model, example)
    head = find_classifier(model, example)
    dense_macs = count_macs_params(model, example[:1])[0]
    # timed as compress times its candidates: inside a stand-in of the default rejector
    score = {f.name: f.default for f in dataclasses.fields(CompressConfig)}["score"]
    timer = DeployedRejector(str(score), head, 2000, 10).timer(measure_speedups)
    out = []
    for grid in dict.fromkeys((nchwc_block(), 8)):
        narrow = copy.deepcopy(model)
        widths = {k: min(v, grid) for k, v in layer_widths(model).items() if k != head}
        prune_to_widths_(narrow, example, head, widths, tp.importance.MagnitudeImportance(p=2))
        macs = count_macs_params(narrow, example[:1])[0] / dense_macs
        speed = timer(model, {"narrow": narrow}, example, (1, 64), threads)["narrow"]
        out.append((grid, macs, speed))
    return out


def candidate_list(structure: dict[str, Any]) -> str:
    """Every candidate the search timed, as (grid: MACs b=1 / b=64), in search order."""
    timed = [f"{c['grid']}: {100 * c['macs_fraction']:.0f}% {c['speedup']['1']:.2f}x / "
             f"{c['speedup']['64']:.2f}x" for c in structure["plan"]["candidates"]]  # fmt: skip
    return "candidates timed (grid: MACs, b=1 / b=64): " + "; ".join(timed)


def speed_cells(structure: dict[str, Any]) -> tuple[list[str], list[float]]:
    """Deployed speed-ups, the plan's, and the relative gaps."""
    deployed = structure["speed"]["speedup"]
    planned = structure["plan"]["speedup_before_training"]
    gaps = [abs(deployed[b] - planned[b]) / planned[b] for b in ("1", "64")]
    cells = [f"{deployed['1']:.2f}x", f"{deployed['64']:.2f}x",
             f"{planned['1']:.2f}x / {planned['64']:.2f}x",
             " / ".join(f"{100 * g:.0f}%" for g in gaps)]  # fmt: skip
    return cells, gaps


def main() -> None:
    torch.set_num_threads(2)
    start = time.perf_counter()
    lines = [
        "| architecture | recipe | MOON | MACs | speed-up b=1 | speed-up b=64 | plan measured "
        "b=1 / b=64 | gap | accuracy dense -> compressed | mean AUROC dense -> compressed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    gaps: list[float] = []
    findings: list[str] = []
    moon_vs_plain: list[str] = []
    threads = None
    ceiling_lines: list[str] = []
    for arch in ARCHS:
        name, factory, kwargs, shape = arch
        splits = load_splits("digits:0-5", seed=SEED, options=ReadOptions(shape[1:], shape[0]))
        torch.manual_seed(SEED)
        dense = train_dense(ArchSpec(factory, kwargs).build(), splits, DENSE_EPOCHS, SEED).eval()
        for grid, macs, speed in ceilings(dense, shape, default_threads()):
            ceiling_lines.append(f"| {name} | {grid} | {100 * macs:.0f}% | {speed[1]:.2f}x | "
                                 f"{speed[64]:.2f}x |")  # fmt: skip
            print(ceiling_lines[-1], flush=True)
        aurocs: dict[bool, float] = {}
        for label, recipe in RECIPES.items():
            for moon in (True, False) if label in PLAIN else (True,):
                report = run(arch, dense, recipe, moon)
                if "refused" in report:
                    findings.append(f"- {name}, {label}: refused before training: "
                                    f"{report['refused']}")  # fmt: skip
                    print(findings[-1], flush=True)
                    continue
                structure = report["structure"]
                threads = structure["speed"]["threads"]
                if "speedup" in recipe:
                    findings.append(f"- {name}, {label}: {candidate_list(structure)}")
                cells, run_gaps = speed_cells(structure)
                gaps += run_gaps
                d, c = report["models"]["dense"], report["models"]["compressed"]
                if label in PLAIN:
                    aurocs[moon] = mean_auroc(c)
                lines.append(
                    f"| {name} | {label} | {'yes' if moon else 'no'} | "
                    f"{100 * structure['macs_fraction']:.0f}% | " + " | ".join(cells) + " | "
                    f"{100 * d['accuracy']:.1f} -> {100 * c['accuracy']:.1f} | "
                    f"{100 * mean_auroc(d):.1f} -> {100 * mean_auroc(c):.1f} |"
                )
                print(lines[-1], flush=True)
        if len(aurocs) == 2:
            moon_vs_plain.append(f"{name} {100 * (aurocs[True] - aurocs[False]):+.1f}")
    within = sum(g <= PLAN_TOLERANCE for g in gaps)
    text = "\n".join([
        "## Structured compression (channel pruning, onnxruntime CPU)",
        "",
        "Command: `python benchmarks/structured.py`  ",
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"onnxruntime {ort.__version__}, {threads} onnxruntime threads",
        "",
        f"Each architecture trained on digits 0-5 ({DENSE_EPOCHS} epochs, seed {SEED}), then "
        f"`moonprune compress --method channel` with the recipe, {EPOCHS} epochs. Speed-up: "
        "the exported model.onnx (rejector included) over the dense model exported with the "
        "same rejector, measured at the end of the run (report.json `structure.speed`); "
        "plan measured: the chosen widths inside a stand-in of the deployed rejector, timed "
        "before training (`structure.plan`); gap: between the two, per batch size.",
        "",
        *lines,
        "",
        *findings,
        "",
        f"Ceilings (module docstring; NCHWc block {nchwc_block()}): the narrowest network on "
        "each channel grid, inside the default rejector's stand-in, no training.",
        "",
        "| architecture | grid | MACs | speed-up b=1 | speed-up b=64 |",
        "|---|---|---|---|---|",
        *ceiling_lines,
        "",
        f"Plan vs deployed file: {within} of {len(gaps)} gaps within "
        f"{100 * PLAN_TOLERANCE:.0f}% (median {100 * statistics.median(gaps or [0]):.0f}%).  ",
        f"MOON - plain mean AUROC (default recipe): {', '.join(moon_vs_plain) or '-'} points.",
        "",
        f"Wall time: {(time.perf_counter() - start) / 60:.1f} min",
        "",
    ])  # fmt: skip
    update_section("structured", text)
    print(text)


if __name__ == "__main__":
    main()
