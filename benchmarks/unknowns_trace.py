"""When does ``synth`` cost accuracy? The live model's test accuracy, epoch by epoch, for
plain, MOON and ``synth`` runs (and any variant of ``unknowns_ablation.py``) of the
mnist5k 95% grid (issue 18).

    python benchmarks/unknowns_trace.py --variants plain none blur+mixup kcol --archs cnn \
        --seeds 0 1                                                  # 24 runs, ~15 min
    python benchmarks/unknowns_trace.py --render-only

After every epoch the model being trained (not MOON's weight average) is put in eval
mode and scored on the ID test rows: accuracy (known-class argmax, as the report counts
it), mean largest known logit and mean p(unknown); after the last epoch, a copy of it
is scored again with its BatchNorm statistics recomputed as the output's are. The
scoring changes no weight and no random stream, so each run's final numbers are those
of the grid's run. Like ``unknowns_ablation.py``'s, every run recomputes BatchNorm in
storage order, as moonprune did up to commit 7e1aa53 when the log was made
(``unknowns_ablation.storage_order``). Together with the output, this splits a run's cost into what
training leaves, what recomputing BatchNorm adds, and what the weight average adds.
Written into RESULTS.md, section unknowns-trace.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from reliability import ARCHS, run_one
from results_file import update_section
from unknowns_ablation import LABELS, VARIANTS, _settings, storage_order

import moonprune.epoch_loop as epoch_loop
from moonprune.averaging import recompute_batchnorm
from moonprune.streaming import batch_rows

ROOT = Path(__file__).resolve().parent
LOG = ROOT / "unknowns-trace.jsonl"
#: the grid's own variants, as ``unknowns_ablation.VARIANTS`` gives the others
GRID: dict[str, tuple[str, dict[str, Any], Callable[[], Any]]] = {
    "plain": ("plain", {}, contextlib.nullcontext),
    "none": ("none", {}, contextlib.nullcontext),
    "blur+mixup": ("blur+mixup", {}, contextlib.nullcontext),
}


def scores(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, k: int) -> dict:
    """Accuracy, mean largest known logit and mean p(unknown) of ``model`` on ``(x, y)``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            z = torch.cat([model(b.to(device)).cpu() for b in x.split(batch_rows(x.shape))])
    finally:
        model.train(was_training)
    p = torch.softmax(z.double(), dim=-1)
    return {
        "accuracy": float((z[:, :k].argmax(dim=-1) == y).double().mean()),
        "max_logit": float(z[:, :k].amax(dim=-1).double().mean()),
        "p_unknown": float(p[:, k:].sum(dim=-1).mean()),
    }


def traced_run(grid: Any, setting: Any, seed: int, method: str, variant: str) -> dict:
    """One grid run of ``variant`` with the live model scored after every epoch."""
    test, k = setting.splits.test, setting.splits.num_classes
    saved = epoch_loop.EpochLoop._end_epoch
    curve: list[dict[str, float]] = []
    recomputed: dict[str, float] = {}

    def end(self: Any, epoch: int, *args: Any) -> None:
        saved(self, epoch, *args)
        curve.append(scores(self.model, test.x, test.y, k))
        if epoch == grid.epochs - 1:  # a copy with its BatchNorm recomputed, as the output's
            live = copy.deepcopy(self.model)
            recompute_batchnorm(self._recalibration_batches(grid.epochs), live)
            recomputed.update(scores(live, test.x, test.y, k))

    unknowns, extra, patch = GRID[variant] if variant in GRID else VARIANTS[variant]
    moon = {
        "enabled": unknowns != "plain",
        "warmup_epochs": max(1, grid.epochs // 6),
        "unknowns": "none" if unknowns == "plain" else unknowns,
        "unknowns_weight": 0.1,
        "unknown_head": "mean",
        **extra,
    }
    with storage_order(), patch(), mock.patch.object(epoch_loop.EpochLoop, "_end_epoch", end):
        row = run_one(grid, setting, seed, method, 0.95, moon)
    return {
        "final_accuracy": row["compressed"]["accuracy"],
        "curve": curve,
        "live_recomputed": recomputed,
    }


def trace(variants: list[str], archs: list[str], seeds: list[int], epochs: int) -> None:
    with LOG.open("a") as log:
        for grid, arch, seed, setting in _settings(archs, seeds, epochs):
            for method in grid.methods:
                for variant in variants:
                    rec = {
                        "variant": variant,
                        "arch": arch,
                        "seed": seed,
                        "method": method,
                        "epochs": epochs,
                        **traced_run(grid, setting, seed, method, variant),
                    }
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    curve = " ".join(f"{100 * c['accuracy']:.1f}" for c in rec["curve"])
                    print(
                        f"{variant} {arch} seed {seed} {method}: {curve} "
                        f"-> {100 * rec['final_accuracy']:.2f}",
                        flush=True,
                    )


def render() -> str:
    rows = [json.loads(line) for line in LOG.read_text().splitlines()] if LOG.exists() else []
    latest = {(r["variant"], r["arch"], r["seed"], r["method"], r["epochs"]): r for r in rows}
    lines = [
        "## When synthesized unknowns cost accuracy: the live model, epoch by epoch (issue 18)",
        "",
        "Command: `python benchmarks/unknowns_trace.py [--variants ...] [--archs ...] "
        "[--seeds ...]`. mnist5k 0-5 at 95% sparsity, RigL/SET/GMP; after each epoch the "
        "model in training (not the weight average) on the ID test rows. Δ accuracy = run "
        "- plain run of the same cell and epoch (points, mean over the runs); then the model "
        "in training at the end with its BatchNorm statistics recomputed as the output's "
        "are, and the output (MOON's weight average) against plain's output (its network, "
        "BatchNorm recomputed); last, the live model's mean p(unknown) and mean largest "
        "known logit on the ID test rows after the last epoch.",
        "",
    ]
    for epochs in sorted({key[-1] for key in latest}):
        cells = sorted({key[1:] for key in latest if key[0] == "plain" and key[-1] == epochs})
        header = " | ".join(str(e + 1) for e in range(epochs))
        plain = statistics.mean(latest[("plain", *c)]["curve"][-1]["max_logit"] for c in cells)
        lines += [
            f"{epochs} epochs, {len(cells)} cells. Δ accuracy of the live model after epoch:",
            "",
            f"| variant | {header} | live, BatchNorm recomputed | output | "
            f"p(unknown), largest known logit (plain: {plain:.2f}) |",
            "|---|" + "---|" * (epochs + 3),
        ]
        for variant in dict.fromkeys(key[0] for key in latest if key[-1] == epochs):
            ends = [latest[(variant, *c)]["curve"][-1] for c in cells if (variant, *c) in latest]
            unknown = statistics.mean(e["p_unknown"] for e in ends)
            logit = statistics.mean(e["max_logit"] for e in ends)
            pairs = [
                (latest[(variant, *c)], latest[("plain", *c)])
                for c in cells
                if (variant, *c) in latest
            ]
            if variant == "plain" or not pairs:
                continue
            per_epoch = [
                statistics.mean(
                    100 * (r["curve"][e]["accuracy"] - p["curve"][e]["accuracy"]) for r, p in pairs
                )
                for e in range(epochs)
            ]
            out = statistics.mean(
                100 * (r["final_accuracy"] - p["final_accuracy"]) for r, p in pairs
            )
            live = statistics.mean(
                100 * (r["live_recomputed"]["accuracy"] - p["live_recomputed"]["accuracy"])
                for r, p in pairs
            )
            steps = " | ".join(f"{d:+.1f}" for d in per_epoch)
            name = LABELS.get(variant, variant)
            lines.append(f"| {name} ({len(pairs)}) | {steps} | {live:+.2f} | {out:+.2f} | "
                         f"{unknown:.2g}, {logit:.2f} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variants", nargs="+", default=list(GRID), choices=list(GRID) + sorted(VARIANTS)
    )
    parser.add_argument("--archs", nargs="+", default=sorted(ARCHS), choices=sorted(ARCHS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    if not args.render_only:
        torch.set_num_threads(args.threads)  # 1: runs repeat to the last digit
        trace(args.variants, args.archs, args.seeds, args.epochs)
    text = render()
    print(text)
    update_section("unknowns-trace", text)


if __name__ == "__main__":
    main()
