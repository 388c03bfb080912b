"""Why the separate unknown head loses near-OOD AUROC (issue 18, session 25): what each
part of the MSP score does on the held-out digits.

    python benchmarks/head_probe.py        # about 2 minutes on 2 CPU cores

digits 0-5 as ID, the grid's CNN, RigL 90%, 10 epochs, seeds 0-1 (the setting where
``--unknown-head separate`` lost most near-OOD MSP AUROC against the mean head). For
plain, MOON, ``synth`` with the mean head and ``synth`` with the separate head (the
variants ``shufbn-plain``, ``shufbn-none``, ``shufbn-mix`` and ``shufbn-factord`` of
``unknowns_ablation.py``, which repeat compress's runs exactly), the near-OOD (digits
6-9) AUROC of three scores: MSP (max over the known classes of the (K+1)-way softmax,
the paper's score), the known classes' own softmax maximum (the unknown column left
out), and 1 - p(unknown); and p(unknown)'s median and 90th percentile on the ID test
rows and the near-OOD rows. MSP = (1 - p(unknown)) x the known softmax maximum, so the
table shows whether a loss comes from the known classes' ranking or from p(unknown).
Written into RESULTS.md, section head-probe.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from pathlib import Path

import torch
from reliability import DIGITS, Grid, compress_config, prepare
from results_file import update_section
from sklearn.metrics import roc_auc_score
from unknowns_ablation import VARIANTS, storage_order

from moonprune.assessment import collect
from moonprune.checkpoints import DenseModel
from moonprune.pipeline import compress

NAMES = {"shufbn-plain": "plain", "shufbn-none": "MOON", "shufbn-mix": "synth, mean head",
         "shufbn-factord": "synth, separate head"}  # fmt: skip


def _auroc(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> float:
    y = [1] * len(id_scores) + [0] * len(ood_scores)
    return 100 * float(roc_auc_score(y, torch.cat([id_scores, ood_scores]).numpy()))


def probe_run(variant: str, seed: int) -> dict[str, float]:
    """The three AUROCs and p(unknown)'s quantiles of one run."""
    grid = Grid(**{**DIGITS.__dict__, "epochs": 10})
    setting = prepare(grid, {"factory": "moonprune.models:demo_cnn", "kwargs": {"width": 16}},
                      seed)  # fmt: skip
    near, k = DIGITS.ood[0], setting.splits.num_classes
    unknowns, extra, patch = VARIANTS[variant]
    moon = {"enabled": unknowns != "plain", "warmup_epochs": 1, "unknowns_weight": 0.1,
            "unknowns": "none" if unknowns == "plain" else unknowns, **extra}  # fmt: skip
    with storage_order(), patch(), tempfile.TemporaryDirectory() as tmp:
        cfg = compress_config(grid, setting.spec, seed, Path(tmp) / "out", moon, "rigl", 0.9)
        result = compress(cfg, dense=DenseModel(copy.deepcopy(setting.dense), setting.spec))
        logits = collect(result.checkpoint.model.eval(), setting.splits, {near: setting.ood[near]})
    out: dict[str, float] = {}
    zs = {"id": logits.test.double(), "near": logits.ood[near].double()}
    p = {n: torch.softmax(z, dim=-1) for n, z in zs.items()}
    known = {n: torch.softmax(z[:, :k], dim=-1).amax(dim=-1) for n, z in zs.items()}
    out["msp"] = _auroc(p["id"][:, :k].amax(-1), p["near"][:, :k].amax(-1))
    out["known"] = _auroc(known["id"], known["near"])
    if zs["id"].shape[1] > k:
        out["unknown"] = _auroc(1 - p["id"][:, k], 1 - p["near"][:, k])
        for n in ("id", "near"):
            q = torch.quantile(p[n][:, k], torch.tensor([0.5, 0.9], dtype=torch.float64))
            out[f"{n}_q50"], out[f"{n}_q90"] = float(q[0]), float(q[1])
    return out


def main() -> None:
    torch.set_num_threads(1)
    lines = [
        "## Why the separate unknown head loses near-OOD AUROC (issue 18)",
        "",
        "Command: `python benchmarks/head_probe.py` (module docstring). digits 0-5, CNN, "
        "RigL 90%, 10 epochs, seeds 0-1, mean over the seeds; AUROC on digits 6-9 in %.",
        "",
        "| run | MSP | known softmax max | 1 - p(unknown) | p(unknown) ID median / p90 "
        "| p(unknown) near-OOD median / p90 |",
        "|---|---|---|---|---|---|",
    ]
    for variant, name in NAMES.items():
        runs = [probe_run(variant, seed) for seed in (0, 1)]

        def m(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.mean(r[key] for r in runs)

        if "unknown" in runs[0]:
            rest = (f"{m('unknown'):.2f} | {m('id_q50'):.2g} / {m('id_q90'):.2g} | "
                    f"{m('near_q50'):.2g} / {m('near_q90'):.2g}")  # fmt: skip
        else:
            rest = "- | - | -"
        lines.append(f"| {name} | {m('msp'):.2f} | {m('known'):.2f} | {rest} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    update_section("head-probe", text)


if __name__ == "__main__":
    main()
