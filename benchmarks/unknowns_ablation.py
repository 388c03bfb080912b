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
deterministic, so the pairs differ only by the variant. All of them were measured while
moonprune recomputed BatchNorm's statistics on the training rows in storage order (up to
commit 7e1aa53; it now shuffles them, see ``EpochLoop._recalibration_batches``): the
grid's logs of then are kept in ``benchmarks/storage-order/``, and every variant runs
with that order restored (:func:`_recalibration`) unless it sets its own (``shufbn-*``,
``bnmix``), so this script still reproduces its log. Variants (each a hypothesis):

- ``hinge``: the synthesized rows' loss stops once p(unknown) >= 0.5 on a row
  (``relu(CE + log 0.5)``): is it the push past "rejected" that takes the capacity?
- ``beta03``: their gradient into the layers below the classifier scaled by 0.3 (the
  classifier gets all of it): do they reshape the ID features?
- ``beta0``: none of it (session 23: ``beta03`` left the cost where it was; if the
  backbone's capacity were the cause, cutting all of their gradient into it should
  remove the cost);
- ``kcol``: their cross-entropy with the known logits detached, so it raises the unknown
  logit without pushing the known ones down (the probe saw ID max logits shrink);
- ``kpush2``: the other way, twice the gradient on their known logits: if what costs is
  the unknown logit rising where the known ones do not fall, pushing these down harder
  should cost less;
- ``rowonly``: both: only the unknown row of the classifier (weights and bias) learns
  from them, the rest of the network trains as under MOON alone;
- ``oe``: their loss is outlier exposure's, cross-entropy to the uniform distribution
  over the K known classes, with the unknown column left out: is it the unknown column
  (which the ID rows' softmax must then hold down) that costs, or the flattening of
  near-ID rows?
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
- ``shufbn-*`` (session 23, as are ``beta0``, ``kcol``, ``rowonly`` and ``oe``):
  BatchNorm statistics (the average's and the output's) recomputed on the training
  rows in a seeded shuffled order, as the reference's shuffling loader gives them,
  instead of moonprune's storage order, which on mnist5k (stored class by class) makes
  every batch of 256 one or two classes: ``shufbn-plain`` and ``shufbn-none`` (plain and
  MOON), ``shufbn-id`` (``synth``, ID rows only) and ``shufbn-mix`` (``synth``, with
  synthesized rows added as in training). ``unknowns_trace.py`` saw ``synth``'s extra
  cost over MOON appear when BatchNorm is recomputed on ID rows; these runs ask whether
  recomputing it the way the network was trained removes it.
- ``shufbn-factor`` (session 25; BatchNorm recomputed as the product does since session
  24): a factored head (:class:`FactoredHead`), whose unknown logit is ``logsumexp(known
  logits) + g``: the synthesized rows' loss then moves only ``g``, and the ID rows'
  (K+1)-way cross-entropy is the known classes' plus ``softplus(g)``, so no ID row has
  to raise its known logits over a rising unknown one (session 23's finding);
  ``shufbn-factord``: ``g`` reads the features detached, so the unknown output shapes
  nothing below the classifier and the backbone trains as under MOON (with the rows in
  BatchNorm's batches). Since
  session 25 ``shufbn-factord`` is compress's ``--unknown-head separate``
  (:class:`moonprune.heads.SeparateUnknownLinear`): the grid
  ``reliability-full-unknowns-blur_mixup-w0.1-head-separate.jsonl`` repeats its 18 runs
  to the last digit. Every variant here runs with ``unknown_head: mean``, the head all
  of them were logged with (the factored ones patch that head's construction).
- ``shufbn-noavg`` and ``shufbn-none-noavg`` (session 26, at 30 epochs): ``synth`` and
  MOON with ``average_epochs`` 0, so no averaging phase: the lr follows its cosine over
  every epoch and masks move until 75% of them, as in plain, instead of the last 20% of
  the epochs held at the lr floor while the weights are averaged (MOON_METHOD.md part
  4). At 10 epochs ``a0noavg`` kept 1.2 near-OOD points more than ``a0``, and
  ``averaging_bn.py`` saw MOON without the phase keep plain's near-OOD AUROC: is the
  averaging phase what costs near-OOD AUROC at compress's 30 epochs? Their table pairs
  them with the 30-epoch grid's plain, MOON and ``synth`` runs
  (``reliability-full-0.95-e30-unknowns-blur_mixup-w0.1.jsonl``, BatchNorm recomputed
  as the product does since session 24, which ``shufbn-*`` restores).

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
import math
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
    DIGITS,
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
import moonprune.heads as heads
import moonprune.unknown_forward as unknown_forward
from moonprune.assessment import collect
from moonprune.augment import augment_batch
from moonprune.batching import iterate_batches, min_rows_per_batch
from moonprune.checkpoints import DenseModel
from moonprune.conventions import UNKNOWN_ROW_ATTR
from moonprune.heads import SeparateUnknownLinear, separate_unknown_linear
from moonprune.pipeline import compress
from moonprune.streaming import batch_rows
from moonprune.unknown_generators import mixup
from moonprune.unknowns import UNKNOWNS, epoch_generator, rows_for, synthesize, unknown_head

ROOT = Path(__file__).resolve().parent
LOG = ROOT / "unknowns-ablation.jsonl"
#: the ID sets (``--data``) and, per (ID set, epochs), the grid's logs of plain, MOON and synth
GRIDS = {"mnist5k": FULL, "digits": DIGITS}
BASE = {("mnist5k", 10): ("reliability-full.jsonl",
                          "reliability-full-unknowns-blur_mixup-w0.1.jsonl"),
        ("mnist5k", 30): ("reliability-full-0.95-e30-unknowns-blur_mixup-w0.1.jsonl",),
        ("digits", 10): ("reliability-digits.jsonl",
                         "reliability-digits-unknowns-blur_mixup-w0.1.jsonl")}  # fmt: skip


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
def _recalibration(shuffled: bool, mixed: bool) -> Iterator[None]:
    """BatchNorm statistics recomputed (the average's and the output's) on the training
    rows, augmented as the product's ``_recalibration_batches`` does: with ``shuffled``,
    in a seeded shuffled order, as the reference's shuffling loader gives them, not in
    storage order; with ``mixed``, synthesized rows added as in training.
    ``shuffled=False, mixed=False`` is moonprune's recalibration up to commit 7e1aa53, under
    which every run of this script's log was made; ``shuffled=True, mixed=True`` gives the
    product's batches since (the product seeds the synthesized rows with rank 0's stream on
    every rank; in one process that is ``self.dist.rank``'s)."""
    loop = epoch_loop.EpochLoop

    def batches(self: Any, epoch: int) -> Iterator[torch.Tensor]:
        draws = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch + 15_485_863)
        unknowns = epoch_generator(self.cfg.seed, epoch, self.dist.rank)
        rows = batch_rows(self.data.x.shape, 256)
        order = self.cfg.seed * 100_003 + epoch + 7_919
        for x, y in iterate_batches(self.data, rows, order, self.device, shuffled,
                                    min_rows_per_batch(self.model)):  # fmt: skip
            x = augment_batch(x, self.cfg.augment, draws)
            if mixed:
                m = rows_for(len(x), self.moon_cfg.unknowns_fraction)
                x = torch.cat([x, synthesize(self.unknowns, x, y, m, unknowns, "input")])
            yield x

    with mock.patch.object(loop, "_recalibration_batches", batches):
        yield


def storage_order() -> contextlib.AbstractContextManager[None]:
    """The recalibration every logged run was made with (a variant's own patch, applied
    inside it, replaces it)."""
    return _recalibration(shuffled=False, mixed=False)


@contextlib.contextmanager
def _mixmid() -> Iterator[None]:
    blend = dataclasses.replace(
        UNKNOWNS.get("mixup"), fn=functools.partial(mixup, low=0.45, span=0.1)
    )
    with mock.patch.dict(UNKNOWNS._generators, {"mixup": blend}):
        yield


@contextlib.contextmanager
def _known_push(gain: float) -> Iterator[None]:
    """The synthesized rows' cross-entropy with the gradient on their known logits scaled
    by ``gain`` (same value): 0 raises their unknown logit without lowering the known
    ones, 2 lowers the known ones twice as hard."""
    saved = unknown_forward.unknown_loss_sum

    def loss_sum(logits: torch.Tensor, unknown: int) -> torch.Tensor:
        known = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
        known[unknown] = False
        scaled = gain * logits - (gain - 1) * logits.detach()
        return saved(torch.where(known, scaled, logits), unknown)

    with mock.patch.object(unknown_forward, "unknown_loss_sum", loss_sum):
        yield


@contextlib.contextmanager
def _outlier_exposure() -> Iterator[None]:
    """The synthesized rows' loss is cross-entropy to the uniform distribution over the
    K known classes (Hendrycks et al., "Deep anomaly detection with outlier exposure",
    ICLR 2019), minus its minimum ``log K``; the unknown column takes no part in it."""

    def loss_sum(logits: torch.Tensor, unknown: int) -> torch.Tensor:
        known = torch.log_softmax(logits[:, :unknown], dim=-1)
        return (-known.mean(dim=-1) - math.log(unknown)).sum()

    with mock.patch.object(unknown_forward, "unknown_loss_sum", loss_sum):
        yield


@contextlib.contextmanager
def _row_only() -> Iterator[None]:
    """Only the unknown row's weights (and bias) learn from the synthesized rows."""
    with _beta(0.0), _known_push(0.0):
        yield


class FactoredHead(SeparateUnknownLinear):
    """compress's ``separate`` head (:class:`moonprune.heads.SeparateUnknownLinear`: the
    unknown logit is ``logsumexp(known logits) + g``, so synthesized rows no longer move
    the known logits and ID rows hold ``g`` down instead of raising their known logits
    over a rising unknown one), except that ``g`` reads the features *with* gradient, so
    the unknown row still reshapes the layers below."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = int(getattr(self, UNKNOWN_ROW_ATTR))
        known = F.linear(x, self.weight[:k], self.bias[:k])
        g = F.linear(x, self.weight[k:], self.bias[k:])
        return torch.cat([known, torch.logsumexp(known, dim=-1, keepdim=True) + g], dim=-1)


@contextlib.contextmanager
def _factored(detached: bool) -> Iterator[None]:
    """K+1 heads built as compress's ``separate`` head (``detached``) or as
    :class:`FactoredHead`, from where the mean head was built (so the variant's runs keep
    ``unknown_head: mean``, like every other); BatchNorm recomputed as the product does
    (shuffled, with the rows)."""

    def build(layer: torch.nn.Linear) -> torch.nn.Linear:
        separate = separate_unknown_linear(layer)
        if detached:
            return separate
        new = FactoredHead(separate.in_features, separate.out_features,
                           device=layer.weight.device, dtype=layer.weight.dtype)  # fmt: skip
        new.load_state_dict(separate.state_dict())
        setattr(new, UNKNOWN_ROW_ATTR, getattr(separate, UNKNOWN_ROW_ATTR))
        return new

    with mock.patch.object(heads, "expanded_linear", build), \
            _recalibration(shuffled=True, mixed=True):  # fmt: skip
        yield


def _detach() -> contextlib.AbstractContextManager[None]:
    return without("gradient")


#: name -> (--unknowns, or "plain" for MOON off; extra MOON settings; patch)
VARIANTS: dict[str, tuple[str, dict[str, Any], Callable[[], Any]]] = {
    "hinge": ("blur+mixup", {}, _hinge),
    "beta03": ("blur+mixup", {}, lambda: _beta(0.3)),
    "beta0": ("blur+mixup", {}, lambda: _beta(0.0)),
    "kcol": ("blur+mixup", {}, lambda: _known_push(0.0)),
    "kpush2": ("blur+mixup", {}, lambda: _known_push(2.0)),
    "rowonly": ("blur+mixup", {}, _row_only),
    "oe": ("blur+mixup", {}, _outlier_exposure),
    "detach": ("blur+mixup", {}, _detach),
    "a0": ("blur+mixup", {"a_final": 0.0}, contextlib.nullcontext),
    "a0noavg": ("blur+mixup", {"a_final": 0.0, "average_epochs": 0}, contextlib.nullcontext),
    "late07": ("blur+mixup", {}, lambda: _late(0.7)),
    "vos": ("blur+mixup+vos", {}, contextlib.nullcontext),
    "mixmid": ("blur+mixup", {}, _mixmid),
    "bnmix": ("blur+mixup", {}, lambda: _recalibration(shuffled=False, mixed=True)),
    "idbn": ("blur+mixup", {}, lambda: patched("id_bn")),
    "avgall": ("blur+mixup", {"average_fraction": 1.0}, contextlib.nullcontext),
    "moon-avgall": ("none", {"average_fraction": 1.0}, contextlib.nullcontext),
    "shufbn-plain": ("plain", {}, lambda: _recalibration(shuffled=True, mixed=False)),
    "shufbn-none": ("none", {}, lambda: _recalibration(shuffled=True, mixed=False)),
    "shufbn-id": ("blur+mixup", {}, lambda: _recalibration(shuffled=True, mixed=False)),
    "shufbn-mix": ("blur+mixup", {}, lambda: _recalibration(shuffled=True, mixed=True)),
    "shufbn-factor": ("blur+mixup", {}, lambda: _factored(detached=False)),
    "shufbn-factord": ("blur+mixup", {}, lambda: _factored(detached=True)),
    "shufbn-noavg": (
        "blur+mixup",
        {"average_epochs": 0},
        lambda: _recalibration(shuffled=True, mixed=True),
    ),
    "shufbn-none-noavg": (
        "none",
        {"average_epochs": 0},
        lambda: _recalibration(shuffled=True, mixed=False),
    ),
}


#: how the table names each variant (the grid's own runs first)
LABELS = {
    "none": "MOON (`none`)",
    "blur+mixup": "**synth** (blur+mixup)",
    "hinge": "`hinge`: no loss once p(unknown) >= 0.5",
    "beta03": "`beta03`: backbone gets 0.3 of their gradient",
    "beta0": "`beta0`: backbone gets none of their gradient",
    "kcol": "`kcol`: their known logits detached",
    "kpush2": "`kpush2`: twice the gradient on their known logits",
    "rowonly": "`rowonly`: only the unknown row learns from them",
    "oe": "`oe`: their loss is outlier exposure's (uniform over the K known)",
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
    "shufbn-plain": "`shufbn-plain`: plain, BatchNorm recomputed on shuffled rows",
    "shufbn-none": "`shufbn-none`: MOON, BatchNorm recomputed on shuffled rows",
    "shufbn-id": "`shufbn-id`: BatchNorm recomputed on shuffled ID rows",
    "shufbn-mix": "`shufbn-mix`: BatchNorm recomputed on shuffled ID + synthesized rows",
    "shufbn-factor": "`shufbn-factor`: unknown logit = logsumexp(known) + its own row",
    "shufbn-factord": "`shufbn-factord`: the same, its row on detached features",
    "shufbn-noavg": "`shufbn-noavg`: synth without MOON's averaging phase",
    "shufbn-none-noavg": "`shufbn-none-noavg`: MOON without its averaging phase",
}


def _settings(
    archs: list[str], seeds: list[int], epochs: int, data: str = "mnist5k"
) -> Iterator[tuple]:
    """(grid, arch, seed, its trained dense setting) for the ``data`` grid at ``epochs``."""
    grid = Grid(**{**GRIDS[data].__dict__, "epochs": epochs})
    for arch in archs:
        for seed in seeds:
            yield grid, arch, seed, prepare(grid, ARCHS[arch], seed)


def run(variant: str, archs: list[str], seeds: list[int], epochs: int, data: str) -> None:
    unknowns, extra, patch = VARIANTS[variant]
    near = GRIDS[data].ood[0]
    with LOG.open("a") as log:
        for grid, arch, seed, setting in _settings(archs, seeds, epochs, data):
            for method in grid.methods:
                moon = {"enabled": unknowns != "plain", "warmup_epochs": max(1, epochs // 6),
                        "unknowns": "none" if unknowns == "plain" else unknowns,
                        "unknowns_weight": 0.1, "unknown_head": "mean", **extra}  # fmt: skip
                start = time.perf_counter()
                with storage_order(), patch():
                    row = run_one(grid, setting, seed, method, 0.95, moon)
                maha = row["report_scores"]["compressed"]["mahalanobis++"]
                rec = {"variant": variant, "data": data, "arch": arch, "seed": seed,
                       "method": method,
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
                        "unknowns_weight": 0.1, "unknown_head": "mean"}  # fmt: skip
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
        "| setting | variant | runs | MSP ID / near | max known logit ID / near | "
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


def _base_rows(epochs: int, data: str = "mnist5k") -> dict[tuple, dict[str, float]]:
    """(variant, arch, method, seed) -> the four numbers, from the grid's logs at 95%."""
    out: dict[tuple, dict[str, float]] = {}
    near = GRIDS[data].ood[0]
    for name in BASE[(data, epochs)]:
        for line in (ROOT / "storage-order" / name).read_text().splitlines():
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


def _delta_cells(pairs: list[tuple[dict[str, Any], dict[str, float]]]) -> str:
    """The table cells of (run, the run it is paired with) pairs: runs, Δ accuracy, runs
    within 0.5 point, the runs' MSP mean AUROC, Δ near-OOD MSP and mahalanobis++."""
    d = {k: [100 * (v[k] - p[k]) for v, p in pairs]
         for k in ("accuracy", "msp_near", "maha_near")}  # fmt: skip
    return (f"{len(pairs)} | {_mse(d['accuracy'])} | {sum(x >= -0.5 for x in d['accuracy'])} | "
            f"{100 * statistics.mean(v['msp_mean'] for v, _ in pairs):.1f} | "
            f"{_mse(d['msp_near'])} | {_mse(d['maha_near'])}")  # fmt: skip


def render() -> str:
    rows = [json.loads(line) for line in LOG.read_text().splitlines()] if LOG.exists() else []
    lines = [
        "## What costs accuracy when synthesized unknowns train a 95%-sparse network (issue 18)",
        "",
        "Command: `python benchmarks/unknowns_ablation.py --variant V [--epochs 30]` "
        "(module docstring: each variant is one hypothesis). mnist5k 0-5 at 95% sparsity, "
        "cnn and resnet8, RigL/SET/GMP, seeds 0-2; Δ = run - plain run of the same seed "
        "(points, mean ± standard error over the runs); MSP = mean AUROC over the six OOD "
        "sets; near = the ID set's held-out digits 6-9 (rows `digits, 10`: digits 0-5 as ID, "
        "`--data digits`).",
        "",
        "| epochs | variant | runs | Δ accuracy | runs within 0.5 | MSP | Δ near-OOD MSP | "
        "Δ near-OOD mahalanobis++ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    settings = {(r.get("data", "mnist5k"), r["epochs"]) for r in rows} | {("mnist5k", 10)}
    for data, epochs in sorted(settings, key=lambda s: (s[0] != "mnist5k", s)):
        base = _base_rows(epochs, data)
        runs: dict[str, list[dict[str, float]]] = {}
        for (variant, arch, method, seed), v in base.items():
            if variant != "plain":
                runs.setdefault(variant, []).append({**v, "key": (arch, method, seed)})
        latest = {(r["variant"], r["arch"], r["method"], r["seed"]): r for r in rows
                  if r["epochs"] == epochs and r.get("data", "mnist5k") == data}  # fmt: skip
        for (variant, *key), r in latest.items():
            runs.setdefault(variant, []).append({**r, "key": tuple(key)})
        for variant, vs in runs.items():
            if variant.startswith("shufbn-") and variant != "shufbn-plain":
                continue  # against shufbn-plain, in shuffled_lines
            pairs = [(v, base[("plain", *v["key"])]) for v in vs if ("plain", *v["key"]) in base]
            name = LABELS.get(variant, variant)
            where = str(epochs) if data == "mnist5k" else f"{data}, {epochs}"
            lines.append(f"| {where} | {name} | {_delta_cells(pairs)} |")
    return "\n".join(lines + shuffled_lines(rows) + noavg_lines(rows) + probe_lines()) + "\n"


def shuffled_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The ``shufbn-*`` runs against ``shufbn-plain``: every side recalibrated on shuffled
    rows (the table above pairs them with the grid's plain, recalibrated in storage
    order)."""
    shuffled = [r for r in rows if r["epochs"] == 10 and r.get("data", "mnist5k") == "mnist5k"
                and r["variant"].startswith("shufbn-")]  # fmt: skip
    latest = {(r["variant"], r["arch"], r["method"], r["seed"]): r for r in shuffled}
    if not any(key[0] == "shufbn-plain" for key in latest):
        return []
    lines = [
        "",
        "### BatchNorm recomputed on shuffled rows, on every side (10 epochs)",
        "",
        "Each `shufbn-*` run against the `shufbn-plain` run of the same cell and seed (Δ "
        "points, mean ± standard error).",
        "",
        "| variant | runs | Δ accuracy | runs within 0.5 | MSP | Δ near-OOD MSP | "
        "Δ near-OOD mahalanobis++ |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in (
        "shufbn-none",
        "shufbn-id",
        "shufbn-mix",
        "shufbn-factor",
        "shufbn-factord",
    ):
        pairs = [(r, latest[("shufbn-plain", *key[1:])]) for key, r in latest.items()
                 if key[0] == variant and ("shufbn-plain", *key[1:]) in latest]  # fmt: skip
        if not pairs:
            continue
        lines.append(f"| {LABELS[variant]} | {_delta_cells(pairs)} |")
    return lines


NOAVG_GRID = ROOT / "reliability-full-0.95-e30-unknowns-blur_mixup-w0.1.jsonl"


def noavg_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The ``*-noavg`` runs (30 epochs) against the 30-epoch grid's product runs of the
    same cell and seed: plain, MOON and ``synth`` (compress's BatchNorm recalibration)."""
    runs = {(r["variant"], r["arch"], r["method"], r["seed"]): r for r in rows
            if r["epochs"] == 30 and r["variant"].endswith("-noavg")}  # fmt: skip
    if not runs or not NOAVG_GRID.exists():
        return []
    near = FULL.ood[0]
    grid: dict[tuple, dict[str, float]] = {}
    for line in NOAVG_GRID.read_text().splitlines():
        r = json.loads(line)
        variant = "plain" if not r["moon"] else r["unknowns"]
        maha = r["report_scores"]["compressed"]["mahalanobis++"][near]["auroc"]
        grid[(variant, r["arch"], r["method"], r["seed"])] = {
            "accuracy": r["compressed"]["accuracy"], "msp_mean": score_mean(r, "msp"),
            "msp_near": score_mean(r, "msp", (near,)), "maha_near": maha}  # fmt: skip
    lines = [
        "",
        "### Without MOON's averaging phase (30 epochs)",
        "",
        "Each run against the run of the same cell and seed in "
        f"`{NOAVG_GRID.name}` (the product's; Δ points, mean ± standard error).",
        "",
        "| variant | against | runs | Δ accuracy | runs within 0.5 | MSP | Δ near-OOD MSP | "
        "Δ near-OOD mahalanobis++ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    against = {"shufbn-none-noavg": ("plain", "none"),
               "shufbn-noavg": ("plain", "none", "blur+mixup")}  # fmt: skip
    for variant, others in against.items():
        for other in others:
            pairs = [(r, grid[(other, *key[1:])]) for key, r in runs.items()
                     if key[0] == variant and (other, *key[1:]) in grid]  # fmt: skip
            if not pairs:
                continue
            lines.append(f"| {LABELS[variant]} | {LABELS.get(other, other)} | "
                         f"{_delta_cells(pairs)} |")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS))
    parser.add_argument("--archs", nargs="+", default=sorted(ARCHS), choices=sorted(ARCHS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10, choices=sorted({e for _, e in BASE}))
    parser.add_argument("--data", default="mnist5k", choices=sorted(GRIDS),
                        help="the ID set (digits: 10 epochs only)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument(
        "--probe",
        action="store_true",
        help="mean scores of ID and near-OOD rows (plain, MOON, synth)",
    )
    args = parser.parse_args()
    if (args.data, args.epochs) not in BASE or (args.probe and args.data != "mnist5k"):
        parser.error(f"--data {args.data} runs at 10 epochs and without --probe")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.probe:
        probe(args.archs, args.seeds, args.epochs)
    elif not args.render_only:
        if args.variant is None:
            parser.error("--variant is required unless --render-only")
        run(args.variant, args.archs, args.seeds, args.epochs, args.data)
    text = render()
    print(text)
    update_section("unknowns-ablation", text)


if __name__ == "__main__":
    main()
