"""Issue 18's targets, counted per cell from the synthesized-unknowns grids' logs.

    python benchmarks/unknowns_targets.py     # seconds: no training, reads the .jsonl logs

The grids (``python benchmarks/reliability.py [--digits] [--archs ...] [--methods
channel --sparsities 0.5] --unknowns G... --unknowns-fraction 0.125``) log, per run,
every score's AUROC per OOD set for plain, MOON (``--unknowns none``) and MOON with
each generator. A cell is one (architecture, method, sparsity), its value the mean over
its seeds. Issue 18 asks of the variant, per cell: at least half of plain's AUROC
shortfall (100 - mean AUROC) removed; better than MOON; accuracy within 0.5 point of
plain's; and no near-OOD set (the ID set's held-out classes) more than 0.5 point
below plain's. Counted here for MSP (the paper's score) and for ``mahalanobis++``
(compress's deployed default). Three more tables: ``synth`` (blur) by loss weight;
every generator at the default weight 0.1 (and at 0.05) averaged over each grid's
cells (mean and worst-cell accuracy change, MSP, near-OOD, ``mahalanobis++``, ECE): the
evidence for what ``synth`` means; and how far 3 seeds resolve the two 0.5-point
targets: MOON as published (``none``) held to them too, and the standard errors of the
paired (same seed) differences. And one more (session 25): the grids run with ``--unknown-head
separate`` against their ``mean``-head twin and against MOON alone, paired run by run.
And (session 26) ``synth`` pooled over every cell of one ID set at one epoch count, the
grids at compress's 30 epochs included, with the near-OOD change of each logit score.
Written into benchmarks/RESULTS.md, section unknowns-targets.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reliability import DIGITS, FULL, rows_mean, score_mean, select  # benchmarks/ on sys.path
from results_file import update_section

ROOT = Path(__file__).resolve().parent
SCORES = ("msp", "mahalanobis++")
TARGETS = ("half of the shortfall removed", "beats MOON", "accuracy within 0.5",
           "near-OOD within 0.5")  # fmt: skip


def _accuracy(rows: list[dict[str, Any]]) -> float:
    return statistics.mean(r["compressed"]["accuracy"] for r in rows)


def met(plain: list[dict[str, Any]], moon: list[dict[str, Any]], synth: list[dict[str, Any]],
        score: str, near: str) -> tuple[bool, ...]:  # fmt: skip
    """The four targets for one cell and score (module docstring)."""
    plain_mean, synth_mean = rows_mean(plain, score), rows_mean(synth, score)
    shortfall = 1 - plain_mean
    removed = (synth_mean - plain_mean) / shortfall if shortfall > 0 else 0.0
    return (
        removed >= 0.5,
        synth_mean > rows_mean(moon, score),
        _accuracy(synth) >= _accuracy(plain) - 0.005,
        rows_mean(synth, score, (near,)) >= rows_mean(plain, score, (near,)) - 0.005,
    )


def grid_lines(path: Path) -> list[str]:
    """One table row per (variant, score) of the grid logged at ``path``."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    near = (DIGITS if "-digits-" in path.name else FULL).ood[0]
    keys = sorted({(r["arch"], r["method"], r["sparsity"]) for r in rows})
    variants = sorted({r["unknowns"] for r in rows if r["moon"] and r["unknowns"] != "none"})
    out = []
    for variant in variants:
        cells = []
        for key in keys:
            trio = (select(rows, key, False), select(rows, key, True),
                    select(rows, key, True, variant))  # fmt: skip
            if all(trio):
                cells.append(trio)
        for score in SCORES:
            counts = [
                sum(c) for c in zip(*(met(*trio, score, near) for trio in cells), strict=True)
            ]
            out.append(f"| {path.stem.removeprefix('reliability-')} | {variant} | {score} | "
                       f"{len(cells)} | " + " | ".join(map(str, counts)) + " |")  # fmt: skip
    return out


def weight_of(path: Path) -> float:
    """The ``--unknowns-weight`` a grid ran at (its log name's ``-w`` suffix; 0.5, the
    default until session 20, without one)."""
    tail = path.stem.split("-head-")[0].rsplit("-w", 1)
    return float(tail[1]) if len(tail) == 2 and tail[1].replace(".", "").isdigit() else 0.5


def weight_lines(logs: list[Path]) -> list[str]:
    """``synth`` (blur) against plain, per (ID set, architecture, sparsity), in every
    grid that ran it: the evidence for the default ``--unknowns-weight``."""
    out = [
        "",
        "### `synth` (blur) by loss weight (mean over the cell's runs; accuracy and AUROC "
        "in %, Δ = synth - plain of the same grid)",
        "",
        "| ID set | arch | sparsity | weight | grid | runs | Δ accuracy | MSP plain -> synth "
        "| mahalanobis++ plain -> synth |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    table = []
    for path in logs:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        id_set = "digits" if "-digits-" in path.name else "mnist5k"
        for arch, sparsity in sorted({(r["arch"], r["sparsity"]) for r in rows}):
            cell = [r for r in rows if (r["arch"], r["sparsity"]) == (arch, sparsity)]
            plain = [r for r in cell if not r["moon"]]
            synth = [r for r in cell if r["moon"] and r["unknowns"] == "synth"]
            if not (plain and synth):
                continue
            d_acc = 100 * (_accuracy(synth) - _accuracy(plain))
            means = [100 * rows_mean(x, s) for s in SCORES for x in (plain, synth)]
            table.append((id_set, arch, sparsity, -weight_of(path), path.stem, len(synth),
                          d_acc, *means))  # fmt: skip
    for t in sorted(table):
        out.append(f"| {t[0]} | {t[1]} | {t[2]:.0%} | {-t[3]:g} | "
                   f"{t[4].removeprefix('reliability-')} | {t[5]} | {t[6]:+.2f} | "
                   f"{t[7]:.1f} -> {t[8]:.1f} | {t[9]:.2f} -> {t[10]:.2f} |")  # fmt: skip
    return out


def _generator_means(cells: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]],
                     near: tuple[str, ...]) -> tuple[float, ...]:  # fmt: skip
    """(cells, mean and worst Δ accuracy, MSP variant and plain, Δ near MSP,
    Δ mahalanobis++, ECE variant and plain) over (plain rows, variant rows) cells."""
    d_acc = [100 * (_accuracy(v) - _accuracy(p)) for p, v in cells]

    def ece(rows: list[dict[str, Any]]) -> float:
        return statistics.mean(r["compressed"]["ece"] for r in rows)

    per_cell = [
        (rows_mean(v, "msp"), rows_mean(p, "msp"),
         rows_mean(v, "msp", near) - rows_mean(p, "msp", near),
         rows_mean(v, "mahalanobis++") - rows_mean(p, "mahalanobis++"), ece(v), ece(p))
        for p, v in cells
    ]  # fmt: skip
    means = [100 * statistics.mean(col) for col in zip(*per_cell, strict=True)]
    return (len(cells), statistics.mean(d_acc), min(d_acc), *means)


def generator_lines(logs: list[Path], weight: float = 0.1) -> list[str]:
    """Every generator run at ``weight`` against plain of the same grid, averaged over
    the grid's cells (architecture x method x sparsity; a cell is the mean of its
    seeds): the evidence for what ``synth`` means."""
    out = [
        "",
        f"### Each generator at loss weight {weight:g} (mean over the grid's cells of the "
        "cell means; Δ = variant - plain, points)",
        "",
        "| grid | variant | cells | Δ accuracy | worst cell Δ accuracy | MSP mean AUROC (plain) "
        "| Δ near-OOD MSP | Δ mahalanobis++ | ECE (plain) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in logs:
        if weight_of(path) != weight:
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        near = ((DIGITS if "-digits-" in path.name else FULL).ood[0],)
        keys = sorted({(r["arch"], r["method"], r["sparsity"]) for r in rows})
        variants = sorted({r["unknowns"] for r in rows if r["moon"] and r["unknowns"] != "none"})
        for variant in variants:
            cells = [(select(rows, k, False), select(rows, k, True, variant)) for k in keys]
            m = _generator_means([c for c in cells if all(c)], near)
            out.append(f"| {path.stem.removeprefix('reliability-')} | {variant} | {m[0]:.0f} | "
                       f"{m[1]:+.2f} | {m[2]:+.2f} | {m[3]:.1f} ({m[4]:.1f}) | {m[5]:+.2f} | "
                       f"{m[6]:+.2f} | {m[7]:.1f} ({m[8]:.1f}) |")  # fmt: skip
    return out


def _paired(plain: list[dict[str, Any]], variant: list[dict[str, Any]],
            value: Callable[[dict[str, Any]], float]) -> list[float]:  # fmt: skip
    """``value(variant run) - value(plain run)`` per seed (the grids pair them: one dense
    model per seed), in points."""
    by_seed = {r["seed"]: r for r in plain}
    return [100 * (value(r) - value(by_seed[r["seed"]])) for r in variant if r["seed"] in by_seed]


def _se(d: list[float]) -> float:
    return statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")


def noise_lines(logs: list[Path]) -> list[str]:
    """How far 3 seeds resolve the per-cell targets: MOON as published (``none``) held to
    the same accuracy and near-OOD targets as the variant, and the standard error of a
    cell's paired (same seed, same dense model) difference."""
    out = [
        "",
        "### Resolution of the per-cell targets: MOON as published held to the same "
        "targets (paired by seed; SE = standard error of the mean difference, points)",
        "",
        "| grid | variant | cells | accuracy within 0.5 | near-OOD MSP within 0.5 | "
        "Δ accuracy ± SE (all runs) | median cell SE, accuracy | Δ near-OOD MSP ± SE "
        "(all runs) | median cell SE, near-OOD |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in logs:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        near = (DIGITS if "-digits-" in path.name else FULL).ood[0]
        keys = sorted({(r["arch"], r["method"], r["sparsity"]) for r in rows})
        variants = sorted({r["unknowns"] for r in rows if r["moon"]})
        for variant in variants:
            cells = [(select(rows, k, False), select(rows, k, True, variant)) for k in keys]
            cells = [c for c in cells if all(c)]
            acc = [_paired(p, v, lambda r: r["compressed"]["accuracy"]) for p, v in cells]
            nea = [_paired(p, v, lambda r, n=near: score_mean(r, "msp", (n,))) for p, v in cells]
            every_acc = [d for c in acc for d in c]
            every_near = [d for c in nea for d in c]
            out.append(
                f"| {path.stem.removeprefix('reliability-')} | {variant} | {len(cells)} | "
                f"{sum(statistics.mean(c) >= -0.5 for c in acc)} | "
                f"{sum(statistics.mean(c) >= -0.5 for c in nea)} | "
                f"{statistics.mean(every_acc):+.2f} ± {_se(every_acc):.2f} | "
                f"{statistics.median(_se(c) for c in acc):.2f} | "
                f"{statistics.mean(every_near):+.2f} ± {_se(every_near):.2f} | "
                f"{statistics.median(_se(c) for c in nea):.2f} |"
            )
    return out


def _run_values(r: dict[str, Any], near: str) -> dict[str, float]:
    maha = r["report_scores"]["compressed"]["mahalanobis++"]
    return {"accuracy": r["compressed"]["accuracy"], "near": score_mean(r, "msp", (near,)),
            "msp": score_mean(r, "msp"), "maha_near": maha[near]["auroc"]}  # fmt: skip


def _moon_runs(rows: list[dict[str, Any]], synth: bool, near: str) -> dict[tuple, dict[str, float]]:
    """MOON runs with (``synth``) or without synthesized unknowns, by (arch, seed,
    method, sparsity)."""
    return {(r["arch"], r["seed"], r["method"], r["sparsity"]): _run_values(r, near)
            for r in rows if r["moon"] and (r["unknowns"] != "none") == synth}  # fmt: skip


def head_lines(logs: list[Path]) -> list[str]:
    """The ``separate`` unknown head (``--unknown-head separate``) against the ``mean``
    head of the same grid (the log without ``-head-separate``) and against MOON alone,
    paired run by run (same seed, dense model and cell)."""
    out = [
        "",
        "### The separate unknown head against the mean head and MOON (paired runs; "
        "Δ ± standard error, points)",
        "",
        "| grid | sparsity | against | runs | Δ accuracy | Δ near-OOD MSP | Δ MSP mean AUROC "
        "| Δ near-OOD mahalanobis++ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in logs:
        if not path.stem.endswith("-head-separate"):
            continue
        twin = path.with_name(path.name.replace("-head-separate", ""))
        if not twin.exists():
            continue
        near = (DIGITS if "-digits-" in path.name else FULL).ood[0]
        sep = [json.loads(line) for line in path.read_text().splitlines()]
        mean = [json.loads(line) for line in twin.read_text().splitlines()]

        s_runs = _moon_runs(sep, True, near)
        sparsities = sorted({k[3] for k in s_runs})
        against = (("mean head", _moon_runs(mean, True, near)),
                   ("MOON", _moon_runs(sep, False, near)))  # fmt: skip
        rows_of = [*sparsities, None] if len(sparsities) > 1 else sparsities
        for sparsity, (name, other) in itertools.product(rows_of, against):
            keys = [k for k in s_runs if k in other and sparsity in (None, k[3])]
            if not keys:
                continue
            cells = []
            for f in ("accuracy", "near", "msp", "maha_near"):
                d = [100 * (s_runs[k][f] - other[k][f]) for k in keys]
                cells.append(f"{statistics.mean(d):+.2f} ± {_se(d):.2f}")
            where = "all" if sparsity is None else f"{sparsity:.0%}"
            out.append(f"| {path.stem.removeprefix('reliability-')} | {where} | {name} | "
                       f"{len(keys)} | " + " | ".join(cells) + " |")  # fmt: skip
    return out


def _epochs_of(path: Path) -> int:
    """A grid's fine-tuning epochs (its log name's ``-eN`` part; 10 without one)."""
    parts = [p for p in path.stem.split("-") if p[:1] == "e" and p[1:].isdigit()]
    return int(parts[0][1:]) if parts else 10


def pooled_lines(logs: list[Path], variant: str = "blur+mixup") -> list[str]:
    """``variant`` (``synth``) at weight 0.1 with the mean head, every cell of every grid
    of one ID set at one epoch count pooled (e.g. mnist5k at 30 epochs: the 90% grid
    and the 95% one): the four targets counted, and the mean changes against plain. The
    grids pooled hold disjoint cells (a cell run in two of them would count twice)."""
    out = [
        "",
        f"### `synth` ({variant}, weight 0.1, mean head) pooled by ID set and epochs "
        "(every cell its grids have; Δ = synth - plain, points, mean over cells)",
        "",
        "| ID set | epochs | grids | cells | " + " | ".join(TARGETS) + " | Δ accuracy "
        "(worst cell) | MSP mean AUROC (plain) | Δ near-OOD MSP (worst cell) | Δ mahalanobis++ |",
        "|---|---|---|---|" + "---|" * len(TARGETS) + "---|---|---|---|",
    ]
    for (id_set, epochs), paths in sorted(_pooled_groups(logs).items()):
        near = (DIGITS if id_set == "digits" else FULL).ood[0]
        trios, names = _trios(paths, variant)
        if not trios:
            continue
        counts = [sum(c) for c in zip(*(met(*t, "msp", near) for t in trios), strict=True)]
        d_acc = [100 * (_accuracy(v) - _accuracy(p)) for p, _, v in trios]
        d_near = [100 * (rows_mean(v, "msp", (near,)) - rows_mean(p, "msp", (near,)))
                  for p, _, v in trios]  # fmt: skip
        msp = [100 * rows_mean(v, "msp") for _, _, v in trios]
        msp_plain = [100 * rows_mean(p, "msp") for p, _, _ in trios]
        d_maha = [100 * (rows_mean(v, "mahalanobis++") - rows_mean(p, "mahalanobis++"))
                  for p, _, v in trios]  # fmt: skip
        out.append(
            f"| {id_set} | {epochs} | {', '.join(names)} | {len(trios)} | "
            + " | ".join(map(str, counts))
            + f" | {statistics.mean(d_acc):+.2f} ({min(d_acc):+.2f}) | "
            f"{statistics.mean(msp):.1f} ({statistics.mean(msp_plain):.1f}) | "
            f"{statistics.mean(d_near):+.2f} ({min(d_near):+.2f}) | "
            f"{statistics.mean(d_maha):+.2f} |"
        )
    return out


def _pooled_groups(logs: list[Path]) -> dict[tuple[str, int], list[Path]]:
    """The weight-0.1, mean-head, unstructured grids by (ID set, epochs)."""
    groups: dict[tuple[str, int], list[Path]] = {}
    for path in logs:
        if weight_of(path) == 0.1 and "-head-" not in path.stem and "-channel-" not in path.stem:
            id_set = "digits" if "-digits-" in path.name else "mnist5k"
            groups.setdefault((id_set, _epochs_of(path)), []).append(path)
    return groups


def _trios(paths: list[Path], variant: str) -> tuple[list[tuple], list[str]]:
    """(plain, MOON, ``variant``) rows of every cell the grids at ``paths`` ran, and the
    names of the grids that had any."""
    trios, names = [], []
    for path in paths:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        keys = sorted({(r["arch"], r["method"], r["sparsity"]) for r in rows})
        found = [(select(rows, k, False), select(rows, k, True),
                  select(rows, k, True, variant)) for k in keys]  # fmt: skip
        found = [t for t in found if all(t)]
        if found:
            trios += found
            names.append(path.stem.removeprefix("reliability-"))
    return trios, names


def score_lines(logs: list[Path], variant: str = "blur+mixup") -> list[str]:
    """Near-OOD AUROC change of each logit score, pooled as :func:`pooled_lines` pools:
    ``max_logit`` ranks rows the same under any softmax temperature, so a loss it shares
    with MSP is not an artifact of the logits' scale."""
    scores = ("msp", "max_logit", "energy")
    out = [
        "",
        f"### Near-OOD AUROC by logit score, `synth` ({variant}) pooled as above (Δ points, "
        "mean over cells; cells within 0.5 point in brackets)",
        "",
        "| ID set | epochs | cells | score | MOON - plain | synth - plain | synth - MOON |",
        "|---|---|---|---|---|---|---|",
    ]
    for (id_set, epochs), paths in sorted(_pooled_groups(logs).items()):
        near = ((DIGITS if id_set == "digits" else FULL).ood[0],)
        trios, _ = _trios(paths, variant)
        if not trios:
            continue
        for score in scores:
            cells = []
            for a, b in ((0, 1), (0, 2), (1, 2)):
                d = [100 * (rows_mean(t[b], score, near) - rows_mean(t[a], score, near))
                     for t in trios]  # fmt: skip
                cells.append(f"{statistics.mean(d):+.2f} ({sum(x >= -0.5 for x in d)})")
            out.append(f"| {id_set} | {epochs} | {len(trios)} | {score} | " + " | ".join(cells)
                       + " |")  # fmt: skip
    return out


def render() -> str:
    logs = sorted(ROOT.glob("reliability-*-unknowns-*.jsonl"))
    lines = [
        "## Issue 18's targets per cell (synthesized unknowns)",
        "",
        "Command: `python benchmarks/unknowns_targets.py` (reads "
        + ", ".join(p.name for p in logs)
        + ")",
        "",
        "Cells meeting each target (module docstring), out of the cells a grid has; "
        "near-OOD: the ID set's held-out classes 6-9.",
        "",
        "| grid | variant | score | cells | " + " | ".join(TARGETS) + " |",
        "|---|---|---|---|" + "---|" * len(TARGETS),
    ]
    for path in logs:
        lines += grid_lines(path)
    lines += weight_lines(logs)
    lines += generator_lines(logs)
    lines += generator_lines(logs, 0.05)
    lines += noise_lines([p for p in logs if "blur_mixup" in p.name])
    lines += head_lines(logs)
    lines += pooled_lines(logs)
    lines += score_lines(logs)
    return "\n".join(lines) + "\n"


def main() -> None:
    text = render()
    print(text)
    update_section("unknowns-targets", text)


if __name__ == "__main__":
    main()
