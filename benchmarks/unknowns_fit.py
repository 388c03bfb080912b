"""Why synthesized unknowns cost accuracy on mnist5k (issue 18): a fit diagnosis.

    python benchmarks/unknowns_fit.py                 # every cell, one after another
    python benchmarks/unknowns_fit.py --cells 0       # one cell (run cells in parallel,
    python benchmarks/unknowns_fit.py --render-only   # then render from their logs)

The unknowns grids (RESULTS.md) show MOON + ``blur`` losing 3-15 accuracy points on
mnist5k 0-5 in some cells (GMP and RigL at 95%), where digits loses little. Each CELL is
one such (architecture, method, sparsity, seed) of ``benchmarks/reliability.py``'s mnist5k
grid (same dense model, same compress settings), fine-tuned as:

- ``plain``, ``MOON`` (``--unknowns none``), ``MOON+blur`` (compress's settings);
- ``blur, lr/2``: the same at half the base lr (is the step too large?);
- ``blur, weight 0.1``: the synthesized rows' loss weight 0.1 instead of 0.5;
- ``blur, ID-stat BN``: every BatchNorm layer normalises the batch, synthesized rows
  included, with the statistics of the ID rows alone, and its running statistics follow
  the ID rows alone (do the synthesized rows shift the normalisation?);
- ``blur, head only``: the synthesized rows' gradient stops at the classifier's input
  (with ID-stat BN): the backbone learns from the ID rows alone (do they take the
  backbone's capacity?);
- ``plain``, ``MOON`` and ``MOON+blur`` at 30 epochs (compress's default length).

The last two variants change moonprune's training step from outside (a patch of
:class:`moonprune.unknown_forward.SynthesizedUnknowns`, here only), to test a cause; they
are not options of the product. Reported per run: test accuracy (as compress reports
it), accuracy on the training rows (un-augmented, known-class argmax: the fit), MSP's
mean AUROC over the grid's OOD sets and over its two held-out digit sets (mnist5k 6-9,
digits 6-9), seconds (three cells ran at once on 2 cores: not a timing).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from reliability import ARCHS, FULL, ROOT, Grid, compress_config, every_score, prepare
from results_file import update_section  # benchmarks/ is on sys.path when run as a script

from moonprune import unknown_forward
from moonprune.checkpoints import DenseModel
from moonprune.conventions import has_unknown_output
from moonprune.pipeline import compress
from moonprune.reliability.metrics import accuracy
from moonprune.unknowns import unknown_head

#: (arch, method, sparsity, seed): cells of the mnist5k unknowns grid where blur lost most
CELLS = (("cnn", "rigl", 0.95, 1), ("cnn", "gmp", 0.95, 0), ("resnet8", "gmp", 0.95, 1))
#: name -> (epochs, MOON on, --unknowns, moon overrides, train overrides, patch)
VARIANTS: dict[str, tuple[int, bool, str, dict[str, Any], dict[str, Any], str]] = {
    "plain": (10, False, "none", {}, {}, ""),
    "MOON": (10, True, "none", {}, {}, ""),
    "MOON+blur": (10, True, "blur", {}, {}, ""),
    "blur, lr/2": (10, True, "blur", {}, {"lr": 0.025}, ""),
    "blur, weight 0.1": (10, True, "blur", {"unknowns_weight": 0.1}, {}, ""),
    "blur, ID-stat BN": (10, True, "blur", {}, {}, "id_bn"),
    "blur, head only": (10, True, "blur", {}, {}, "id_bn+head"),
    "plain, 30 ep": (30, False, "none", {}, {}, ""),
    "MOON, 30 ep": (30, True, "none", {}, {}, ""),
    "MOON+blur, 30 ep": (30, True, "blur", {}, {}, ""),
}
LOG = ROOT / "benchmarks" / "unknowns-fit-{}.jsonl"


@contextlib.contextmanager
def id_stat_batchnorm(model: torch.nn.Module, n: int) -> Iterator[None]:
    """BatchNorm in training mode: every row normalised with the first ``n`` rows'
    statistics (biased variance, with gradient), running statistics from them alone."""
    saved = []
    for bn in model.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm) and bn.training:

            def forward(x: torch.Tensor, bn: Any = bn) -> torch.Tensor:
                dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
                rows = x[:n]
                mean, var = rows.mean(dims), rows.var(dims, unbiased=False)
                count = rows.numel() / rows.shape[1]
                with torch.no_grad():
                    bn.running_mean.lerp_(mean, bn.momentum)
                    bn.running_var.lerp_(var * count / max(count - 1, 1), bn.momentum)
                    bn.num_batches_tracked += 1
                y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
                return y * bn.weight.view(shape) + bn.bias.view(shape)

            saved.append((bn, bn.forward))
            bn.forward = forward
    try:
        yield
    finally:
        for bn, original in saved:
            bn.forward = original


ORIGINAL = unknown_forward.SynthesizedUnknowns._forward_with_unknowns


@contextlib.contextmanager
def patched(patch: str) -> Iterator[None]:
    """The training step with ``patch`` (``id_bn``, ``id_bn+head``) applied, or as is."""

    def step(self: Any, x: torch.Tensor, y: torch.Tensor, n_global: int, draws: Any) -> Any:
        n = len(y)
        with contextlib.ExitStack() as stack:
            stack.enter_context(id_stat_batchnorm(self.model, n))
            if "head" in patch:  # the synthesized rows' features, detached at the classifier
                hook = unknown_head(self.model).register_forward_pre_hook(
                    lambda _m, args: (torch.cat([args[0][:n], args[0][n:].detach()]),)
                    if len(args[0]) > n else None
                )  # fmt: skip
                stack.callback(hook.remove)
            return ORIGINAL(self, x, y, n_global, draws)

    unknown_forward.SynthesizedUnknowns._forward_with_unknowns = step if patch else ORIGINAL
    try:
        yield
    finally:
        unknown_forward.SynthesizedUnknowns._forward_with_unknowns = ORIGINAL


def known_accuracy(model: torch.nn.Module, split: Any, k: int) -> float:
    """Accuracy over the ``k`` known columns (a plain model has no unknown column)."""
    with torch.no_grad():
        logits = model.eval()(split.x)
    known = logits[:, :k] if has_unknown_output(logits, k) else logits
    return accuracy(known.argmax(1).numpy(), split.y.numpy())


def run(grid: Grid, setting: Any, cell: tuple[str, str, float, int], name: str) -> dict:
    epochs, moon_on, unknowns, moon_extra, train_extra, patch = VARIANTS[name]
    _, method, sparsity, seed = cell
    fraction = {"unknowns_fraction": 0.125} if unknowns != "none" else {}
    moon = {"enabled": moon_on, "warmup_epochs": max(1, epochs // 6), "unknowns": unknowns,
            "unknown_head": "mean", **fraction, **moon_extra}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, patched(patch):
        cfg = compress_config(dataclasses.replace(grid, epochs=epochs), setting.spec, seed,
                              Path(tmp) / "out", moon, method, sparsity, train_extra)  # fmt: skip
        start = time.perf_counter()
        result = compress(cfg, dense=DenseModel(copy.deepcopy(setting.dense), setting.spec))
        seconds = time.perf_counter() - start
    model, k = result.checkpoint.model, setting.splits.num_classes
    msp = every_score(model, setting.splits, setting.ood)["msp"]
    return {
        "cell": list(cell), "variant": name, "seconds": seconds,
        "accuracy": result.report.models["compressed"]["accuracy"],
        "test_accuracy_here": known_accuracy(model, setting.splits.test, k),
        "train_accuracy": known_accuracy(model, setting.splits.train, k),
        "msp_mean": float(np.mean(list(msp.values()))),
        "msp_near": float(np.mean([v for name, v in msp.items() if name.endswith("6-9")])),
    }  # fmt: skip


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "## Why synthesized unknowns cost accuracy on mnist5k (issue 18)",
        "",
        "Command: `python benchmarks/unknowns_fit.py` (cells run in parallel with `--cells`, "
        "1 torch thread each, then `--render-only`). Module docstring: the variants. "
        "Accuracy on the test split (as compress reports it) and on the training rows "
        "(the fit); MSP mean AUROC over the grid's OOD sets and over its held-out digits "
        "(mnist5k 6-9 and digits 6-9); all in %. s: three cells shared 2 cores.",
        "",
        "| cell (arch, method, sparsity, seed) | variant | test accuracy | training-row "
        "accuracy | MSP mean AUROC | MSP held-out digits | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in CELLS:
        for r in (r for r in rows if tuple(r["cell"]) == cell):
            lines.append(
                f"| {cell[0]} {cell[1]} {cell[2]:.0%} seed {cell[3]} | {r['variant']} | "
                f"{100 * r['accuracy']:.1f} | {100 * r['train_accuracy']:.1f} | "
                f"{100 * r['msp_mean']:.1f} | {100 * r['msp_near']:.1f} | {r['seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", help="indices into CELLS (default all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--render-only", action="store_true", help="render from the logs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    indices = args.cells if args.cells is not None else range(len(CELLS))
    for i in [] if args.render_only else indices:
        arch, _, _, seed = CELLS[i]
        grid = dataclasses.replace(FULL, archs={arch: ARCHS[arch]})
        setting = prepare(grid, ARCHS[arch], seed)
        with open(str(LOG).format(i), "w") as log:
            for name in VARIANTS:
                row = run(grid, setting, CELLS[i], name)
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(json.dumps(row), flush=True)
    rows = [json.loads(line) for i in range(len(CELLS)) if Path(str(LOG).format(i)).exists()
            for line in Path(str(LOG).format(i)).read_text().splitlines()]  # fmt: skip
    text = render(rows)
    update_section("unknowns-fit", text)
    print(text)


if __name__ == "__main__":
    main()
