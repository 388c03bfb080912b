"""The evidence: does MOON make sparse models more reliable? Measured, at CPU scale.

    python benchmarks/reliability.py --fast     # digits, 1 seed, a few minutes
    python benchmarks/reliability.py            # mnist5k, the full grid

For each architecture and seed a dense model is trained once; then for every method
x sparsity x {plain, MOON} it is fine-tuned with ``moonprune.compress`` and evaluated
(ID = classes 0-5) against: held-out classes 6-9 (open-set), the other digit set's
6-9 resized (near), textures, photos, faces (far) and noise (floor). Reported: mean
and standard deviation over seeds of accuracy, ECE, AUROC and FPR95, the MOON - plain
difference of the mean AUROC with a paired t-test across seeds, a plot of AUROC vs
sparsity, and the time per epoch. Results are written as measured.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from results_file import update_section  # benchmarks/ is on sys.path when run as a script

from moonprune.checkpoints import ArchSpec, DenseModel
from moonprune.config import CompressConfig, build_config
from moonprune.data import load_splits
from moonprune.demo import train_dense
from moonprune.pipeline import compress

ROOT = Path(__file__).parents[1]


@dataclass(frozen=True)
class Grid:
    name: str
    data: str
    ood: tuple[str, ...]
    archs: dict[str, dict[str, Any]]
    methods: tuple[str, ...]
    sparsities: tuple[float, ...]
    seeds: tuple[int, ...]
    epochs: int
    dense_epochs: int


FAST = Grid(
    name="digits (fast)",
    data="digits:0-5",
    ood=("digits:6-9", "mnist5k:6-9", "textures", "photos", "faces", "noise"),
    archs={"cnn": {"factory": "moonprune.models:demo_cnn", "kwargs": {"width": 16}}},
    methods=("rigl", "set", "gmp"),
    sparsities=(0.9, 0.95),
    seeds=(0,),
    epochs=20,
    dense_epochs=15,
)
FULL = Grid(
    name="mnist5k",
    data="mnist5k:0-5",
    ood=("mnist5k:6-9", "digits:6-9", "textures", "photos", "faces", "noise"),
    archs={
        "cnn": {"factory": "moonprune.models:demo_cnn", "kwargs": {"width": 16}},
        "resnet8": {"factory": "moonprune.models:resnet8", "kwargs": {"width": 8}},
    },
    methods=("rigl", "set", "gmp"),
    sparsities=(0.8, 0.9, 0.95),
    seeds=(0, 1, 2),
    epochs=10,
    dense_epochs=15,
)


def compress_config(
    grid: Grid, spec: ArchSpec, seed: int, out: Path, moon: dict[str, Any], method: str,
    sparsity: float,
) -> CompressConfig:  # fmt: skip
    """The compress settings of one benchmark run (no export: only the report counts)."""
    return build_config({
        "checkpoint": "", "data": grid.data, "ood": list(grid.ood), "out": str(out),
        "arch": spec.factory, "arch_kwargs": spec.kwargs, "export": False,
        "train": {"epochs": grid.epochs, "seed": seed}, "moon": moon,
        "sparsity": {"method": method, "sparsity": sparsity},
    })  # fmt: skip


def run_grid(grid: Grid, log: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for arch_name, arch in grid.archs.items():
        for seed in grid.seeds:
            splits = load_splits(grid.data, seed=seed)
            spec = ArchSpec(arch["factory"], arch["kwargs"]).with_defaults(
                num_classes=splits.num_classes, in_channels=splits.preprocessing.channels
            )
            torch.manual_seed(seed)
            dense = train_dense(spec.build(), splits, epochs=grid.dense_epochs, seed=seed)
            for method, sparsity, moon in itertools.product(
                grid.methods, grid.sparsities, (False, True)
            ):
                with tempfile.TemporaryDirectory() as tmp:
                    moon_cfg = {"enabled": moon, "warmup_epochs": max(1, grid.epochs // 6)}
                    cfg = compress_config(grid, spec, seed, Path(tmp) / "out", moon_cfg,
                                          method, sparsity)  # fmt: skip
                    start = time.perf_counter()
                    result = compress(cfg, dense=DenseModel(copy.deepcopy(dense), spec))
                    seconds = time.perf_counter() - start
                rep = result.report
                row = {
                    "arch": arch_name, "seed": seed, "method": method, "sparsity": sparsity,
                    "moon": moon, "dense": rep["models"]["dense"],
                    "compressed": rep["models"]["compressed"],
                    "epoch_s": rep["timing"]["epoch_s_mean"], "seconds": seconds,
                }  # fmt: skip
                rows.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                c = row["compressed"]
                print(f"{arch_name} seed {seed} {method} {sparsity} {'MOON' if moon else 'plain'}: "
                      f"acc {100 * c['accuracy']:.2f} mean AUROC {100 * mean_auroc(c):.2f} "
                      f"({seconds:.0f}s)", flush=True)  # fmt: skip
    return rows


def mean_auroc(m: dict[str, Any]) -> float:
    return float(np.mean([v["auroc"] for v in m["ood"].values()]))


def mean_fpr(m: dict[str, Any]) -> float:
    return float(np.mean([v["fpr95"] for v in m["ood"].values()]))


def select(rows: list[dict[str, Any]], key: tuple[str, str, float], moon: bool) -> list[dict]:
    """Rows of one (arch, method, sparsity) and variant, ordered by seed."""
    sel = [r for r in rows if (r["arch"], r["method"], r["sparsity"]) == key and r["moon"] == moon]
    return sorted(sel, key=lambda r: r["seed"])


def paired_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided paired t-test p-value (None with fewer than 2 pairs or no spread)."""
    if len(a) < 2:
        return None
    from scipy import stats

    d = np.asarray(b) - np.asarray(a)
    if np.allclose(d, d[0]):
        return None
    return float(stats.ttest_rel(b, a).pvalue)


def _ms(values: list[float], pct: bool = True) -> str:
    scale = 100 if pct else 1
    if len(values) == 1:
        return f"{scale * values[0]:.2f}"
    return f"{scale * statistics.mean(values):.2f} ± {scale * statistics.stdev(values):.2f}"


def render(grid: Grid, rows: list[dict[str, Any]], seconds: float, command: str) -> str:
    ood = list(grid.ood)
    lines = [
        f"## Reliability: MOON vs plain sparse fine-tuning ({grid.name})",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.platform()}, {torch.get_num_threads()} torch threads  ",
        f"Wall time: {seconds / 60:.1f} min; ID {grid.data}; {grid.epochs} fine-tuning epochs; "
        f"seeds {list(grid.seeds)}; mean ± std over seeds; AUROC/FPR95/ECE/accuracy in %.",
        "",
        "| arch | method | sparsity | variant | accuracy | ECE | mean AUROC | "
        + " | ".join(f"AUROC {o}" for o in ood)
        + " | mean FPR95 |",
        "|---|---|---|---|---|---|---|" + "---|" * len(ood) + "---|",
    ]
    keys = sorted({(r["arch"], r["method"], r["sparsity"]) for r in rows})
    diffs = []
    for key in keys:
        for moon in (False, True):
            c = [r["compressed"] for r in select(rows, key, moon)]
            cells = [_ms([m[k] for m in c]) for k in ("accuracy", "ece")]
            cells.append(_ms([mean_auroc(m) for m in c]))
            cells += [_ms([m["ood"][o]["auroc"] for m in c]) for o in ood]
            cells.append(_ms([mean_fpr(m) for m in c]))
            variant = "MOON" if moon else "plain"
            lines.append(
                f"| {key[0]} | {key[1]} | {key[2]} | {variant} | " + " | ".join(cells) + " |"
            )
        plain = [r["compressed"] for r in select(rows, key, False)]
        moon_c = [r["compressed"] for r in select(rows, key, True)]
        a = [mean_auroc(m) for m in plain]
        b = [mean_auroc(m) for m in moon_c]
        d_acc = statistics.mean(
            m["accuracy"] - p["accuracy"] for p, m in zip(plain, moon_c, strict=True)
        )
        d_ece = statistics.mean(m["ece"] - p["ece"] for p, m in zip(plain, moon_c, strict=True))
        diffs.append((*key, statistics.mean(b) - statistics.mean(a), d_acc, d_ece, paired_p(a, b)))
    dense = [r["dense"] for r in rows if r["method"] == grid.methods[0] and
             r["sparsity"] == grid.sparsities[0] and not r["moon"]]  # fmt: skip
    lines += [
        "",
        f"Dense models: accuracy {_ms([m['accuracy'] for m in dense])}, "
        f"mean AUROC {_ms([mean_auroc(m) for m in dense])}.",
        "",
        "### MOON - plain (points)",
        "",
        "| arch | method | sparsity | Δ mean AUROC | Δ accuracy | Δ ECE | paired t-test p |",
        "|---|---|---|---|---|---|---|",
    ]
    for arch, method, sparsity, d_auc, d_acc, d_ece, p in diffs:
        p_text = "-" if p is None else f"{p:.3f}"
        lines.append(
            f"| {arch} | {method} | {sparsity} | {100 * d_auc:+.2f} | {100 * d_acc:+.2f} | "
            f"{100 * d_ece:+.2f} | {p_text} |"
        )
    plain_t = statistics.median(r["epoch_s"] for r in rows if not r["moon"])
    moon_t = statistics.median(r["epoch_s"] for r in rows if r["moon"])
    lines += [
        "",
        "### Training cost (median seconds per epoch, all runs)",
        "",
        "| variant | s / epoch |",
        "|---|---|",
        f"| sparse plain | {plain_t:.3f} |",
        f"| sparse MOON | {moon_t:.3f} ({100 * (moon_t / plain_t - 1):+.1f}%) |",
        "",
    ]
    return "\n".join(lines)


def plot(grid: Grid, rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = sorted({r["arch"] for r in rows})
    fig, axes = plt.subplots(len(archs), len(grid.methods), figsize=(4 * len(grid.methods),
                             3.2 * len(archs)), squeeze=False)  # fmt: skip
    for i, arch in enumerate(archs):
        for j, method in enumerate(grid.methods):
            ax = axes[i][j]
            for moon, style in ((False, "o--"), (True, "s-")):
                means, stds = [], []
                for s in grid.sparsities:
                    vals = [mean_auroc(r["compressed"]) for r in rows if (r["arch"], r["method"],
                            r["sparsity"], r["moon"]) == (arch, method, s, moon)]  # fmt: skip
                    means.append(100 * np.mean(vals))
                    stds.append(100 * (np.std(vals) if len(vals) > 1 else 0))
                ax.errorbar(grid.sparsities, means, yerr=stds, fmt=style, capsize=3,
                            label="MOON" if moon else "plain")  # fmt: skip
            ax.set(title=f"{arch} / {method}", xlabel="sparsity", ylabel="mean AUROC %")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


ABLATIONS: dict[str, dict[str, Any]] = {
    "plain (K-way, CE, no averaging)": {"enabled": False},
    "MOON (K+1, loss, averaging)": {},
    "MOON without averaging": {"average_epochs": 0},
    "MOON without the loss (K+1 + averaging)": {"warmup_epochs": 10_000},
}


def run_ablation(grid: Grid, seeds: tuple[int, ...]) -> str:
    """Which part of MOON moves the numbers? RigL at 90%, first architecture."""
    arch = next(iter(grid.archs.values()))
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in ABLATIONS}
    for seed in seeds:
        splits = load_splits(grid.data, seed=seed)
        spec = ArchSpec(arch["factory"], arch["kwargs"]).with_defaults(
            num_classes=splits.num_classes, in_channels=splits.preprocessing.channels
        )
        torch.manual_seed(seed)
        dense = train_dense(spec.build(), splits, epochs=grid.dense_epochs, seed=seed)
        for name, moon in ABLATIONS.items():
            moon = {"warmup_epochs": max(1, grid.epochs // 6), **moon}
            if moon.get("warmup_epochs", 0) > grid.epochs:
                moon["warmup_epochs"] = grid.epochs
            with tempfile.TemporaryDirectory() as tmp:
                cfg = compress_config(grid, spec, seed, Path(tmp) / "out", moon, "rigl", 0.9)
                rep = compress(cfg, dense=DenseModel(copy.deepcopy(dense), spec)).report
            results[name].append(rep["models"]["compressed"])
            print(f"ablation seed {seed} {name}: mean AUROC "
                  f"{100 * mean_auroc(results[name][-1]):.2f}", flush=True)  # fmt: skip
    lines = [
        f"### Ablation: RigL 90%, {grid.name}, seeds {list(seeds)}",
        "",
        "| variant | accuracy | ECE | mean AUROC | mean FPR95 |",
        "|---|---|---|---|---|",
    ]
    for name, ms in results.items():
        lines.append(
            f"| {name} | {_ms([m['accuracy'] for m in ms])} | {_ms([m['ece'] for m in ms])} | "
            f"{_ms([mean_auroc(m) for m in ms])} | {_ms([mean_fpr(m) for m in ms])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="digits, one seed (a few minutes)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    parser.add_argument(
        "--ablation", action="store_true", help="only the ablation of MOON's parts (RigL 90%%)"
    )
    args = parser.parse_args()
    grid = FAST if args.fast else FULL
    if args.seeds:
        grid = Grid(**{**vars(grid), "seeds": tuple(args.seeds)})
    torch.set_num_threads(2)
    tag = "fast" if args.fast else "full"
    if args.ablation:
        start = time.perf_counter()
        text = run_ablation(grid, tuple(args.seeds or (0, 1, 2)))
        command = "python benchmarks/reliability.py --ablation" + (" --fast" if args.fast else "")
        text += f"\nCommand: `{command}`; wall time {(time.perf_counter() - start) / 60:.1f} min\n"
        update_section(f"ablation-{tag}", text)
        print(text)
        return
    start = time.perf_counter()
    with open(ROOT / "benchmarks" / f"reliability-{tag}.jsonl", "w") as log:
        rows = run_grid(grid, log)
    command = "python benchmarks/reliability.py" + (" --fast" if args.fast else "") + (
        " --seeds " + " ".join(map(str, args.seeds)) if args.seeds else "")  # fmt: skip
    text = render(grid, rows, time.perf_counter() - start, command)
    image = ROOT / "docs" / "img" / f"reliability-{tag}.png"
    plot(grid, rows, image)
    text += f"\n![AUROC vs sparsity](../docs/img/{image.name})\n"
    update_section(f"reliability-{tag}", text)
    print(text)


if __name__ == "__main__":
    main()
