"""What costs accuracy and near-OOD AUROC when synthesized unknowns train a 95%-sparse
network (issue 18)? Each hypothesis as a change to ``synth`` (blur+mixup, weight 0.1).

    python benchmarks/unknowns_ablation.py --variant beta03 --archs cnn   # 9 runs, ~4 min
    python benchmarks/unknowns_ablation.py --variant vos --epochs 30      # 18 runs
    python benchmarks/unknowns_ablation.py --probe --epochs 30 --seeds 0   # 18 runs
    python benchmarks/unknowns_ablation.py --render-only

The cells are ``benchmarks/reliability.py``'s mnist5k grid at 95% sparsity (cnn and
resnet8, RigL / SET / GMP, seeds 0-2, the same dense model per seed, compress's settings
as the grid passes them: MOON's warm-up ``max(1, epochs // 6)`` epochs,
``--unknowns-weight 0.1``). Each run
is compared with the plain, MOON (``--unknowns none``) and MOON+blur+mixup runs of the
same seed in the grid's logs (``reliability-full.jsonl`` and
``reliability-full-unknowns-blur_mixup-w0.1.jsonl``; at 30 epochs
``reliability-full-0.95-e30-unknowns-blur_mixup-w0.1.jsonl``): 1-thread runs are
deterministic, so the pairs differ only by the variant. Variants (each a hypothesis):

- ``hinge``: the synthesized rows' loss stops once p(unknown) >= 0.5 on a row
  (``relu(CE + log 0.5)``): is it the push past "rejected" that takes the capacity?
- ``beta03``: their gradient into the layers below the classifier scaled by 0.3 (the
  classifier gets all of it): do they reshape the ID features?
- ``detach``: MOON's weight ``w`` without the gradient through p(unknown) (a live
  unknown output lets that gradient push hard ID rows into "unknown"): is it MOON's
  push?
- ``a0``: MOON's reweighting nearly off (``a_final`` 0: ``a`` starts at its usual small
  ``ewma / 64`` and falls to 0, so the loss is almost plain cross-entropy over K+1);
  ``a0noavg``: and no weight averaging (K+1 cross-entropy plus the synthesized rows);
- ``late07``: the synthesized rows only from 70% of the epochs on;
- ``vos``: blur+mixup+vos (a third of the rows from VOS's feature-space generator);
- ``mixmid``: mixup's blend weight drawn from U(0.45, 0.55) instead of U(0.35, 0.65): a
  blend with one digit at 65% may look like a messy ID digit; do such rows make the
  network hedge on ID digits (``--probe``)?
- ``bnmix``: the BatchNorm statistics recomputed at the end (of each averaging epoch, and
  of the run) on the training rows *with* synthesized rows added as in training, not on
  the ID rows alone: does the network trained on mixed batches want mixed statistics?
- ``idbn``: in training, BatchNorm normalises every row with the ID rows' batch
  statistics, and its running statistics follow the ID rows alone
  (``unknowns_fit.py``'s patch; there, at weight 0.5 and ``blur``, it cost more): do
  the synthesized rows in the batch statistics cost the ID rows?
- ``avgall`` (and ``moon-avgall``, MOON without synthesized rows): the average updated
  at every step of its epochs, not in the first 10% of each (``average_fraction`` 0.1,
  MOON_METHOD.md part 4; at 10 epochs that schedule leaves the last 90% of the last
  epoch out of the output).

Some variants change moonprune's training step from outside (patches here only); they
are not options of the product. Written into RESULTS.md, section unknowns-ablation.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import itertools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from reliability import (
    ARCHS,
    FULL,
    Grid,
    compress_config,
    prepare,
    run_one,
    score_mean,
    without,
)
from results_file import update_section
from unknowns_fit import patched

import moonprune.epoch_loop as epoch_loop
import moonprune.unknown_forward as unknown_forward
from moonprune.assessment import collect
from moonprune.batching import iterate_batches, min_rows_per_batch
from moonprune.checkpoints import DenseModel
from moonprune.pipeline import compress
from moonprune.streaming import batch_rows
from moonprune.unknown_generators import mixup
from moonprune.unknowns import UNKNOWNS, epoch_generator, rows_for, synthesize, unknown_head

ROOT = Path(__file__).resolve().parent
LOG = ROOT / "unknowns-ablation.jsonl"
BASE = {10: ("reliability-full.jsonl", "reliability-full-unknowns-blur_mixup-w0.1.jsonl"),
        30: ("reliability-full-0.95-e30-unknowns-blur_mixup-w0.1.jsonl",)}  # fmt: skip


@contextlib.contextmanager
def _hinge() -> Iterator[None]:
    def loss_sum(logits: torch.Tensor, unknown: int) -> torch.Tensor:
        target = torch.full((len(logits),), unknown, dtype=torch.long)
        ce = F.cross_entropy(logits, target, reduction="none")
        return torch.relu(ce + torch.log(torch.tensor(0.5))).sum()

    with mock.patch.object(unknown_forward, "unknown_loss_sum", loss_sum):
        yield


class _ScaleRows(torch.autograd.Function):
    """Identity forward; the gradient of rows ``n:`` scaled by ``beta``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, n: int, beta: float) -> torch.Tensor:
        ctx.n, ctx.beta = n, beta
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.clone()
        grad[ctx.n :] *= ctx.beta
        return grad, None, None


@contextlib.contextmanager
def _beta(beta: float) -> Iterator[None]:
    cls = unknown_forward.SynthesizedUnknowns
    saved = cls._forward_with_unknowns

    def forward(self: Any, x: torch.Tensor, y: torch.Tensor, n_global: int,
                draws: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        n = len(y)
        hook = unknown_head(self.model).register_forward_pre_hook(
            lambda _m, a: (_ScaleRows.apply(a[0], n, beta),) if len(a[0]) > n else None
        )
        try:
            return saved(self, x, y, n_global, draws)
        finally:
            hook.remove()

    with mock.patch.object(cls, "_forward_with_unknowns", forward):
        yield


@contextlib.contextmanager
def _late(start: float) -> Iterator[None]:
    loop, cls = epoch_loop.EpochLoop, unknown_forward.SynthesizedUnknowns
    saved_step, saved_forward = loop._train_step, cls._forward_with_unknowns

    def step(self: Any, epoch: int, *args: Any, **kwargs: Any) -> None:
        self._ablation_epoch = epoch
        saved_step(self, epoch, *args, **kwargs)

    def forward(self: Any, x: torch.Tensor, y: torch.Tensor, n_global: int,
                draws: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        if self._ablation_epoch < start * self.cfg.epochs:
            return self.forward(x), torch.zeros(())
        return saved_forward(self, x, y, n_global, draws)

    with mock.patch.object(loop, "_train_step", step), \
            mock.patch.object(cls, "_forward_with_unknowns", forward):  # fmt: skip
        yield


@contextlib.contextmanager
def _bn_with_synthesized() -> Iterator[None]:
    loop = epoch_loop.EpochLoop
    saved = loop._recalibration_batches

    def batches(self: Any, epoch: int) -> Iterator[torch.Tensor]:
        draws = epoch_generator(self.cfg.seed, epoch, self.dist.rank)
        labelled = iterate_batches(self.data, batch_rows(self.data.x.shape, 256), 0,
                                   self.device, False, min_rows_per_batch(self.model))  # fmt: skip
        for x, (_, y) in zip(saved(self, epoch), labelled, strict=True):
            m = rows_for(len(x), self.moon_cfg.unknowns_fraction)
            yield torch.cat([x, synthesize(self.unknowns, x, y, m, draws, "input")])

    with mock.patch.object(loop, "_recalibration_batches", batches):
        yield


@contextlib.contextmanager
def _mixmid() -> Iterator[None]:
    blend = dataclasses.replace(
        UNKNOWNS.get("mixup"), fn=functools.partial(mixup, low=0.45, span=0.1)
    )
    with mock.patch.dict(UNKNOWNS._generators, {"mixup": blend}):
        yield


def _detach() -> contextlib.AbstractContextManager[None]:
    return without("gradient")


#: name -> (--unknowns, extra MOON settings, patch)
VARIANTS: dict[str, tuple[str, dict[str, Any], Callable[[], Any]]] = {
    "hinge": ("blur+mixup", {}, _hinge),
    "beta03": ("blur+mixup", {}, lambda: _beta(0.3)),
    "detach": ("blur+mixup", {}, _detach),
    "a0": ("blur+mixup", {"a_final": 0.0}, contextlib.nullcontext),
    "a0noavg": ("blur+mixup", {"a_final": 0.0, "average_epochs": 0}, contextlib.nullcontext),
    "late07": ("blur+mixup", {}, lambda: _late(0.7)),
    "vos": ("blur+mixup+vos", {}, contextlib.nullcontext),
    "mixmid": ("blur+mixup", {}, _mixmid),
    "bnmix": ("blur+mixup", {}, _bn_with_synthesized),
    "idbn": ("blur+mixup", {}, lambda: patched("id_bn")),
    "avgall": ("blur+mixup", {"average_fraction": 1.0}, contextlib.nullcontext),
    "moon-avgall": ("none", {"average_fraction": 1.0}, contextlib.nullcontext),
}


#: how the table names each variant (the grid's own runs first)
LABELS = {
    "none": "MOON (`none`)",
    "blur+mixup": "**synth** (blur+mixup)",
    "hinge": "`hinge`: no loss once p(unknown) >= 0.5",
    "beta03": "`beta03`: backbone gets 0.3 of their gradient",
    "detach": "`detach`: MOON's w without its gradient",
    "a0": "`a0`: MOON's reweighting ramped to 0",
    "a0noavg": "`a0noavg`: reweighting to 0, no averaging",
    "late07": "`late07`: rows from 70% of the epochs on",
    "vos": "`vos`: blur+mixup+vos",
    "mixmid": "`mixmid`: mixup weights 0.45-0.55",
    "bnmix": "`bnmix`: BatchNorm recomputed with the rows",
    "idbn": "`idbn`: BatchNorm batches of the ID rows",
    "avgall": "`avgall`: average updated at every step",
    "moon-avgall": "`moon-avgall`: MOON, average at every step",
}


def _settings(archs: list[str], seeds: list[int], epochs: int) -> Iterator[tuple]:
    """(grid, arch, seed, its trained dense setting) for the mnist5k grid at ``epochs``."""
    grid = Grid(**{**FULL.__dict__, "epochs": epochs})
    for arch in archs:
        for seed in seeds:
            yield grid, arch, seed, prepare(grid, ARCHS[arch], seed)


def run(variant: str, archs: list[str], seeds: list[int], epochs: int) -> None:
    unknowns, extra, patch = VARIANTS[variant]
    near = FULL.ood[0]
    with LOG.open("a") as log:
        for grid, arch, seed, setting in _settings(archs, seeds, epochs):
            for method in grid.methods:
                moon = {"enabled": True, "warmup_epochs": max(1, epochs // 6),
                        "unknowns": unknowns, "unknowns_weight": 0.1, **extra}  # fmt: skip
                start = time.perf_counter()
                with patch():
                    row = run_one(grid, setting, seed, method, 0.95, moon)
                maha = row["report_scores"]["compressed"]["mahalanobis++"]
                rec = {"variant": variant, "arch": arch, "seed": seed, "method": method,
                       "sparsity": 0.95, "epochs": epochs,
                       "accuracy": row["compressed"]["accuracy"],
                       "msp_mean": score_mean(row, "msp"),
                       "msp_near": score_mean(row, "msp", (near,)),
                       "maha_near": maha[near]["auroc"]}  # fmt: skip
                log.write(json.dumps(rec) + "\n")
                log.flush()
                print(f"{variant} {arch} seed {seed} {method}: acc "
                      f"{100 * rec['accuracy']:.2f} MSP {100 * rec['msp_mean']:.1f} near "
                      f"{100 * rec['msp_near']:.2f} ({time.perf_counter() - start:.0f}s)",
                      flush=True)  # fmt: skip


PROBE_LOG = ROOT / "unknowns-ablation-probe.jsonl"


def probe(archs: list[str], seeds: list[int], epochs: int) -> None:
    """Where the near-OOD AUROC goes: for plain, MOON and ``synth`` runs of the grid's
    cells, the mean MSP, max known logit and p(unknown) of the ID test rows and of the
    near-OOD rows (mnist5k 6-9), from the saved model's logits."""
    near = FULL.ood[0]
    with PROBE_LOG.open("a") as log:
        for grid, arch, seed, setting in _settings(archs, seeds, epochs):
            k = setting.splits.num_classes
            for method, variant in itertools.product(grid.methods, ("plain", "none", "blur+mixup")):
                moon = {"enabled": variant != "plain", "warmup_epochs": max(1, epochs // 6),
                        "unknowns": "none" if variant == "plain" else variant,
                        "unknowns_weight": 0.1}  # fmt: skip
                with tempfile.TemporaryDirectory() as tmp:
                    cfg = compress_config(grid, setting.spec, seed, Path(tmp) / "out", moon,
                                          method, 0.95)  # fmt: skip
                    result = compress(cfg, dense=DenseModel(copy.deepcopy(setting.dense),
                                                            setting.spec))  # fmt: skip
                logits = collect(result.checkpoint.model.eval(), setting.splits,
                                 {near: setting.ood[near]})  # fmt: skip
                rec: dict[str, Any] = {"arch": arch, "seed": seed, "method": method,
                                       "variant": variant, "epochs": epochs}  # fmt: skip
                for name, z in (("id", logits.test), ("near", logits.ood[near])):
                    p = torch.softmax(z.double(), dim=-1)
                    rec[f"{name}_msp"] = float(p[:, :k].amax(dim=-1).mean())
                    rec[f"{name}_max_logit"] = float(z[:, :k].amax(dim=-1).double().mean())
                    rec[f"{name}_p_unknown"] = float(p[:, k:].sum(dim=-1).mean())
                log.write(json.dumps(rec) + "\n")
                log.flush()
                print(rec, flush=True)


def probe_lines() -> list[str]:
    if not PROBE_LOG.exists():
        return []
    rows = [json.loads(line) for line in PROBE_LOG.read_text().splitlines()]
    lines = [
        "",
        "### Where the near-OOD AUROC goes: mean scores of the ID test rows and the near-OOD "
        "rows (mnist5k 6-9)",
        "",
        "Command: `python benchmarks/unknowns_ablation.py --probe --epochs E [--archs ...] "
        "[--seeds ...]`; mean over the runs (RigL/SET/GMP x the seeds and architectures "
        "given).",
        "",
        "| epochs | variant | runs | MSP ID / near | max known logit ID / near | "
        "p(unknown) ID / near |",
        "|---|---|---|---|---|---|",
    ]
    for epochs in sorted({r["epochs"] for r in rows}):
        for variant in ("plain", "none", "blur+mixup"):
            vs = [r for r in rows if r["epochs"] == epochs and r["variant"] == variant]
            if not vs:
                continue

            def m(key: str, vs: list[dict[str, Any]] = vs) -> float:
                return statistics.mean(r[key] for r in vs)

            lines.append(f"| {epochs} | {LABELS.get(variant, variant)} | {len(vs)} | "
                         f"{m('id_msp'):.3f} / {m('near_msp'):.3f} | "
                         f"{m('id_max_logit'):.2f} / {m('near_max_logit'):.2f} | "
                         f"{m('id_p_unknown'):.2g} / {m('near_p_unknown'):.2g} |")  # fmt: skip
    return lines


def _base_rows(epochs: int) -> dict[tuple, dict[str, float]]:
    """(variant, arch, method, seed) -> the four numbers, from the grid's logs at 95%."""
    out: dict[tuple, dict[str, float]] = {}
    near = FULL.ood[0]
    for name in BASE[epochs]:
        for line in (ROOT / name).read_text().splitlines():
            r = json.loads(line)
            if r["sparsity"] != 0.95:
                continue
            variant = "plain" if not r["moon"] else r["unknowns"]
            maha = r["report_scores"]["compressed"]["mahalanobis++"][near]["auroc"]
            out[(variant, r["arch"], r["method"], r["seed"])] = {
                "accuracy": r["compressed"]["accuracy"], "msp_mean": score_mean(r, "msp"),
                "msp_near": score_mean(r, "msp", (near,)), "maha_near": maha}  # fmt: skip
    return out


def _mse(values: list[float]) -> str:
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):+.2f} ± {se:.2f}"


def render() -> str:
    rows = [json.loads(line) for line in LOG.read_text().splitlines()] if LOG.exists() else []
    lines = [
        "## What costs accuracy when synthesized unknowns train a 95%-sparse network (issue 18)",
        "",
        "Command: `python benchmarks/unknowns_ablation.py --variant V [--epochs 30]` "
        "(module docstring: each variant is one hypothesis). mnist5k 0-5 at 95% sparsity, "
        "cnn and resnet8, RigL/SET/GMP, seeds 0-2; Δ = run - plain run of the same seed "
        "(points, mean ± standard error over the runs); MSP = mean AUROC over the six OOD "
        "sets; near = mnist5k 6-9.",
        "",
        "| epochs | variant | runs | Δ accuracy | runs within 0.5 | MSP | Δ near-OOD MSP | "
        "Δ near-OOD mahalanobis++ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for epochs in sorted({r["epochs"] for r in rows} | {10}):
        base = _base_rows(epochs)
        runs: dict[str, list[dict[str, float]]] = {}
        for (variant, arch, method, seed), v in base.items():
            if variant != "plain":
                runs.setdefault(variant, []).append({**v, "key": (arch, method, seed)})
        latest = {(r["variant"], r["arch"], r["method"], r["seed"]): r
                  for r in rows if r["epochs"] == epochs}  # a rerun replaces its run  # fmt: skip
        for (variant, *key), r in latest.items():
            runs.setdefault(variant, []).append({**r, "key": tuple(key)})
        for variant, vs in runs.items():
            pairs = [(v, base[("plain", *v["key"])]) for v in vs if ("plain", *v["key"]) in base]
            d = {k: [100 * (v[k] - p[k]) for v, p in pairs]
                 for k in ("accuracy", "msp_near", "maha_near")}  # fmt: skip
            name = LABELS.get(variant, variant)
            lines.append(f"| {epochs} | {name} | {len(pairs)} | {_mse(d['accuracy'])} | "
                         f"{sum(x >= -0.5 for x in d['accuracy'])} | "
                         f"{100 * statistics.mean(v['msp_mean'] for v, _ in pairs):.1f} | "
                         f"{_mse(d['msp_near'])} | {_mse(d['maha_near'])} |")  # fmt: skip
    return "\n".join(lines + probe_lines()) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS))
    parser.add_argument("--archs", nargs="+", default=sorted(ARCHS), choices=sorted(ARCHS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10, choices=sorted(BASE))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument(
        "--probe",
        action="store_true",
        help="mean scores of ID and near-OOD rows (plain, MOON, synth)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.probe:
        probe(args.archs, args.seeds, args.epochs)
    elif not args.render_only:
        if args.variant is None:
            parser.error("--variant is required unless --render-only")
        run(args.variant, args.archs, args.seeds, args.epochs)
    text = render()
    print(text)
    update_section("unknowns-ablation", text)


if __name__ == "__main__":
    main()
