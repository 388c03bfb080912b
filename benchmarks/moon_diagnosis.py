"""Why does MOON not beat plain sparse fine-tuning on mnist5k? Measurements, not tuning.

    python benchmarks/moon_diagnosis.py            # cnn, RigL 90%, mnist5k:0-5, seeds 0 1 2

For the dense model and the RigL-90% plain and MOON models of each seed it records:

- where the probability mass of the unknown output goes: mean ``p_unknown`` on the ID
  test split and on each OOD set (no sample is ever labelled K, so cross-entropy's
  gradient on the unknown logit is ``p_u > 0``: it only ever pushes ``p_u`` down; the
  MOON weight ``w = 1 + a / (1 + a p_u)`` reweights misclassified samples but adds no
  term that raises ``p_u``);
- the AUROC per OOD set under every score moonprune offers (``msp``, ``energy``,
  ``max_logit``, ``unknown``), so a failure of MSP itself shows apart from a failure
  of the sparse model;
- the mean input norm of each set after normalisation, because ReLU networks grow
  more confident the further an input lies from the data (Hein et al., CVPR 2019).

The section it writes into benchmarks/RESULTS.md is the investigation that issue 7
asks for when the target is missed.
"""

from __future__ import annotations

import copy
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from reliability import FULL, compress_config  # benchmarks/ is on sys.path as a script
from results_file import update_section
from sklearn.metrics import roc_auc_score

from moonprune.assessment import collect
from moonprune.checkpoints import ArchSpec, DenseModel
from moonprune.data import load_ood, load_splits
from moonprune.demo import train_dense
from moonprune.pipeline import compress
from moonprune.reliability.scores import SCORES, compute_score

SEEDS = (0, 1, 2)
METHOD, SPARSITY = "rigl", 0.9


def measure(model: torch.nn.Module, splits: Any, ood: dict[str, Any], k: int) -> dict[str, Any]:
    """p_unknown means and AUROC per score and OOD set for one model."""
    model.eval()
    logits = collect(model, splits, ood)
    has_unknown = logits.test.shape[1] == k + 1
    out: dict[str, Any] = {"p_unknown": {}, "auroc": {}}
    sets = {"ID test": logits.test, **logits.ood}
    for name, values in sets.items():
        p_u = torch.softmax(values.double(), 1)[:, k].mean().item() if has_unknown else 0.0
        out["p_unknown"][name] = p_u
    for score in SCORES.names("logits"):
        if score == "unknown" and not has_unknown:
            continue
        id_s = compute_score(logits.test, k, score).double().numpy()
        for name, values in logits.ood.items():
            ood_s = compute_score(values, k, score).double().numpy()
            y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
            out["auroc"][(score, name)] = float(roc_auc_score(y, np.r_[id_s, ood_s]))
    return out


def run() -> tuple[list[dict[str, Any]], dict[str, float]]:
    arch = FULL.archs["cnn"]
    rows: list[dict[str, Any]] = []
    norms: dict[str, float] = {}
    for seed in SEEDS:
        splits = load_splits(FULL.data, seed=seed)
        ood = {name: load_ood(name, splits.preprocessing, seed=seed) for name in FULL.ood}
        if not norms:
            sets = {"ID test": splits.test.x, **{n: s.x for n, s in ood.items()}}
            norms = {n: float(x.flatten(1).norm(dim=1).mean()) for n, x in sets.items()}
        spec = ArchSpec(arch["factory"], arch["kwargs"]).with_defaults(
            num_classes=splits.num_classes, in_channels=splits.preprocessing.channels
        )
        torch.manual_seed(seed)
        dense = train_dense(spec.build(), splits, epochs=FULL.dense_epochs, seed=seed)
        k = splits.num_classes
        rows.append({"seed": seed, "model": "dense", **measure(dense, splits, ood, k)})
        for moon in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                moon_cfg = {"enabled": moon, "warmup_epochs": max(1, FULL.epochs // 6)}
                cfg = compress_config(FULL, spec, seed, Path(tmp) / "out", moon_cfg, METHOD,
                                      SPARSITY)  # fmt: skip
                result = compress(cfg, dense=DenseModel(copy.deepcopy(dense), spec))
            model = result.checkpoint.model
            name = "RigL 90% MOON" if moon else "RigL 90% plain"
            rows.append({"seed": seed, "model": name, **measure(model, splits, ood, k)})
            print(f"seed {seed} {name} done", flush=True)
    return rows, norms


def _mean(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def render(rows: list[dict[str, Any]], norms: dict[str, float], seconds: float) -> str:
    models = ["dense", "RigL 90% plain", "RigL 90% MOON"]
    ood = list(FULL.ood)
    lines = [
        "## Diagnosis: why MOON does not beat plain sparse training on mnist5k",
        "",
        "Command: `python benchmarks/moon_diagnosis.py`  ",
        f"Machine: {platform.platform()}, {torch.get_num_threads()} torch threads  ",
        f"Wall time: {seconds / 60:.1f} min; cnn, {METHOD} {SPARSITY:.0%}, ID {FULL.data}, "
        f"{FULL.epochs} fine-tuning epochs, seeds {list(SEEDS)}; mean ± std over seeds, in %. "
        "Scores at T = 1 (the reliability table above uses compress's default "
        "`--temperature auto`, which can reorder MSP, so its AUROCs differ slightly).",
        "",
        "### AUROC per score (rows) and OOD set (columns)",
        "",
        "| model | score | " + " | ".join(ood) + " |",
        "|---|---|" + "---|" * len(ood),
    ]
    for model in models:
        sel = [r for r in rows if r["model"] == model]
        for score in SCORES.names("logits"):
            if (score, ood[0]) not in sel[0]["auroc"]:
                continue
            cells = [_mean([r["auroc"][(score, o)] for r in sel]) for o in ood]
            lines.append(f"| {model} | {score} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Mean p(unknown) of the (K+1)-way softmax",
        "",
        "| model | " + " | ".join(["ID test", *ood]) + " |",
        "|---|" + "---|" * (len(ood) + 1),
    ]
    for model in models[1:]:
        sel = [r for r in rows if r["model"] == model]
        cells = [
            f"{statistics.mean(r['p_unknown'][n] for r in sel):.2e}" for n in ["ID test", *ood]
        ]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Mean L2 norm of the normalised input (seed 0)",
        "",
        "| " + " | ".join(norms) + " |",
        "|" + "---|" * len(norms),
        "| " + " | ".join(f"{v:.1f}" for v in norms.values()) + " |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(2)
    start = time.perf_counter()
    rows, norms = run()
    text = render(rows, norms, time.perf_counter() - start)
    update_section("moon-diagnosis", text)
    print(text)


if __name__ == "__main__":
    main()
