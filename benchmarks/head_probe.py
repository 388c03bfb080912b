"""Where near-OOD AUROC goes (issue 18): what each part of the MSP score does on the
held-out digits, for plain, MOON and ``synth`` with either unknown head.

    python benchmarks/head_probe.py        # about 2 minutes on 2 CPU cores
    python benchmarks/head_probe.py --data mnist5k --epochs 30 --sparsity 0.95 \\
        --archs cnn resnet8 --methods rigl set gmp --seeds 0 \\
        --variants shufbn-plain shufbn-none shufbn-mix    # 18 runs, under 30 minutes

The default (session 25) is digits 0-5 as ID, the grid's CNN, RigL 90%, 10 epochs,
seeds 0-1: the setting where ``--unknown-head separate`` lost most near-OOD MSP AUROC
against the mean head. The flags pick another setting (session 26: mnist5k at
compress's 30 epochs, where ``synth`` costs most near-OOD AUROC against MOON alone).
For each variant of ``unknowns_ablation.py`` named (``shufbn-plain``, ``shufbn-none``,
``shufbn-mix`` and ``shufbn-factord``: plain, MOON, ``synth`` with the mean head and
with the separate head, each repeating compress's runs exactly), the near-OOD AUROC
of three scores: MSP (max over the known classes of the (K+1)-way softmax, the paper's
score), the known classes' own softmax maximum (the unknown column left out), and
1 - p(unknown); and p(unknown)'s median and 90th percentile on the ID test rows and the
near-OOD rows. MSP = (1 - p(unknown)) x the known softmax maximum, so the table shows
whether a loss comes from the known classes' ranking (the features and known rows) or
from p(unknown) mixed into it. Each run is logged (``head-probe[-TAG].jsonl``) and
written into RESULTS.md, section head-probe[-TAG].
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from reliability import ARCHS, DIGITS, FULL, Grid, compress_config, prepare
from results_file import update_section
from sklearn.metrics import roc_auc_score
from unknowns_ablation import VARIANTS, storage_order

from moonprune.assessment import collect
from moonprune.checkpoints import DenseModel
from moonprune.pipeline import compress

ROOT = Path(__file__).resolve().parent
NAMES = {"shufbn-plain": "plain", "shufbn-none": "MOON", "shufbn-mix": "synth, mean head",
         "shufbn-factord": "synth, separate head"}  # fmt: skip
GRIDS = {"digits": DIGITS, "mnist5k": FULL}


def _auroc(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> float:
    y = [1] * len(id_scores) + [0] * len(ood_scores)
    return 100 * float(roc_auc_score(y, torch.cat([id_scores, ood_scores]).numpy()))


def probe_run(args: argparse.Namespace, setting: Any, grid: Grid, variant: str, seed: int,
              method: str) -> dict[str, float]:  # fmt: skip
    """The three AUROCs and p(unknown)'s quantiles of one run."""
    near, k = grid.ood[0], setting.splits.num_classes
    unknowns, extra, patch = VARIANTS[variant]
    moon = {"enabled": unknowns != "plain", "warmup_epochs": max(1, args.epochs // 6),
            "unknowns_weight": 0.1, "unknowns": "none" if unknowns == "plain" else unknowns,
            **extra}  # fmt: skip
    with storage_order(), patch(), tempfile.TemporaryDirectory() as tmp:
        cfg = compress_config(grid, setting.spec, seed, Path(tmp) / "out", moon, method,
                              args.sparsity)  # fmt: skip
        result = compress(cfg, dense=DenseModel(copy.deepcopy(setting.dense), setting.spec))
        logits = collect(result.checkpoint.model.eval(), setting.splits, {near: setting.ood[near]})
    out: dict[str, float] = {"accuracy": 100 * result.report.models["compressed"]["accuracy"]}
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


def _tag(args: argparse.Namespace) -> str:
    """'' for session 25's default setting, else its ID set, epochs and sparsity: one log
    and section per such setting (a run with other archs, methods or seeds replaces it)."""
    default = (args.data, args.epochs, args.sparsity, args.archs, args.methods, args.seeds)
    if default == ("digits", 10, 0.9, ["cnn"], ["rigl"], [0, 1]):
        return ""
    return f"-{args.data}-e{args.epochs}-{args.sparsity:g}"


def _paired(runs: list[dict[str, Any]], moon: dict[tuple, dict[str, Any]], key: str) -> str:
    """Mean ± standard error of ``key`` minus MOON's run of the same cell and seed ("-"
    for MOON itself or fewer than two pairs)."""
    keys = [(r, (r["arch"], r["method"], r["seed"])) for r in runs]
    d = [r[key] - moon[c][key] for r, c in keys if r["variant"] != "shufbn-none" and c in moon]
    if len(d) < 2:
        return "-"
    return f"{statistics.mean(d):+.2f} ± {statistics.stdev(d) / len(d) ** 0.5:.2f}"


def render(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    grid = GRIDS[args.data]
    setting = (f"{args.data} 0-5, {', '.join(args.archs)}, {', '.join(args.methods)} at "
               f"{args.sparsity:.0%}, {args.epochs} epochs, seeds "
               f"{', '.join(map(str, args.seeds))}")  # fmt: skip
    flags = "" if not _tag(args) else (
        f" --data {args.data} --epochs {args.epochs} --sparsity {args.sparsity:g} --archs "
        f"{' '.join(args.archs)} --methods {' '.join(args.methods)} --seeds "
        f"{' '.join(map(str, args.seeds))} --variants {' '.join(args.variants)}")  # fmt: skip
    lines = [
        f"## Where near-OOD AUROC goes: the parts of MSP ({args.data}, {args.epochs} epochs; "
        "issue 18)",
        "",
        f"Command: `python benchmarks/head_probe.py{flags}` (module docstring). {setting}; "
        f"mean over the runs; AUROC on {grid.ood[0]} (near-OOD) in %. Paired Δ: the run "
        "minus MOON's run of the same cell and seed (± standard error).",
        "",
        "| run | runs | accuracy | MSP | known softmax max | 1 - p(unknown) | "
        "p(unknown) ID median / p90 | p(unknown) near-OOD median / p90 | "
        "Δ MSP vs MOON | Δ known softmax max vs MOON |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    moon = {(r["arch"], r["method"], r["seed"]): r for r in rows if r["variant"] == "shufbn-none"}
    for variant in args.variants:
        runs = [r for r in rows if r["variant"] == variant]
        if not runs:
            continue

        def m(key: str, runs: list[dict[str, Any]] = runs) -> float:
            return statistics.mean(r[key] for r in runs)

        if "unknown" in runs[0]:
            rest = (f"{m('unknown'):.2f} | {m('id_q50'):.2g} / {m('id_q90'):.2g} | "
                    f"{m('near_q50'):.2g} / {m('near_q90'):.2g}")  # fmt: skip
        else:
            rest = "- | - | -"
        acc = f"{m('accuracy'):.2f}" if "accuracy" in runs[0] else "-"
        lines.append(f"| {NAMES[variant]} | {len(runs)} | {acc} | {m('msp'):.2f} | "
                     f"{m('known'):.2f} | {rest} | {_paired(runs, moon, 'msp')} | "
                     f"{_paired(runs, moon, 'known')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def run_all(args: argparse.Namespace, log_path: Path) -> None:
    """Every (arch, seed, method, variant) run of the setting, one log line each."""
    grid = Grid(**{**GRIDS[args.data].__dict__, "epochs": args.epochs})
    with log_path.open("w") as log:
        for arch in args.archs:
            for seed in args.seeds:
                setting = prepare(grid, ARCHS[arch], seed)
                for method, variant in itertools.product(args.methods, args.variants):
                    rec = {"arch": arch, "seed": seed, "method": method, "variant": variant,
                           **probe_run(args, setting, grid, variant, seed, method)}  # fmt: skip
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    print(rec, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits", choices=sorted(GRIDS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--archs", nargs="+", default=["cnn"], choices=sorted(ARCHS))
    parser.add_argument("--methods", nargs="+", default=["rigl"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=list(NAMES), choices=list(NAMES))
    parser.add_argument("--render-only", action="store_true", help="rebuild from the log")
    args = parser.parse_args()
    torch.set_num_threads(1)
    log_path = ROOT / f"head-probe{_tag(args)}.jsonl"
    if not args.render_only:
        run_all(args, log_path)
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    text = render(args, rows)
    print(text)
    update_section(f"head-probe{_tag(args)}", text)


if __name__ == "__main__":
    main()
