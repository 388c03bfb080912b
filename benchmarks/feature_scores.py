"""Which OOD score should be the default? Every score, dense and compressed, measured.

    python benchmarks/feature_scores.py            # digits + mnist5k, cnn + resnet8, seeds 0-1
    python benchmarks/feature_scores.py --seeds 0  # quicker

For each ID set (digits 0-5, mnist5k 0-5), architecture (demo_cnn width 16, resnet8
width 8) and seed, a dense model is trained as ``benchmarks/reliability.py`` trains
it (``moonprune.demo.train_dense``), then compressed with ``moonprune.compress``
(RigL 90%, MOON, a few epochs). ``report.scores`` holds the AUROC of every score
(logit scores msp, energy, max_logit, unknown; feature scores mahalanobis, knn) for
the dense and the compressed model against held-out classes 6-9, the other digit
set's 6-9, textures, photos, faces and noise. Written into benchmarks/RESULTS.md,
section ``feature-scores``, as measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from results_file import update_section  # benchmarks/ is on sys.path when run as a script

from moonprune.checkpoints import ArchSpec, DenseModel
from moonprune.config import build_config
from moonprune.data import load_splits
from moonprune.demo import train_dense
from moonprune.pipeline import compress

ROOT = Path(__file__).parents[1]
SETTINGS = {
    "digits:0-5": ("digits:6-9", "mnist5k:6-9", "textures", "photos", "faces", "noise"),
    "mnist5k:0-5": ("mnist5k:6-9", "digits:6-9", "textures", "photos", "faces", "noise"),
}
ARCHS = {
    "cnn": ArchSpec("moonprune.models:demo_cnn", {"width": 16}),
    "resnet8": ArchSpec("moonprune.models:resnet8", {"width": 8}),
}
TARGET = 0.95  # the bar: mean AUROC with the default score


def run(seeds: list[int], epochs: int, dense_epochs: int, log: Any) -> list[dict[str, Any]]:
    rows = []
    for data, ood in SETTINGS.items():
        for arch_name, arch in ARCHS.items():
            for seed in seeds:
                splits = load_splits(data, seed=seed)
                spec = arch.with_defaults(num_classes=splits.num_classes,
                                          in_channels=splits.preprocessing.channels)  # fmt: skip
                torch.manual_seed(seed)
                dense = train_dense(spec.build(), splits, epochs=dense_epochs, seed=seed)
                with tempfile.TemporaryDirectory() as tmp:
                    cfg = build_config({
                        "checkpoint": "", "data": data, "ood": list(ood), "out": f"{tmp}/out",
                        "arch": spec.factory, "arch_kwargs": spec.kwargs, "export": False,
                        "train": {"epochs": epochs, "seed": seed},
                        "moon": {"enabled": True, "warmup_epochs": 1},
                        "sparsity": {"method": "rigl", "sparsity": 0.9},
                    })  # fmt: skip
                    start = time.perf_counter()
                    report = compress(cfg, dense=DenseModel(copy.deepcopy(dense), spec)).report
                row = {"data": data, "arch": arch_name, "seed": seed, "scores": report.scores,
                       "accuracy": {m: report.models[m]["accuracy"] for m in
                                    ("dense", "compressed")},
                       "seconds": time.perf_counter() - start}  # fmt: skip
                rows.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                means = {s: mean_auroc(v) for s, v in report.scores["compressed"].items()}
                print(
                    f"{data} {arch_name} seed {seed}: compressed mean AUROC "
                    + ", ".join(f"{s} {100 * m:.1f}" for s, m in means.items()),
                    flush=True,
                )
    return rows


def mean_auroc(per_ood: dict[str, dict[str, float]]) -> float:
    return statistics.mean(v["auroc"] for v in per_ood.values())


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def render(rows: list[dict[str, Any]], seconds: float, command: str) -> str:
    seeds = sorted({r["seed"] for r in rows})
    scores = list(rows[0]["scores"]["compressed"])
    columns = ["6-9 (open set)", "other set 6-9", "textures", "photos", "faces", "noise"]
    lines = [
        "## OOD scores side by side: logit scores vs feature scores (issue 17)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.platform()}, {torch.get_num_threads()} torch threads; wall time "
        f"{seconds / 60:.1f} min. Dense models trained as benchmarks/reliability.py does; "
        "compressed: RigL 90%, MOON, "
        f"{rows[0].get('epochs', '?')} epochs. Seeds {seeds}; AUROC in %, mean ± std over "
        "seeds; mean = over the six OOD sets.",
        "",
        "| ID | arch | score | dense mean | compressed mean | Δ | "
        + " | ".join(f"compressed {c}" for c in columns)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(columns),
    ]
    for data in SETTINGS:
        for arch in ARCHS:
            sel = [r for r in rows if (r["data"], r["arch"]) == (data, arch)]
            if not sel:
                continue
            for score in scores:
                dense = [mean_auroc(r["scores"]["dense"][score]) for r in sel
                         if score in r["scores"]["dense"]]  # fmt: skip
                comp = [mean_auroc(r["scores"]["compressed"][score]) for r in sel]
                delta = statistics.mean(comp) - statistics.mean(dense) if dense else None
                per = [_ms([r["scores"]["compressed"][score][o]["auroc"] for r in sel])
                       for o in SETTINGS[data]]  # fmt: skip
                d_text = "-" if delta is None else f"{100 * delta:+.1f}"
                lines.append(
                    f"| {data} | {arch} | {score} | {_ms(dense) if dense else '-'} | {_ms(comp)} "
                    f"| {d_text} | " + " | ".join(per) + " |"
                )
    acc = [(r["accuracy"]["dense"], r["accuracy"]["compressed"]) for r in rows]
    lines += [
        "",
        f"Accuracy over all runs: dense {_ms([a for a, _ in acc])}, compressed "
        f"{_ms([c for _, c in acc])}. `unknown` exists only with the K+1 head (compressed).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--dense-epochs", type=int, default=15)
    args = parser.parse_args()
    command = "python benchmarks/feature_scores.py " + " ".join(sys.argv[1:])
    start = time.perf_counter()
    with open(ROOT / "benchmarks" / "feature-scores.jsonl", "w") as log:
        rows = run(args.seeds, args.epochs, args.dense_epochs, log)
    for row in rows:
        row["epochs"] = args.epochs
    text = render(rows, time.perf_counter() - start, command.strip())
    update_section("feature-scores", text)
    print(text)


if __name__ == "__main__":
    main()
