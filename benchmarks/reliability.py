"""The evidence: does MOON make sparse models more reliable? Measured, at CPU scale.

    python benchmarks/reliability.py --fast              # digits, 1 seed, RigL 90%: 1 min
    python benchmarks/reliability.py --digits            # digits, the full grid
    python benchmarks/reliability.py                     # mnist5k, the full grid
    python benchmarks/reliability.py --ablation [--digits]   # each fix of issue 16 off
    python benchmarks/reliability.py --archs resnet8 --sparsities 0.95 --epochs 30  # one cell
    python benchmarks/reliability.py --digits --unknowns synth mixup --unknowns-fraction 0.125
    python benchmarks/reliability.py --digits --methods channel --sparsities 0.5

A sub-grid (``--archs``, ``--methods``, ``--sparsities``, ``--epochs``, ``--seeds``,
``--unknowns-fraction``) writes its own log and RESULTS section, named by the flags.
``--methods channel`` prunes channels to ``1 - sparsity`` of the dense MACs with
``--allocation global --round-to 4`` (the grids' ResNet-8 is 8 channels wide at the
stem, which a grid of 8 cannot cut): reliability does not depend on the machine's
timing, so the latency search (which times candidates on a busy machine) is left out.

For each architecture and seed a dense model is trained once; then for every method
x sparsity x {plain, MOON} it is fine-tuned with ``moonprune.compress`` (default
settings) and evaluated (ID = classes 0-5) against: held-out classes 6-9 of the same
set (near-OOD), the other digit set's 6-9 resized, textures, photos, faces (far) and
noise (floor). Every logit score's AUROC is computed at T = 1 (the paper's protocol)
from the saved model's logits. Reported: mean and standard deviation over seeds, the
MOON - plain difference with a paired t-test across seeds, rollbacks of the divergence
guard, a plot of AUROC vs sparsity, and the time per epoch. The ablation turns each
fix off in turn (gradient through MOON's weight, mean-row init, unknown-row
exemption, augmentation, averaging, lr warm-up) and tries other learning rates.
Results are written as measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from results_file import update_section  # benchmarks/ is on sys.path when run as a script

from moonprune.assessment import collect
from moonprune.checkpoints import ArchSpec, DenseModel
from moonprune.config import CompressConfig, build_config
from moonprune.data import load_ood, load_splits
from moonprune.demo import train_dense
from moonprune.pipeline import compress
from moonprune.reliability import auroc, compute_score
from moonprune.reliability.scores import SCORES

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
    #: MOON variants beyond ``none`` (issue 18): each adds a "MOON+<spec>" row per cell
    unknowns: tuple[str, ...] = ()
    #: share of each batch synthesized for those variants (None: compress's default)
    unknowns_fraction: float | None = None
    #: their loss weight (None: compress's default)
    unknowns_weight: float | None = None
    #: their K+1 head, ``mean`` or ``separate`` (None: compress's default, ``mean``, the
    #: head of every grid logged before session 25 added the option)
    unknown_head: str | None = None

    def variants(self) -> list[tuple[bool, str]]:
        """(MOON on, --unknowns) per variant: plain, MOON as published, MOON + each."""
        return [(False, "none"), (True, "none"), *((True, u) for u in self.unknowns)]


ARCHS = {
    "cnn": {"factory": "moonprune.models:demo_cnn", "kwargs": {"width": 16}},
    "resnet8": {"factory": "moonprune.models:resnet8", "kwargs": {"width": 8}},
}
FAST = Grid(
    name="digits (fast)",
    data="digits:0-5",
    ood=("digits:6-9", "mnist5k:6-9", "textures", "photos", "faces", "noise"),
    archs={"cnn": ARCHS["cnn"]},
    methods=("rigl",),
    sparsities=(0.9,),
    seeds=(0,),
    epochs=10,
    dense_epochs=15,
)
DIGITS = Grid(
    name="digits",
    data="digits:0-5",
    ood=("digits:6-9", "mnist5k:6-9", "textures", "photos", "faces", "noise"),
    archs=ARCHS,
    methods=("rigl", "set", "gmp"),
    sparsities=(0.9, 0.95),
    seeds=(0, 1, 2),
    epochs=10,
    dense_epochs=15,
)
FULL = Grid(
    name="mnist5k",
    data="mnist5k:0-5",
    ood=("mnist5k:6-9", "digits:6-9", "textures", "photos", "faces", "noise"),
    archs=ARCHS,
    methods=("rigl", "set", "gmp"),
    sparsities=(0.9, 0.95),
    seeds=(0, 1, 2),
    epochs=10,
    dense_epochs=15,
)
#: The feature scores compress reports (the deployed default first).
FEATURES = ("mahalanobis++", "mahalanobis", "knn")
#: OOD sets by kind: the held-out classes of the ID set are the near-OOD test.
FAR = ("textures", "photos", "faces")


def compress_config(
    grid: Grid, spec: ArchSpec, seed: int, out: Path, moon: dict[str, Any], method: str,
    sparsity: float, train: dict[str, Any] | None = None,
) -> CompressConfig:  # fmt: skip
    """The compress settings of one benchmark run (no export: only the report counts).

    ``channel``: ``sparsity`` is the share of dense MACs removed (module docstring)."""
    sp: dict[str, Any] = {"method": method, "sparsity": sparsity}
    if method == "channel":
        sp = {"method": method, "macs_target": round(1 - sparsity, 6), "allocation": "global",
              "round_to": 4}  # fmt: skip
    return build_config({
        "checkpoint": "", "data": grid.data, "ood": list(grid.ood), "out": str(out),
        "arch": spec.factory, "arch_kwargs": spec.kwargs, "export": False,
        "train": {"epochs": grid.epochs, "seed": seed, **(train or {})}, "moon": moon,
        "sparsity": sp,
    })  # fmt: skip


@dataclass
class Setting:
    """One (grid, arch, seed): its data, OOD sets and trained dense model."""

    spec: ArchSpec
    splits: Any
    ood: dict[str, Any]
    dense: torch.nn.Module
    dense_scores: dict[str, dict[str, float]]


def prepare(grid: Grid, arch: dict[str, Any], seed: int) -> Setting:
    splits = load_splits(grid.data, seed=seed)
    spec = ArchSpec(arch["factory"], arch["kwargs"]).with_defaults(
        num_classes=splits.num_classes, in_channels=splits.preprocessing.channels
    )
    torch.manual_seed(seed)
    dense = train_dense(spec.build(), splits, epochs=grid.dense_epochs, seed=seed)
    ood = {name: load_ood(name, splits.preprocessing, seed=seed) for name in grid.ood}
    return Setting(spec, splits, ood, dense, every_score(dense, splits, ood))


def every_score(model: torch.nn.Module, splits: Any, ood: dict[str, Any]) -> dict:
    """AUROC (T = 1, the paper's protocol) of every logit score against every OOD set."""
    logits = collect(model.eval(), splits, ood)
    k = splits.num_classes
    out: dict[str, dict[str, float]] = {}
    for score in SCORES.names("logits"):
        id_scores = compute_score(logits.test, k, score).double().numpy()
        out[score] = {
            name: float(auroc(id_scores, compute_score(v, k, score).double().numpy()))
            for name, v in logits.ood.items()
        }
    return out


def run_one(
    grid: Grid, setting: Setting, seed: int, method: str, sparsity: float,
    moon: dict[str, Any], train: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compress_config(grid, setting.spec, seed, Path(tmp) / "out", moon, method,
                              sparsity, train)  # fmt: skip
        start = time.perf_counter()
        result = compress(cfg, dense=DenseModel(copy.deepcopy(setting.dense), setting.spec))
        seconds = time.perf_counter() - start
    rep = result.report
    return {
        "dense": rep.models["dense"], "compressed": rep.models["compressed"],
        "scores": every_score(result.checkpoint.model, setting.splits, setting.ood),
        "dense_scores": setting.dense_scores, "rollbacks": len(rep.rollbacks),
        "report_scores": rep.scores,
        "epoch_s": rep.timing.epoch_s_mean, "seconds": seconds,
    }  # fmt: skip


def reused_rows(paths: list[Path]) -> dict[tuple, dict[str, Any]]:
    """Plain and MOON (``--unknowns none``) rows of earlier logs, by (arch, seed, method,
    sparsity, moon): ``--reuse``. They do not depend on the ``--unknowns*`` flags, and
    1-thread runs are deterministic (a rerun repeats them to the last digit); the logs
    must come from the same grid, ID set and epochs."""
    rows = [json.loads(line) for path in paths for line in path.read_text().splitlines()]
    return {(r["arch"], r["seed"], r["method"], r["sparsity"], r["moon"]): r
            for r in rows if r.get("unknowns", "none") == "none"}  # fmt: skip


def head_of(grid: Grid, moon: bool, unknowns: str) -> str | None:
    """The K+1 head a run builds (``--unknown-head`` for the synthesized-unknowns
    variants, compress's default ``mean`` otherwise); None for plain."""
    if not moon:
        return None
    return (grid.unknown_head if unknowns != "none" else None) or "mean"


def run_grid(grid: Grid, log: Any, reuse: dict[tuple, dict[str, Any]] | None = None) -> list:
    rows: list[dict[str, Any]] = []
    for arch_name, arch in grid.archs.items():
        for seed in grid.seeds:
            setting = prepare(grid, arch, seed)
            for method, sparsity, (moon, unknowns) in itertools.product(
                grid.methods, grid.sparsities, grid.variants()
            ):
                old = (reuse or {}).get((arch_name, seed, method, sparsity, moon))
                if unknowns == "none" and old is not None:
                    rows.append(old)
                    log.write(json.dumps(old) + "\n")
                    continue
                moon_cfg = {"enabled": moon, "warmup_epochs": max(1, grid.epochs // 6),
                            "unknowns": unknowns}  # fmt: skip
                if unknowns != "none" and grid.unknowns_fraction is not None:
                    moon_cfg["unknowns_fraction"] = grid.unknowns_fraction
                if unknowns != "none" and grid.unknowns_weight is not None:
                    moon_cfg["unknowns_weight"] = grid.unknowns_weight
                if unknowns != "none" and grid.unknown_head is not None:
                    moon_cfg["unknown_head"] = grid.unknown_head
                head = head_of(grid, moon, unknowns)
                row = {"arch": arch_name, "seed": seed, "method": method, "sparsity": sparsity,
                       "moon": moon, "unknowns": unknowns, "unknown_head": head,
                       **run_one(grid, setting, seed, method, sparsity, moon_cfg)}  # fmt: skip
                rows.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                c = row["scores"]["msp"]
                print(f"{grid.name} {arch_name} seed {seed} {method} {sparsity} "
                      f"{variant_name(moon, unknowns)}: acc "
                      f"{100 * row['compressed']['accuracy']:.2f} mean AUROC "
                      f"{100 * np.mean(list(c.values())):.2f} ({row['seconds']:.0f}s)",
                      flush=True)  # fmt: skip
    return rows


def mean_auroc(m: dict[str, Any]) -> float:
    return float(np.mean([v["auroc"] for v in m["ood"].values()]))


def mean_fpr(m: dict[str, Any]) -> float:
    return float(np.mean([v["fpr95"] for v in m["ood"].values()]))


def score_mean(row: dict[str, Any], score: str, names: tuple[str, ...] | None = None,
               dense: bool = False) -> float:  # fmt: skip
    """Mean AUROC of ``score`` (T = 1) over ``names`` (default: every OOD set)."""
    values = row["dense_scores" if dense else "scores"][score]
    return float(np.mean([values[n] for n in (names or tuple(values))]))


def variant_name(moon: bool, unknowns: str = "none") -> str:
    return "plain" if not moon else "MOON" if unknowns == "none" else f"MOON+{unknowns}"


def select(rows: list[dict[str, Any]], key: tuple[str, str, float], moon: bool,
           unknowns: str = "none") -> list[dict]:  # fmt: skip
    """Rows of one (arch, method, sparsity) and variant, ordered by seed (rows written
    before issue 18 have no ``unknowns``: MOON as published)."""
    sel = [r for r in rows if (r["arch"], r["method"], r["sparsity"]) == key
           and r["moon"] == moon and r.get("unknowns", "none") == unknowns]  # fmt: skip
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


def _cells(rows: list[dict[str, Any]], grid: Grid, dense: bool = False) -> list[str]:
    """accuracy, ECE, MSP mean / near / far / noise, energy, max_logit, unknown."""
    near, far = grid.ood[:1], tuple(o for o in grid.ood if o in FAR)
    model = "dense" if dense else "compressed"
    cells = [_ms([r[model]["accuracy"] for r in rows]), _ms([r[model]["ece"] for r in rows])]
    for names in (None, near, grid.ood[1:2], far, ("noise",)):
        cells.append(_ms([score_mean(r, "msp", names, dense) for r in rows]))
    cells += [_ms([score_mean(r, s, None, dense) for r in rows])
              for s in ("energy", "max_logit", "unknown")]  # fmt: skip
    for feature in FEATURES:  # from the report (fitted on the final model)
        values = [feature_mean(r, feature, dense) for r in rows]
        cells.append(_ms([v for v in values if v is not None]) if None not in values else "-")
    return cells


def feature_mean(row: dict[str, Any], score: str, dense: bool = False,
                 names: tuple[str, ...] | None = None) -> float | None:  # fmt: skip
    """Mean AUROC of a feature score (mahalanobis, knn) as compress reported it, over
    ``names`` (default: every OOD set)."""
    table = (row.get("report_scores") or {}).get("dense" if dense else "compressed", {})
    if score not in table:
        return None
    return float(np.mean([v["auroc"] for n, v in table[score].items() if not names or n in names]))


def render(grid: Grid, rows: list[dict[str, Any]], seconds: float, command: str,
           timing: str = "Wall time") -> str:  # fmt: skip
    near, other = grid.ood[0], grid.ood[1]
    head = (f"accuracy | ECE | MSP mean AUROC | MSP {near} (near) | MSP {other} | MSP far "
            "(textures, photos, faces) | MSP noise | energy mean | max_logit mean | "
            "unknown mean | " + " | ".join(f"{f} mean" for f in FEATURES) + " |")  # fmt: skip
    lines = [
        f"## Reliability: MOON vs plain sparse fine-tuning ({grid.name})",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.platform()}, {torch.get_num_threads()} torch threads  ",
        f"{timing}: {seconds / 60:.1f} min; ID {grid.data}; {grid.epochs} fine-tuning epochs "
        f"(defaults otherwise: lr, warm-up, augmentation); seeds {list(grid.seeds)}; mean ± "
        "std over seeds; every AUROC at T = 1 (the paper's protocol), in %; 'unknown' is "
        "1 - p(unknown) (K+1 head only; constant, so 50, for plain).",
        "",
        "| arch | model | " + head,
        "|---|---|" + "---|" * (10 + len(FEATURES)),
    ]
    for arch in grid.archs:
        dense_rows = [r for r in rows if r["arch"] == arch and r["method"] == grid.methods[0]
                      and r["sparsity"] == grid.sparsities[0] and not r["moon"]]  # fmt: skip
        if dense_rows:
            lines.append(f"| {arch} | dense | " + " | ".join(_cells(dense_rows, grid, True)) + " |")
    lines += ["", "| arch | method | sparsity | variant | " + head + " rollbacks |",
              "|---|---|---|---|" + "---|" * (11 + len(FEATURES))]  # fmt: skip
    keys = sorted({(r["arch"], r["method"], r["sparsity"]) for r in rows})
    diffs = []
    for key in keys:
        for moon, unknowns in grid.variants():
            sel = select(rows, key, moon, unknowns)
            variant = variant_name(moon, unknowns)
            rollbacks = sum(r.get("rollbacks", 0) for r in sel)
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {variant} | "
                         + " | ".join(_cells(sel, grid)) + f" | {rollbacks} |")  # fmt: skip
        plain, moon_rows = select(rows, key, False), select(rows, key, True)
        a = [score_mean(r, "msp") for r in plain]
        b = [score_mean(r, "msp") for r in moon_rows]
        an = [score_mean(r, "msp", (near,)) for r in plain]
        bn = [score_mean(r, "msp", (near,)) for r in moon_rows]
        d_acc = statistics.mean(m["compressed"]["accuracy"] - p["compressed"]["accuracy"]
                                for p, m in zip(plain, moon_rows, strict=True))  # fmt: skip
        d_auc, d_near = (
            statistics.mean(b) - statistics.mean(a),
            statistics.mean(bn) - statistics.mean(an),
        )
        diffs.append((*key, d_auc, d_near, d_acc, paired_p(a, b)))
    lines += [
        "",
        "### MOON - plain (points, MSP at T = 1)",
        "",
        f"| arch | method | sparsity | Δ mean AUROC | Δ AUROC {near} (near) | Δ accuracy | "
        "paired t-test p (mean AUROC) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arch, method, sparsity, d_auc, d_near, d_acc, p in diffs:
        p_text = "-" if p is None else f"{p:.3f}"
        lines.append(f"| {arch} | {method} | {sparsity} | {100 * d_auc:+.2f} | "
                     f"{100 * d_near:+.2f} | {100 * d_acc:+.2f} | {p_text} |")  # fmt: skip
    for u in grid.unknowns:  # each synthesized-unknowns variant against plain and MOON
        lines += ["", *synth_lines(grid, rows, keys, u)]
    wins = sum(d[3] >= 0 for d in diffs)
    ok_acc = sum(d[3] >= 0 and d[5] >= -0.005 for d in diffs)
    diverged = sum(r.get("rollbacks", 0) for r in rows)
    plain_t = statistics.median(r["epoch_s"] for r in rows if not r["moon"])
    moon_t = statistics.median(r["epoch_s"] for r in rows
                               if r["moon"] and r.get("unknowns", "none") == "none")  # fmt: skip
    lines += [
        "",
        f"MOON's mean AUROC >= plain's in {wins} of {len(diffs)} cells ({ok_acc} of them with "
        f"accuracy within 0.5 point); epochs rolled back by the divergence guard: {diverged}; "
        f"median s / epoch: plain {plain_t:.3f}, MOON {moon_t:.3f}.",
        "",
    ]
    return "\n".join(lines)


def rows_mean(rows: list[dict[str, Any]], score: str,
              names: tuple[str, ...] | None = None) -> float:  # fmt: skip
    """Mean over ``rows`` (seeds) of ``score``'s mean AUROC over ``names``: a logit score
    at T = 1, a feature score as compress reported it."""
    if score in FEATURES:
        return statistics.mean(feature_mean(r, score, names=names) or 0.0 for r in rows)
    return statistics.mean(score_mean(r, score, names) for r in rows)


def synth_lines(grid: Grid, rows: list[dict[str, Any]], keys: list, unknowns: str) -> list[str]:
    """MOON+``unknowns`` against plain and MOON (issue 18's targets): shortfall removed,
    Δ near-OOD, Δ accuracy, time per epoch; for MSP and the deployed mahalanobis++."""
    near = grid.ood[0]
    lines = [
        f"### MOON+{unknowns} vs plain and MOON (points)",
        "",
        "| arch | method | sparsity | score | shortfall removed vs plain | Δ mean vs MOON | "
        f"Δ {near} (near) vs plain | Δ accuracy vs plain | s / epoch ÷ plain's |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in keys:
        plain, moon, synth = (select(rows, key, False), select(rows, key, True),
                              select(rows, key, True, unknowns))  # fmt: skip
        if not (plain and moon and synth):
            continue
        for score in ("msp", "mahalanobis++"):

            def mean(sel: list[dict[str, Any]], names: tuple[str, ...] | None = None,
                     s: str = score) -> float:  # fmt: skip
                return rows_mean(sel, s, names)

            short = 1 - mean(plain)
            removed = (mean(synth) - mean(plain)) / short if short > 0 else 0.0
            d_acc = statistics.mean(r["compressed"]["accuracy"] for r in synth) - statistics.mean(
                r["compressed"]["accuracy"] for r in plain)  # fmt: skip
            ratio = statistics.mean(r["epoch_s"] for r in synth) / statistics.mean(
                r["epoch_s"] for r in plain)  # fmt: skip
            lines.append(
                f"| {key[0]} | {key[1]} | {key[2]} | {score} | {100 * removed:.0f}% | "
                f"{100 * (mean(synth) - mean(moon)):+.2f} | "
                f"{100 * (mean(synth, (near,)) - mean(plain, (near,))):+.2f} | "
                f"{100 * d_acc:+.2f} | {ratio:.2f} |"
            )
    return lines


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
                    vals = [score_mean(r, "msp") for r in rows if (r["arch"], r["method"],
                            r["sparsity"], r["moon"]) == (arch, method, s, moon)
                            and r.get("unknowns", "none") == "none"]  # fmt: skip
                    means.append(100 * np.mean(vals))
                    stds.append(100 * (np.std(vals) if len(vals) > 1 else 0))
                ax.errorbar(grid.sparsities, means, yerr=stds, fmt=style, capsize=3,
                            label="MOON" if moon else "plain")  # fmt: skip
            ax.set(title=f"{arch} / {method}", xlabel="sparsity", ylabel="mean AUROC %")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@contextlib.contextmanager
def without(fix: str | None) -> Iterator[None]:
    """Turn one of issue 16's fixes off for an ablation (the library keeps only the fix):
    ``gradient`` detaches p_u inside MOON's weight, ``init`` starts the unknown row dead
    (weight 0, bias 10 below the smallest known bias), ``exemption`` lets maskers prune
    the unknown row."""
    import moonprune.heads as heads
    import moonprune.objectives as objectives
    import moonprune.sparsity.budget as base

    saved = (objectives.unknown_aware_loss, heads.expanded_linear, base.unknown_rows)
    if fix == "gradient":

        def detached_loss(logits, target, a, reduction="mean"):  # type: ignore[no-untyped-def]
            h = torch.nn.functional.cross_entropy(logits, target, reduction="none")
            p_u = objectives.unknown_probability(logits).detach()
            correct = logits.detach().argmax(dim=-1) == target
            w = torch.where(correct, torch.ones_like(p_u), 1.0 + a / (1.0 + a * p_u))
            return (h * w).sum() if reduction == "sum" else (h * w).mean()

        objectives.unknown_aware_loss = detached_loss
    elif fix == "init":

        def dead_row(layer):  # type: ignore[no-untyped-def]
            new = saved[1](layer)
            with torch.no_grad():
                new.weight[-1].zero_()
                new.bias[-1] = (layer.bias.min() if layer.bias is not None else 0.0) - 10.0
            return new

        heads.expanded_linear = dead_row
    elif fix == "exemption":
        base.unknown_rows = lambda model: {}
    try:
        yield
    finally:
        objectives.unknown_aware_loss, heads.expanded_linear, base.unknown_rows = saved


#: name -> (MOON settings, train settings, fix turned off)
ABLATIONS: dict[str, tuple[dict[str, Any], dict[str, Any], str | None]] = {
    "plain (K-way, CE, no averaging)": ({"enabled": False}, {}, None),
    "MOON, every fix (defaults)": ({}, {}, None),
    "- gradient through w (detached)": ({}, {}, "gradient"),
    "- mean-row init (dead unknown row)": ({}, {}, "init"),
    "- unknown-row exemption (prunable)": ({}, {}, "exemption"),
    "augmentation: crop": ({}, {"augment": "crop"}, None),
    "- averaging": ({"average_epochs": 0}, {}, None),
    "- lr warm-up": ({}, {"lr_warmup_epochs": 0.0}, None),
    "lr 0.01 (default 0.05)": ({}, {"lr": 0.01}, None),
    "lr 0.1": ({}, {"lr": 0.1}, None),
}


def run_ablation(grid: Grid, seeds: tuple[int, ...], log: Any) -> str:
    """Which fix moves the numbers? RigL at 90%, every architecture of ``grid``."""
    rows: list[dict[str, Any]] = []
    for arch_name, arch in grid.archs.items():
        for seed in seeds:
            setting = prepare(grid, arch, seed)
            for name, (moon, train, fix) in ABLATIONS.items():
                moon = {"warmup_epochs": max(1, grid.epochs // 6), **moon}
                with without(fix):
                    row = run_one(grid, setting, seed, "rigl", 0.9, moon, train)
                row = {"arch": arch_name, "seed": seed, "variant": name, **row}
                rows.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(f"ablation {grid.name} {arch_name} seed {seed} {name}: mean AUROC "
                      f"{100 * score_mean(row, 'msp'):.2f}", flush=True)  # fmt: skip
    return render_ablation(grid, seeds, rows)


def _feature(row: dict[str, Any], score: str, names: tuple[str, ...] | None = None) -> float:
    value = feature_mean(row, score, names=names)
    if value is None:
        raise KeyError(f"{score} missing from a row's report scores")
    return value


def render_ablation(grid: Grid, seeds: tuple[int, ...], rows: list[dict[str, Any]]) -> str:
    """The ablation's table from its rows (as logged in ``ablation-*.jsonl``)."""
    near = grid.ood[0]
    lines = [
        f"### Ablation: RigL 90%, {grid.name}, seeds {list(seeds)} (AUROC at T = 1, %)",
        "",
        f"| arch | variant | accuracy | ECE | MSP mean AUROC | MSP {near} (near) | MSP far | "
        f"unknown mean AUROC | {FEATURES[0]} mean AUROC | {FEATURES[0]} {near} (near) | "
        "mean p(unknown) ID / near | rollbacks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    far = tuple(o for o in grid.ood if o in FAR)
    for arch_name in grid.archs:
        for name in ABLATIONS:
            sel = [r for r in rows if r["arch"] == arch_name and r["variant"] == name]
            c = [r["compressed"] for r in sel]
            pu = [m.get("p_unknown") for m in c]
            pu_text = (f"{statistics.mean(p['id_test']['mean'] for p in pu):.2g} / "
                       f"{statistics.mean(p[near]['mean'] for p in pu):.2g}"
                       if all(pu) else "-")  # fmt: skip
            lines.append(
                f"| {arch_name} | {name} | {_ms([m['accuracy'] for m in c])} | "
                f"{_ms([m['ece'] for m in c])} | {_ms([score_mean(r, 'msp') for r in sel])} | "
                f"{_ms([score_mean(r, 'msp', (near,)) for r in sel])} | "
                f"{_ms([score_mean(r, 'msp', far) for r in sel])} | "
                f"{_ms([score_mean(r, 'unknown') for r in sel])} | "
                f"{_ms([_feature(r, FEATURES[0]) for r in sel])} | "
                f"{_ms([_feature(r, FEATURES[0], (near,)) for r in sel])} | "
                f"{pu_text} | "
                f"{sum(r['rollbacks'] for r in sel)} |"
            )
    return "\n".join(lines) + "\n"


def sub_grid(grid: Grid, args: argparse.Namespace) -> tuple[Grid, str, str]:
    """``grid`` narrowed by the flags (its name says how); the log/section suffix and the
    flags as typed."""
    changes: dict[str, Any] = {}
    suffix, flags, label = "", "", []
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
        flags += " --seeds " + " ".join(map(str, args.seeds))
    if args.archs:
        changes["archs"] = {a: ARCHS[a] for a in args.archs}
        suffix += "-" + "-".join(args.archs)
        flags += " --archs " + " ".join(args.archs)
        label.append(", ".join(args.archs))
    if args.methods:
        changes["methods"] = tuple(args.methods)
        suffix += "-" + "-".join(args.methods)
        flags += " --methods " + " ".join(args.methods)
        label.append(", ".join(args.methods))
    if args.sparsities:
        changes["sparsities"] = tuple(args.sparsities)
        text = [f"{s:g}" for s in args.sparsities]
        suffix += "-" + "-".join(text)
        flags += " --sparsities " + " ".join(text)
        label.append(", ".join(f"{s:.0%}" for s in args.sparsities))
    if args.epochs:
        changes["epochs"] = args.epochs
        suffix += f"-e{args.epochs}"
        flags += f" --epochs {args.epochs}"
        label.append(f"{args.epochs} epochs")
    if args.unknowns:
        changes["unknowns"] = tuple(args.unknowns)
        suffix += "-unknowns-" + "-".join(args.unknowns).replace("+", "_")
        flags += " --unknowns " + " ".join(args.unknowns)
        label.append("unknowns " + ", ".join(args.unknowns))
    if args.unknowns_fraction is not None:
        changes["unknowns_fraction"] = args.unknowns_fraction
        suffix += f"-f{args.unknowns_fraction:g}"
        flags += f" --unknowns-fraction {args.unknowns_fraction:g}"
        label.append(f"fraction {args.unknowns_fraction:g}")
    if args.unknowns_weight is not None:
        changes["unknowns_weight"] = args.unknowns_weight
        suffix += f"-w{args.unknowns_weight:g}"
        flags += f" --unknowns-weight {args.unknowns_weight:g}"
        label.append(f"weight {args.unknowns_weight:g}")
    if args.unknown_head is not None:
        changes["unknown_head"] = args.unknown_head
        suffix += f"-head-{args.unknown_head}"
        flags += f" --unknown-head {args.unknown_head}"
        label.append(f"{args.unknown_head} head")
    if label:
        changes["name"] = f"{grid.name}; " + "; ".join(label)
    return Grid(**{**vars(grid), **changes}), suffix, flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="digits, one seed (a few minutes)")
    parser.add_argument("--digits", action="store_true", help="the digits grid (not mnist5k)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    parser.add_argument(
        "--ablation", action="store_true", help="only the ablation of the fixes (RigL 90%%)"
    )
    parser.add_argument(
        "--unknowns",
        nargs="+",
        default=[],
        help="also run MOON with these --unknowns settings (e.g. synth vos)",
    )
    parser.add_argument(
        "--unknowns-fraction",
        type=float,
        help="share of each batch synthesized (default: compress's)",
    )
    parser.add_argument(
        "--unknowns-weight",
        type=float,
        help="loss weight of the synthesized rows (default: compress's)",
    )
    parser.add_argument("--unknown-head", choices=("mean", "separate"),
                        help="their K+1 head (default: compress's, mean)")  # fmt: skip
    parser.add_argument("--reuse", type=Path, nargs="+",
                        help="take plain and MOON rows from these logs of the same grid "
                        "instead of rerunning them (1-thread runs are deterministic)")  # fmt: skip
    parser.add_argument("--archs", nargs="+", choices=sorted(ARCHS), help="only these")
    parser.add_argument("--methods", nargs="+", help="only these (channel: see the docstring)")
    parser.add_argument("--sparsities", type=float, nargs="+", help="only these")
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs (default 10)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--render-only", action="store_true",
                        help="rebuild the section from its .jsonl log (no training)")  # fmt: skip
    args = parser.parse_args()
    grid = FAST if args.fast else DIGITS if args.digits else FULL
    grid, suffix, sub_flags = sub_grid(grid, args)
    torch.set_num_threads(args.threads)
    tag = ("fast" if args.fast else "digits" if args.digits else "full") + suffix
    flags = (" --fast" if args.fast else "") + (" --digits" if args.digits else "")
    flags += f" --threads {args.threads}" if args.threads != 2 else ""
    start = time.perf_counter()
    if args.ablation:
        log_path = ROOT / "benchmarks" / f"ablation-{tag}.jsonl"
        if args.render_only:
            rows = [json.loads(line) for line in log_path.read_text().splitlines()]
            seeds = tuple(args.seeds or sorted({r["seed"] for r in rows}))
            text = render_ablation(grid, seeds, rows)
            minutes = sum(r["seconds"] for r in rows) / 60
            text += f"\nCommand: `python benchmarks/reliability.py --ablation{flags}`; "
            text += f"{minutes:.1f} min of runs (section rebuilt from {log_path.name})\n"
            update_section(f"ablation-{tag}", text)
            print(text)
            return
        with open(log_path, "w") as log:
            text = run_ablation(grid, tuple(args.seeds or (0, 1, 2)), log)
        command = f"python benchmarks/reliability.py --ablation{flags}{sub_flags}"
        text += f"\nCommand: `{command}`; wall time {(time.perf_counter() - start) / 60:.1f} min\n"
        update_section(f"ablation-{tag}", text)
        print(text)
        return
    log_path = ROOT / "benchmarks" / f"reliability-{tag}.jsonl"
    command = "python benchmarks/reliability.py" + flags + sub_flags
    if args.reuse:
        command += " --reuse " + " ".join(f"benchmarks/{p.name}" for p in args.reuse)
    if args.render_only:  # e.g. a grid run in parts (--archs) whose logs were joined
        rows = [json.loads(line) for line in log_path.read_text().splitlines()]
        timing = f"Sum of the runs' times (section rebuilt from {log_path.name})"
        text = render(grid, rows, sum(r["seconds"] for r in rows), command, timing)
    else:
        with open(log_path, "w") as log:
            rows = run_grid(grid, log, reused_rows(args.reuse) if args.reuse else None)
        text = render(grid, rows, time.perf_counter() - start, command)
    image = ROOT / "docs" / "img" / f"reliability-{tag}.png"
    plot(grid, rows, image)
    text += f"\n![AUROC vs sparsity](../docs/img/{image.name})\n"
    update_section(f"reliability-{tag}", text)
    print(text)


if __name__ == "__main__":
    main()
