"""Sparse vs dense on each feature score, read from the reliability grids' logs.

    python benchmarks/score_gaps.py     # seconds: no training, reads the .jsonl logs

Issue 17's target is that the compressed model's mean AUROC on the deployed score is
within 1 point of the dense model's on the same score. The grids
(``python benchmarks/reliability.py`` and ``--digits``) log, per run, every score's
AUROC per OOD set for the dense and the compressed model (report.json ``scores``).
This script averages (compressed - dense) over the OOD sets per run, then gives the
mean over seeds and the worst seed for each (dataset, arch, sparsity, plain/MOON) cell
and each feature score. The grids fine-tune for 10 epochs; the sub-grids at compress's
default of 30 epochs (``python benchmarks/reliability.py --epochs 30`` with ``--archs``
and ``--sparsities``, and ``--digits --archs ... --epochs 30``, one torch thread; see
``LOGS``) are read too when their logs exist. Written into benchmarks/RESULTS.md,
section score-gaps.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from results_file import update_section

ROOT = Path(__file__).resolve().parent
LOGS = {
    "mnist5k": ("reliability-full.jsonl",),
    "digits": ("reliability-digits.jsonl",),
    "mnist5k, 30 epochs": (
        "reliability-full-cnn-e30.jsonl",
        "reliability-full-resnet8-0.9-e30.jsonl",
        "reliability-full-resnet8-0.95-e30.jsonl",
    ),
    "digits, 30 epochs": (
        "reliability-digits-cnn-e30.jsonl",
        "reliability-digits-resnet8-e30.jsonl",
    ),
}
SCORES = ("mahalanobis++", "mahalanobis", "knn")


def gaps(path: Path) -> dict[tuple[str, float, bool], dict[str, list[float]]]:
    """(arch, sparsity, moon) -> score -> per-run mean (compressed - dense) AUROC, points."""
    cells: dict[tuple[str, float, bool], dict[str, list[float]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("unknowns", "none") != "none":  # MOON as published and plain only
            continue
        table = row["report_scores"]
        for score in SCORES:
            pairs = [
                (v["auroc"], table["dense"][score][ood]["auroc"])
                for ood, v in table["compressed"][score].items()
            ]
            gap = 100 * statistics.mean(c - d for c, d in pairs)
            cells[(row["arch"], row["sparsity"], row["moon"])][score].append(gap)
    return cells


def render() -> str:
    lines = [
        "### Compressed - dense mean AUROC on the same score (points; mean over seeds, "
        "worst seed), RigL/SET/GMP pooled",
        "",
        "| ID | arch | sparsity | MOON | runs | " + " | ".join(SCORES) + " |",
        "|---|---|---|---|---|" + "---|" * len(SCORES),
    ]
    read = [ROOT / f for files in LOGS.values() for f in files if (ROOT / f).exists()]
    for name, files in LOGS.items():
        cells: dict[tuple[str, float, bool], dict[str, list[float]]] = {}
        for path in (ROOT / f for f in files if (ROOT / f).exists()):
            cells.update(gaps(path))  # the sub-grids' cells do not overlap
        for (arch, sparsity, moon), by_score in sorted(cells.items()):
            runs = len(by_score[SCORES[0]])
            cells = [f"{statistics.mean(v):+.2f} ({min(v):+.2f})" for v in by_score.values()]
            lines.append(f"| {name} | {arch} | {sparsity:.0%} | {'yes' if moon else 'no'} | "
                         f"{runs} | " + " | ".join(cells) + " |")  # fmt: skip
    lines += ["", "Command: `python benchmarks/score_gaps.py` (reads "
              + ", ".join(p.name for p in read) + ")"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    text = render()
    update_section("score-gaps", text)
    print(text)


if __name__ == "__main__":
    main()
