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
(compress's deployed default). Written into benchmarks/RESULTS.md, section
unknowns-targets.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from reliability import DIGITS, FULL, rows_mean, select  # benchmarks/ on sys.path
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
    return "\n".join(lines) + "\n"


def main() -> None:
    text = render()
    print(text)
    update_section("unknowns-targets", text)


if __name__ == "__main__":
    main()
