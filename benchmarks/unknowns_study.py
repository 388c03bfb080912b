"""Which synthesized unknowns help, and why (issue 18): a small generator-selection study.

    python benchmarks/unknowns_study.py                      # digits + mnist5k, both archs
    python benchmarks/unknowns_study.py --data digits --seeds 0 --variants plain none vos

For each ID set (classes 0-5), architecture (cnn = demo_cnn with BatchNorm and global
average pooling, resnet8) and seed, the dense model is trained as
benchmarks/reliability.py does, then fine-tuned with ``moonprune.compress`` (RigL 90%,
10 epochs, defaults otherwise) as: plain (K-way, CE), MOON ``--unknowns none`` and MOON
with each generator alone. Reported: accuracy, AUROC of every score (T = 1; near =
held-out classes of the ID set, far = textures, photos, faces), p(unknown) on ID test
rows, held-out classes and the variant's own synthesized rows, the share of ID test rows
whose argmax is "unknown", and s / epoch.

Two diagnostics on the *dense* model, per generator, test why a generator can hurt:
``sep`` = AUROC of the Mahalanobis score separating ID test rows from the generator's
rows (50 = the synthesized rows look like ID data in the classifier's input space, so
labelling them "unknown" fights the ID labels); ``bn`` = relative change of the ID rows'
classifier inputs in training mode when a quarter of the batch is synthesized rows
(how far they move BatchNorm's batch statistics). Rows are appended to
``benchmarks/unknowns-study.jsonl``; the table is rendered from all rows there.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from reliability import ARCHS, DIGITS, FAR, FULL, Grid, every_score, prepare
from results_file import update_section

from moonprune.checkpoints import DenseModel
from moonprune.config import build_config
from moonprune.pipeline import compress
from moonprune.reliability import auroc
from moonprune.reliability.features import collect_features, fit_feature_stats, mahalanobis
from moonprune.unknowns import UNKNOWNS, probe, synthesize

ROOT = Path(__file__).parents[1]
LOG = ROOT / "benchmarks" / "unknowns-study.jsonl"
VARIANTS = ("plain", "none", *UNKNOWNS.names())
GRIDS = {"digits": DIGITS, "mnist5k": FULL}


def diagnose(setting: Any, grid: Grid, seed: int) -> dict[str, dict[str, float]]:
    """``sep`` and ``bn`` (module docstring) of every generator on the dense model."""
    model = setting.dense.eval()
    layer = "classifier" if hasattr(model, "classifier") else "fc"
    _, f_train = collect_features(model, setting.splits.train.x, layer)
    k = setting.splits.num_classes
    stats = fit_feature_stats(f_train, setting.splits.train.y, k)
    x, y = setting.splits.test.x, setting.splits.test.y
    _, f_id = collect_features(model, x, layer)
    id_score = mahalanobis(f_id, stats.means, stats.whitening).double().numpy()
    out: dict[str, dict[str, float]] = {}
    for name in UNKNOWNS.names():
        gen, g = UNKNOWNS.get(name), torch.Generator().manual_seed(seed)
        batches = list(zip(x.split(64), y.split(64), f_id.split(64), strict=True))
        if gen.space == "input":
            rows = torch.cat([gen.fn(xb, yb, len(xb), g) for xb, yb, _ in batches])
            _, f_syn = collect_features(model, rows, layer)
        else:
            f_syn = torch.cat([gen.fn(fb, yb, len(fb), g) for _, yb, fb in batches])
        syn = mahalanobis(f_syn, stats.means, stats.whitening).double().numpy()
        out[name] = {"sep": float(auroc(id_score, syn)), "bn": _bn_shift(model, layer, x, y, name)}
    del grid
    return out


def _bn_shift(model: torch.nn.Module, head_name: str, x: torch.Tensor,
              y: torch.Tensor, name: str) -> float:  # fmt: skip
    """||f(ID | ID + synth) - f(ID | ID)|| / ||f(ID | ID)||, training-mode BatchNorm."""
    if UNKNOWNS.get(name).space != "input":
        return 0.0
    xb, yb = x[:64], y[:64]
    syn = synthesize((name,), xb, yb, 16, torch.Generator().manual_seed(0), "input")
    model = copy.deepcopy(model).train()
    seen: list[torch.Tensor] = []
    layer = model.get_submodule(head_name)
    handle = layer.register_forward_pre_hook(lambda _m, a: seen.append(a[0].flatten(1)))
    with torch.no_grad():
        model(xb)
        model(torch.cat([xb, syn]))
    handle.remove()
    clean, mixed = seen[0], seen[1][: len(xb)]
    return float((mixed - clean).norm() / clean.norm().clamp_min(1e-12))


def run_variant(grid: Grid, setting: Any, seed: int, variant: str) -> dict[str, Any]:
    moon: dict[str, Any] = {"warmup_epochs": max(1, grid.epochs // 6)}
    if variant == "plain":
        moon["enabled"] = False
    elif variant != "none":
        moon["unknowns"] = variant
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config({
            "checkpoint": "", "data": grid.data, "ood": list(grid.ood),
            "out": str(Path(tmp) / "out"), "arch": setting.spec.factory,
            "arch_kwargs": setting.spec.kwargs, "export": False,
            "train": {"epochs": grid.epochs, "seed": seed}, "moon": moon,
            "sparsity": {"method": "rigl", "sparsity": 0.9},
        })  # fmt: skip
        start = time.perf_counter()
        result = compress(cfg, dense=DenseModel(copy.deepcopy(setting.dense), setting.spec))
        seconds = time.perf_counter() - start
    rep, model = result.report, result.checkpoint.model.eval()
    row: dict[str, Any] = {
        "accuracy": rep.models["compressed"]["accuracy"],
        "scores": every_score(model, setting.splits, setting.ood),
        "features": {s: {n: v["auroc"] for n, v in t.items()}
                     for s, t in rep.scores["compressed"].items()
                     if s in ("mahalanobis", "mahalanobis++", "knn")},
        "p_unknown": rep.models["compressed"].get("p_unknown"),
        "epoch_s": rep.timing.epoch_s_mean, "seconds": seconds,
        "unknown_rate": [h.unknown_rate for h in rep.history],
    }  # fmt: skip
    if variant != "plain":
        x, y = setting.splits.test.x, setting.splits.test.y
        with torch.no_grad():
            row["id_argmax_unknown"] = float((model(x).argmax(-1) == y.new_tensor(
                setting.splits.num_classes)).float().mean())  # fmt: skip
        synth = probe(model, x, y, tuple(UNKNOWNS.names()), seed)
        row["p_unknown_synth"] = {n: float(v.mean()) for n, v in synth.items()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    if not args.render_only:
        with open(LOG, "a") as log:
            for data in args.data:
                grid = GRIDS[data]
                for arch in args.archs:
                    for seed in args.seeds:
                        setting = prepare(grid, ARCHS[arch], seed)
                        diag = diagnose(setting, grid, seed)
                        for variant in args.variants:
                            row = {"data": data, "arch": arch, "seed": seed, "variant": variant,
                                   "near": grid.ood[0], "diag": diag,
                                   **run_variant(grid, setting, seed, variant)}  # fmt: skip
                            log.write(json.dumps(row) + "\n")
                            log.flush()
                            print(summary_line(row), flush=True)
    rows = [json.loads(line) for line in LOG.read_text().splitlines() if line.strip()]
    text = render(rows, time.perf_counter() - start, args)
    update_section("unknowns-study", text)
    print(text)


def _mean(values: dict[str, float], names: tuple[str, ...] | None = None) -> float:
    return float(np.mean([values[n] for n in (names or tuple(values))]))


def summary_line(row: dict[str, Any]) -> str:
    return (f"{row['data']} {row['arch']} seed {row['seed']} {row['variant']}: acc "
            f"{100 * row['accuracy']:.2f} maha {100 * _mean(row['features']['mahalanobis']):.2f} "
            f"msp {100 * _mean(row['scores']['msp']):.2f} unknown "
            f"{100 * _mean(row['scores']['unknown']):.2f} ({row['seconds']:.0f}s)")  # fmt: skip


def _cell(values: list[float], scale: float = 100, digits: int = 1) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def render(rows: list[dict[str, Any]], seconds: float, args: Any) -> str:
    far = FAR
    lines = [
        "## Synthesized unknowns: generator selection (issue 18)",
        "",
        "Command: `python benchmarks/unknowns_study.py` (rows accumulate in "
        "benchmarks/unknowns-study.jsonl)  ",
        f"Machine: {platform.platform()}, 2 torch threads, shared with other jobs; this "
        f"invocation {seconds / 60:.1f} min. RigL 90%, 10 epochs, defaults otherwise "
        "(lr 0.05, unknowns fraction 0.25, weight 0.5); AUROC in % at T = 1, mean ± std "
        "over seeds; near = held-out classes 6-9 of the ID set; far = textures, photos, "
        "faces; 'unknown' = 1 - p(unknown). p(u) = mean p(unknown). sep / bn: the dense-"
        "model diagnostics of the module docstring (sep 50 = synthesized rows look like ID).",
        "",
        "| ID | arch | variant | seeds | accuracy | mahalanobis mean / near | "
        "mahalanobis++ mean / near | knn mean / near | "
        "msp mean / near / far | unknown mean / near / far | energy mean | p(u) ID / near / "
        "own synth | ID argmax unknown % | sep | bn | s / epoch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["data"], r["arch"]) for r in rows})
    for data, arch in keys:
        for variant in _variants(rows):
            sel = [r for r in rows if (r["data"], r["arch"], r["variant"]) == (data, arch, variant)]
            if not sel:
                continue
            near = (sel[0]["near"],)

            def sc(score: str, names: tuple[str, ...] | None, s: list = sel) -> list[float]:
                return [_mean(r["scores"][score], names) for r in s]

            def ft(score: str, names: tuple[str, ...] | None, s: list = sel) -> list[float]:
                return [_mean(r["features"][score], names) for r in s if score in r["features"]]

            pu = [r["p_unknown"] for r in sel if r.get("p_unknown")]
            own = [r["p_unknown_synth"][variant] for r in sel
                   if variant in r.get("p_unknown_synth", {})]  # fmt: skip
            pu_text = (f"{statistics.mean(p['id_test']['mean'] for p in pu):.2g} / "
                       f"{statistics.mean(p[near[0]]['mean'] for p in pu):.2g} / "
                       f"{statistics.mean(own):.2g}" if pu and own else
                       f"{statistics.mean(p['id_test']['mean'] for p in pu):.2g} / "
                       f"{statistics.mean(p[near[0]]['mean'] for p in pu):.2g} / -"
                       if pu else "-")  # fmt: skip
            diag = [r["diag"].get(variant) for r in sel]
            sep = _cell([d["sep"] for d in diag if d]) if all(diag) else "-"
            bn = _cell([d["bn"] for d in diag if d], 1, 3) if all(diag) else "-"
            rate = [r["id_argmax_unknown"] for r in sel if "id_argmax_unknown" in r]
            lines.append(
                f"| {data} | {arch} | {variant} | {len(sel)} | "
                f"{_cell([r['accuracy'] for r in sel], digits=2)} | "
                f"{_cell(ft('mahalanobis', None))} / {_cell(ft('mahalanobis', near))} | "
                f"{_cell(ft('mahalanobis++', None))} / {_cell(ft('mahalanobis++', near))} | "
                f"{_cell(ft('knn', None))} / {_cell(ft('knn', near))} | "
                f"{_cell(sc('msp', None))} / {_cell(sc('msp', near))} / {_cell(sc('msp', far))} | "
                f"{_cell(sc('unknown', None))} / {_cell(sc('unknown', near))} / "
                f"{_cell(sc('unknown', far))} | {_cell(sc('energy', None))} | {pu_text} | "
                f"{_cell(rate, digits=2)} | {sep} | {bn} | "
                f"{statistics.median(r['epoch_s'] for r in sel):.3f} |"
            )
    lines += ["", *overall(rows), ""]
    del args
    return "\n".join(lines)


def _variants(rows: list[dict[str, Any]]) -> list[str]:
    """The fixed order, then any combination (``blur+lowfreq``) that has rows."""
    extra = sorted({r["variant"] for r in rows} - set(VARIANTS))
    return [*VARIANTS, *extra]


def overall(rows: list[dict[str, Any]]) -> list[str]:
    """Each variant averaged over every (ID, arch, seed) it ran on, vs plain and none."""
    lines = [
        "### Averaged over settings (Δ vs plain, points; mean over the (ID, arch, seed) "
        "runs each variant has)",
        "",
        "| variant | runs | Δ accuracy | Δ mahalanobis mean | Δ mahalanobis near | "
        "Δ msp mean | Δ msp near | unknown mean | s / epoch ÷ plain's |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["data"], r["arch"], r["seed"]): r for r in rows if r["variant"] == "plain"}
    for variant in _variants(rows):
        pairs = [(base[k], r) for r in rows if r["variant"] == variant
                 and (k := (r["data"], r["arch"], r["seed"])) in base]  # fmt: skip
        if not pairs:
            continue

        def d(f: Any, ps: list = pairs) -> str:
            return f"{100 * statistics.mean(f(r) - f(p) for p, r in ps):+.2f}"

        def near(r: dict[str, Any]) -> tuple[str, ...]:
            return (r["near"],)

        lines.append(
            f"| {variant} | {len(pairs)} | {d(lambda r: r['accuracy'])} | "
            f"{d(lambda r: _mean(r['features']['mahalanobis']))} | "
            f"{d(lambda r: _mean(r['features']['mahalanobis'], near(r)))} | "
            f"{d(lambda r: _mean(r['scores']['msp']))} | "
            f"{d(lambda r: _mean(r['scores']['msp'], near(r)))} | "
            f"{100 * statistics.mean(_mean(r['scores']['unknown']) for _, r in pairs):.1f} | "
            f"{statistics.mean(r['epoch_s'] / p['epoch_s'] for p, r in pairs):.2f} |"
        )
    return lines


if __name__ == "__main__":
    main()
