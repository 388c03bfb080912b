"""What reading the training rows shuffled for BatchNorm's recomputation changed.

    python benchmarks/recalibration_order.py     # seconds: no training, reads the .jsonl logs

Up to commit 7e1aa53 moonprune recomputed BatchNorm's statistics (the weight average's
at the end of each averaging epoch, and the output's of a run without an average) on
the training rows in storage order. mnist5k stores its rows class by class, as does
any image folder, so each batch of 256 held one or two classes. The reference's loader
shuffles, and so does moonprune since. The grids below were rerun on the new code
(same commands, 1 torch thread, so every run is deterministic); their logs of before
are kept in ``benchmarks/storage-order/``. Each rerun row is paired with the row of
the same (arch, method, sparsity, variant, seed) before: the differences are the
order's doing alone. Written into RESULTS.md, section recalibration-order.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from reliability import DIGITS, FULL, feature_mean, score_mean
from results_file import update_section

ROOT = Path(__file__).resolve().parent
#: (label, logs of the rerun grid(s), ID set)
PAIRS = (
    ("mnist5k, 10 epochs", ("reliability-full.jsonl",), "mnist5k"),
    ("mnist5k, 30 epochs", ("reliability-full-cnn-e30.jsonl",
                            "reliability-full-resnet8-0.9-e30.jsonl",
                            "reliability-full-resnet8-0.95-e30.jsonl"), "mnist5k"),
    ("mnist5k ablation (RigL 90%)", ("ablation-full.jsonl",), "mnist5k"),
    ("digits, 10 epochs", ("reliability-digits.jsonl",), "digits"),
    ("digits, 30 epochs", ("reliability-digits-cnn-e30.jsonl",
                           "reliability-digits-resnet8-e30.jsonl"), "digits"),
    ("digits ablation (RigL 90%)", ("ablation-digits.jsonl",), "digits"),
)  # fmt: skip
KEY = ("arch", "method", "sparsity", "moon", "unknowns", "variant", "seed")


def _rows(path: Path) -> dict[tuple, dict[str, Any]]:
    rows = (json.loads(line) for line in path.read_text().splitlines())
    return {tuple(r.get(k) for k in KEY): r for r in rows}


def _numbers(row: dict[str, Any], near: str) -> dict[str, float]:
    return {
        "accuracy": 100 * row["compressed"]["accuracy"],
        "msp_near": 100 * score_mean(row, "msp", (near,)),
        "msp_mean": 100 * score_mean(row, "msp"),
        "maha_mean": 100 * (feature_mean(row, "mahalanobis++") or 0.0),
        "maha_near": 100 * (feature_mean(row, "mahalanobis++", names=(near,)) or 0.0),
    }


def _mse(values: list[float]) -> str:
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):+.2f} ± {se:.2f}"


def render() -> str:
    lines = [
        "## BatchNorm recomputed on shuffled training rows: what changed (session 24)",
        "",
        "Δ = shuffled - storage order, the same run otherwise (points, mean ± standard "
        "error over the paired runs); near = the ID set's held-out digits 6-9; MSP at "
        "T = 1; `mahalanobis++` as compress reports it (the deployed score). Accuracy "
        "up / down: runs whose accuracy rose / fell by more than 0.1 point.",
        "",
        "| grids | runs | Δ accuracy | accuracy up / down | Δ MSP near | Δ MSP mean "
        "| Δ mahalanobis++ near | Δ mahalanobis++ mean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, names, data in PAIRS:
        near = (FULL if data == "mnist5k" else DIGITS).ood[0]
        diffs: dict[str, list[float]] = {}
        for name in names:
            old, new = _rows(ROOT / "storage-order" / name), _rows(ROOT / name)
            for key in sorted(set(old) & set(new), key=str):
                a, b = _numbers(old[key], near), _numbers(new[key], near)
                for k in a:
                    diffs.setdefault(k, []).append(b[k] - a[k])
        if not diffs:
            continue
        acc = diffs["accuracy"]
        up, down = sum(d > 0.1 for d in acc), sum(d < -0.1 for d in acc)
        lines.append(
            f"| {label} | {len(acc)} | {_mse(acc)} | {up} / {down} | "
            f"{_mse(diffs['msp_near'])} | {_mse(diffs['msp_mean'])} | "
            f"{_mse(diffs['maha_near'])} | {_mse(diffs['maha_mean'])} |"
        )
    logs = ", ".join(n for _, names, _ in PAIRS for n in names)
    lines += ["", f"Command: `python benchmarks/recalibration_order.py` (reads {logs} and "
              "their namesakes in benchmarks/storage-order/)"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    text = render()
    update_section("recalibration-order", text)
    print(text)


if __name__ == "__main__":
    main()
