"""``report.html``: one self-contained page (PNG plots embedded) explaining the numbers.

Plots: ROC curve per OOD set (dense vs compressed), score histograms of ID vs each
OOD set with the threshold, a reliability diagram (calibration), and per-layer
sparsity. matplotlib is imported lazily (Agg backend, no display needed).
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moonprune.assessment import Assessment
from moonprune.config import MoonConfig
from moonprune.conventions import UNKNOWN_ROW_ATTR, prunable_weights
from moonprune.data import ImageSet
from moonprune.heads import head_kind
from moonprune.outputs import atomic_path
from moonprune.reliability.evaluation import reliability_diagram
from moonprune.report_parts import UnknownsRecord
from moonprune.report_records import Report, RunReport
from moonprune.streaming import batch_rows
from moonprune.unknowns import NONE, UNKNOWNS, probe

#: Validation rows whose argmax is "unknown" above this share: a warning (the guard).
UNKNOWN_RATE_WARNING = 0.01
#: Validation rows the report synthesizes unknowns from (one forward pass, in memory).
PROBE_ROWS = 1024


def structure_phrase(structure: dict[str, Any]) -> str:
    """``"48.9% of the dense MACs, 51.2% of its parameters"`` for a channel-pruned model."""
    return (
        f"{100 * float(structure['macs_fraction']):.1f}% of the dense MACs, "
        f"{100 * float(structure['params_fraction']):.1f}% of its parameters"
    )


def _size_phrase(report: Report) -> str:
    """How much was removed: MACs and parameters for channel runs, else zeros."""
    if report.structure:
        return structure_phrase(report.structure)
    target = report.target_sparsity
    phrase = f"sparsity {100 * report.sparsity:.2f}%"
    return phrase + (f" (target {100 * target:.0f}%)" if target is not None else "")


def unknowns_summary(
    model: nn.Module, val: ImageSet, moon: MoonConfig, seed: int
) -> tuple[UnknownsRecord, dict[str, np.ndarray]]:
    """report.json's ``unknowns`` record and p(unknown) on the synthesized rows.

    The record: the setting (``none`` is MOON as published; anything else goes beyond
    the paper), the generators, fraction and weight, the share of ID validation rows
    whose argmax is "unknown" (the guard: a warning above 1%, in ``warnings``), and the
    mean p(unknown) of each generator's rows made from the validation set; also the
    kind of K+1 head (``mean`` or ``separate``).
    """
    spec = moon.unknowns if moon.enabled else NONE
    names = UNKNOWNS.resolve(spec)
    record = UnknownsRecord(
        setting=spec, generators=list(names), beyond_paper=bool(names),
        fraction=moon.unknowns_fraction if names else None,
        weight=moon.unknowns_weight if names else None,
        val_unknown_rate=None, p_unknown_synth={}, warnings=[],
    )  # fmt: skip
    heads = [m for m in model.modules() if isinstance(getattr(m, UNKNOWN_ROW_ATTR, None), int)]
    if heads:
        record = replace(record, head=head_kind(heads[0]))
    if not heads or len(val) == 0:
        return record, {}
    k = int(getattr(heads[0], UNKNOWN_ROW_ATTR))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        predicted = torch.cat(
            [model(b.to(device)).argmax(-1).cpu() for b in val.x.split(batch_rows(val.x.shape))]
        )
    model.train(was_training)
    rate = float((predicted == k).double().mean())
    warnings = []
    if rate > UNKNOWN_RATE_WARNING:
        warnings.append(
            f"the model puts {100 * rate:.1f}% of the ID validation rows into 'unknown' "
            "(argmax): the synthesized unknowns may look like ID data; try --unknowns none "
            "or a lower --unknowns-weight"
        )
    # p(unknown) of rows synthesized from (at most PROBE_ROWS) validation rows
    rows = batch_rows(val.x.shape, PROBE_ROWS)
    x, y = val.x[:rows], val.y[:rows]
    synth = {f"synth: {n}": v.numpy() for n, v in probe(model, x, y, names, seed).items()}
    p_synth = {n: float(v.mean()) for n, v in synth.items()}
    return replace(record, val_unknown_rate=rate, p_unknown_synth=p_synth, warnings=warnings), synth


def roc_curve(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) points, ID positive, accepting ``score >= t`` as t falls."""
    scores = np.concatenate([id_scores, ood_scores])
    is_id = np.concatenate([np.ones(len(id_scores)), np.zeros(len(ood_scores))])
    order = np.argsort(-scores, kind="mergesort")
    scores, is_id = scores[order], is_id[order]
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]
    tp = np.cumsum(is_id)[last_of_tie]
    fp = np.cumsum(1 - is_id)[last_of_tie]
    return np.r_[0.0, fp / len(ood_scores)], np.r_[0.0, tp / len(id_scores)]


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of zeros per prunable weight."""
    return {name: float((w == 0).float().mean()) for name, w in prunable_weights(model)}


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figures(
    models: dict[str, Assessment],
    sparsity: dict[str, dict[str, float]],
    synthesized: dict[str, np.ndarray],
) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures: list[tuple[str, str]] = []
    ood_names = [k for k in next(iter(models.values())).scores if not k.startswith("id_")]
    for name in ood_names:
        fig, ax = plt.subplots(figsize=(4.5, 4))
        for label, a in models.items():
            fpr, tpr = roc_curve(a.scores["id_test"], a.scores[name])
            auc = a.metrics["ood"][name]["auroc"]
            ax.plot(fpr, tpr, label=f"{label} (AUROC {100 * auc:.1f})")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(xlabel="OOD accepted (FPR)", ylabel="ID accepted (TPR)", title=f"ROC vs {name}")
        ax.legend(loc="lower right")
        figures.append((f"ROC vs {name}", _png(fig)))
    for label, a in models.items() if ood_names else ():
        fig, axes = plt.subplots(
            1, len(ood_names), figsize=(4.5 * len(ood_names), 3.2), squeeze=False
        )
        for ax, name in zip(axes[0], ood_names, strict=True):
            lo = min(a.scores["id_test"].min(), a.scores[name].min())
            hi = max(a.scores["id_test"].max(), a.scores[name].max())
            bins = np.linspace(lo, hi, 40)
            ax.hist(a.scores["id_test"], bins=bins, alpha=0.6, density=True, label="ID test")
            ax.hist(a.scores[name], bins=bins, alpha=0.6, density=True, label=name)
            ax.axvline(a.threshold, color="k", linestyle="--", label="threshold")
            ax.set(title=f"{label}: scores, ID vs {name}", xlabel="score (higher = ID)")
            ax.legend(fontsize=8)
        figures.append((f"{label}: score histograms", _png(fig)))
    for label, a in models.items():
        if a.p_unknown:
            fig, ax = plt.subplots(figsize=(5.5, 3.2))
            edges_u = [i / 40 for i in range(41)]
            # the synthesized rows belong to the fine-tuned (compressed) model
            extra = synthesized if label == "compressed" else {}
            for name, values in {**a.p_unknown, **extra}.items():
                ax.hist(values, bins=edges_u, alpha=0.5, density=True,
                        label=f"{'ID test' if name == 'id_test' else name}")  # fmt: skip
            ax.set(title=f"{label}: p(unknown)", xlabel="p(unknown)", yscale="log")
            ax.legend(fontsize=8)
            figures.append((f"{label}: p(unknown) per set", _png(fig)))
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for label, a in models.items():
        points = reliability_diagram(a.id_confidence, a.id_correct, a.ece_bins)
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-",
                label=f"{label} (ECE {100 * a.metrics['ece']:.2f}%)")  # fmt: skip
    bins_used = "/".join(str(b) for b in sorted({a.ece_bins for a in models.values()}))
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="confidence", ylabel="accuracy",
           title=f"reliability diagram ({bins_used} bins, as the ECE)")  # fmt: skip
    ax.legend(loc="upper left")
    figures.append(("calibration", _png(fig)))
    if sparsity:
        fig, ax = plt.subplots(figsize=(7, 0.3 * max(len(next(iter(sparsity.values()))), 4) + 1))
        names = list(next(iter(sparsity.values())))
        y = np.arange(len(names))
        for i, (label, layers) in enumerate(sparsity.items()):
            ax.barh(y + 0.4 * i, [100 * layers.get(n, 0.0) for n in names], 0.4, label=label)
        ax.set_yticks(y + 0.2, names, fontsize=7)
        ax.invert_yaxis()
        ax.set(xlabel="zeros %", title="per-layer sparsity")
        ax.legend()
        figures.append(("per-layer sparsity", _png(fig)))
    return figures


def _run_extras(report: Report) -> tuple[dict[str, dict[str, float]], list[str], str]:
    """A ``compress`` report's AUROC at T = 1, warnings and unknowns setting (``verify``
    has none of them)."""
    if isinstance(report, RunReport):
        return report.auroc_t1, report.warnings, report.unknowns.setting
    return {}, [], "none"


def write_html_report(
    path: Path,
    report: Report,
    models: dict[str, Assessment],
    sparsity: dict[str, dict[str, float]],
    synthesized: dict[str, np.ndarray] | None = None,
) -> Path:
    """Render the page to ``path`` atomically; returns ``path``. ``synthesized``: p(unknown)
    of the compressed model on synthesized rows, by generator (:func:`unknowns_summary`)."""
    figures = _figures(models, sparsity, synthesized or {})
    rows = []
    t1, warning_list, unknowns = _run_extras(report)
    for label, a in models.items():
        m = a.metrics
        cells = [f"{100 * m['accuracy']:.2f}", f"{100 * m['ece']:.2f}", f"{m['nll']:.4f}"]
        cells += [f"{100 * o['auroc']:.2f} / {100 * o['fpr95']:.2f}" for o in m["ood"].values()]
        if t1:
            cells += [f"{100 * v:.2f}" for v in t1.get(label, {}).values()]
        rows.append(
            "<tr><th>"
            + html.escape(label)
            + "</th>"
            + "".join(f"<td>{c}</td>" for c in cells)
            + "</tr>"
        )
    ood_names = list(next(iter(models.values())).metrics["ood"])
    ood_heads = "".join(f"<th>AUROC / FPR95 % vs {html.escape(n)}</th>" for n in ood_names)
    if t1:
        ood_heads += "".join(f"<th>AUROC % at T = 1 vs {html.escape(n)}</th>" for n in ood_names)
    warnings = "".join(
        f'<p style="color:#a60"><b>warning:</b> {html.escape(w)}</p>' for w in warning_list
    )
    images = "\n".join(
        f'<figure><img alt="{html.escape(t)}" src="data:image/png;base64,{b64}">'
        f"<figcaption>{html.escape(t)}</figcaption></figure>"
        for t, b64 in figures
    )
    score = html.escape(report.score)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>moonprune report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
figure {{ display: inline-block; margin: 0.5em; vertical-align: top; }}
pre {{ background: #f6f6f6; padding: 1em; overflow: auto; max-height: 30em; }}
</style></head><body>
<h1>moonprune report</h1>
<p>method <b>{html.escape(str(report.method))}</b>, MOON {report.moon},
unknowns {html.escape(unknowns)},
{_size_phrase(report)}, score {score},
threshold {report.threshold:.4f} at TPR {report.tpr}</p>
<table><tr><th>model</th><th>accuracy %</th><th>ECE %</th><th>NLL</th>{ood_heads}</tr>
{"".join(rows)}</table>
{warnings}
{images}
<h2>report.json</h2><pre>{html.escape(json.dumps(report.to_json(), indent=2))}</pre>
</body></html>
"""
    with atomic_path(path) as tmp:
        tmp.write_text(page)
    return path
