"""Rich rendering for the CLI: training progress and the dense-vs-compressed table."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from moonprune.report_records import Report, RunReport
from moonprune.reporting import structure_phrase
from moonprune.training import EpochInfo, StepInfo


class RichProgress:
    """A :class:`moonprune.training.TrainCallback` drawing one progress bar over all steps."""

    def __init__(self, console: Console, total_epochs: int) -> None:
        self.console = console
        self.total_epochs = total_epochs
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.task: Any = None
        self._epoch = (-1, 0.0, 0)  # (epoch, its start time, rows seen)

    def __enter__(self) -> RichProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def on_step(self, info: StepInfo) -> None:
        if self.task is None:
            self.task = self.progress.add_task(
                "training", total=info.steps_per_epoch * self.total_epochs, status=""
            )
            self.progress.update(self.task, completed=info.epoch * info.steps_per_epoch)
        a = "-" if info.a is None else f"{info.a:.4f}"
        now = time.perf_counter()
        rate = ""
        if info.epoch != self._epoch[0]:  # the clock starts at the end of the first step
            self._epoch = (info.epoch, now, 0)
        else:
            epoch, start, rows = self._epoch
            self._epoch = (epoch, start, rows + info.rows)
            rate = f"  {(rows + info.rows) / max(now - start, 1e-9):.0f} img/s"
        self.progress.update(
            self.task,
            advance=1,
            description=f"epoch {info.epoch + 1}/{self.total_epochs}",
            status=f"loss {info.loss:.4f}  a {a}  density {info.density:.3f}  lr {info.lr:.4f}"
            + rate,
        )

    def on_epoch_end(self, info: EpochInfo) -> None:
        del info


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}" if pct else f"{value:.4f}"


def _delta(a: float, b: float, higher_is_better: bool, pct: bool = False) -> str:
    d = b - a
    scale = 100 if pct else 1
    good = (d >= 0) == higher_is_better or abs(d) < 1e-12
    colour = "green" if good else "red"
    return f"[{colour}]{scale * d:+.2f}[/]" if pct else f"[{colour}]{d:+.4f}[/]"


def comparison_table(report: RunReport) -> Table:
    """Dense vs compressed: accuracy, ECE, NLL, and AUROC/FPR95 per OOD set."""
    dense, comp = report.models["dense"], report.models["compressed"]
    variant = "+ MOON" if report.moon else "(plain)"
    if report.structure:
        title = f"{report.method} {variant}: {structure_phrase(report.structure)}"
    else:
        target = report.target_sparsity
        title = f"{report.method} {variant} at {100 * report.sparsity:.1f}% sparsity" + (
            f" (target {100 * target:.0f}%)" if target is not None else ""
        )
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("dense", justify="right")
    table.add_column("compressed", justify="right")
    table.add_column("change", justify="right")
    rows: list[tuple[str, float, float, bool, bool]] = [
        ("accuracy %", dense["accuracy"], comp["accuracy"], True, True),
        ("ECE (15 bins) %", dense["ece"], comp["ece"], False, True),
        ("NLL", dense["nll"], comp["nll"], False, False),
    ]
    for name in comp["ood"]:
        d, c = dense["ood"][name], comp["ood"][name]
        rows.append((f"AUROC % vs {name}", d["auroc"], c["auroc"], True, True))
        rows.append((f"FPR95 % vs {name}", d["fpr95"], c["fpr95"], False, True))
    for label, a, b, higher, pct in rows:
        table.add_row(label, _fmt(a, pct), _fmt(b, pct), _delta(a, b, higher, pct))
    return table


def scores_table(report: Report) -> Table | None:
    """Every score's mean AUROC / FPR95 over the OOD sets, per model; the deployed
    score (``--score``: threshold and ONNX confidence) is marked."""
    per_model = report.scores
    if not per_model:
        return None
    models = list(per_model)
    table = Table(title="OOD scores, mean over the OOD sets (* = deployed, --score)")
    table.add_column("score")
    for model in models:
        table.add_column(f"{model} AUROC %", justify="right")
        table.add_column(f"{model} FPR95 %", justify="right")
    names = list(dict.fromkeys(name for m in models for name in per_model[m]))
    for name in names:
        cells = []
        for model in models:
            per_ood = per_model[model].get(name)
            for key in ("auroc", "fpr95"):
                values = [v[key] for v in per_ood.values()] if per_ood else []
                cells.append(f"{100 * sum(values) / len(values):.1f}" if values else "-")
        table.add_row(f"{name} *" if name == report.score else name, *cells)
    return table


def acceptance_lines(report: Report) -> list[str]:
    """The threshold's ID validation acceptance and each OOD set's rejection."""
    acc = report.acceptance
    lines = [
        f"threshold {report.threshold:.4f} ({report.score}) accepts "
        f"{100 * acc['id_val_accepted']:.1f}% of ID validation inputs "
        f"(target {100 * report.tpr:.0f}%)",
    ]
    for name, frac in acc["ood_rejected"].items():
        lines.append(f"  rejects {100 * frac:.1f}% of {name}")
    return lines


def _temperature_choice(fit: dict[str, Any]) -> str:
    used = f"using T = {fit['used']:.3f}"
    if fit["fitted"] is None:
        return f"given, {used}"
    if fit["refused"]:
        return f"fitted {fit['fitted']:.3f}, refused ({fit['refused']}), {used}"
    return f"fitted {fit['fitted']:.3f}, {used}"


def temperature_lines(report: Report) -> list[str]:
    """Per model: the fitted T, whether it was used (and why not), and its effect."""
    lines = []
    for name, cal in report.calibration.items():
        if cal.temperature_fit is not None:
            lines.append(f"{name} temperature: {_temperature_choice(cal.temperature_fit)}")
        effect = cal.effect
        if cal.temperature == 1.0 or effect is None:
            continue
        lines.append(
            f"{name} at T={cal.temperature:.3f}: ECE {100 * effect.ece_before:.2f}% -> "
            f"{100 * effect.ece_after:.2f}%, NLL {effect.nll_before:.4f} -> {effect.nll_after:.4f}"
        )
        if effect.auroc_changed:
            changes = ", ".join(
                f"{n} {100 * effect.auroc_before[n]:.2f} -> {100 * v:.2f}"
                for n, v in effect.auroc_after.items()
            )
            lines.append(f"  T changes the score's ranking: AUROC {changes}")
    return lines


def method_lines(report: RunReport) -> list[str]:
    """AUROC at T = 1 (the paper's protocol) and p(unknown) per set: is the unknown
    output alive?"""
    lines = []
    t1 = report.auroc_t1
    if t1:
        cells = ", ".join(
            f"{name} {100 * t1['dense'][name]:.2f} -> {100 * value:.2f}"
            for name, value in t1["compressed"].items()
        )
        lines.append(f"AUROC at T = 1 (the paper's protocol), dense -> compressed: {cells}")
    p_unknown = report.models["compressed"].get("p_unknown")
    if p_unknown:
        cells = ", ".join(f"{name} {v['mean']:.3g}" for name, v in p_unknown.items())
        lines.append(f"mean p(unknown) of the compressed model: {cells}")
    for rollback in report.rollbacks:
        lines.append(
            f"[yellow]epoch {rollback.epoch + 1} diverged ({rollback.reason}): rolled "
            f"back, lr x{rollback.lr_scale_after:g}[/]"
        )
    lines += [f"[yellow]warning:[/] {w}" for w in report.warnings]
    return lines


def speed_lines(report: RunReport) -> list[str]:
    """A channel-pruned model's measured speed-up (exported file vs dense export), and
    what the chosen widths measured before training."""
    lines = []
    plan = (report.structure or {}).get("plan")
    if plan:
        cells = ", ".join(f"{v:.2f}x at batch {b}"
                          for b, v in plan["speedup_before_training"].items())  # fmt: skip
        lines.append(f"channel widths chosen by timing {len(plan['candidates'])} candidates, "
                     f"each inside the {report.score} rejector, in {plan['search_s']:.0f} s "
                     f"(grid {plan['grid']}): {cells}")  # fmt: skip
    speed = report.deployed_speed
    if speed:
        cells = ", ".join(f"{v:.2f}x at batch {b}" for b, v in speed.speedup.items())
        threads = f"{speed.threads} thread{'s' if speed.threads > 1 else ''}"
        lines.append(f"model.onnx vs the dense export (onnxruntime, {threads}): {cells}")
    return lines


def preprocessing_lines(report: RunReport) -> list[str]:
    """How the inputs were normalised (``--normalize``) and the dense accuracy under each
    candidate."""
    pre = report.preprocessing
    if "summary" not in pre:
        return []
    return [f"normalize {pre['choice']}: {escape(pre['summary'])}"]


def unknowns_lines(report: RunReport) -> list[str]:
    """Which synthesized unknowns trained the model (issue 18), said plainly."""
    record = report.unknowns
    fraction, weight = record.fraction, record.weight
    if not record.generators or fraction is None or weight is None:
        return []
    rate = record.val_unknown_rate
    rate_text = "" if rate is None else f"; {100 * rate:.1f}% of ID validation rows -> unknown"
    head_text = f", {record.head} unknown head" if record.head else ""
    return [
        f"unknowns: {record.setting} ({'+'.join(record.generators)}, "
        f"{100 * fraction:.0f}% of each batch, weight {weight:g}{head_text}){rate_text}"
        " - beyond the MOON paper; --unknowns none is MOON as published"
    ]


def summary_lines(report: RunReport, files: dict[str, Any]) -> list[str]:
    """A few lines under the table: inputs, threshold, acceptance, temperature, outputs."""
    lines = preprocessing_lines(report) + acceptance_lines(report) + temperature_lines(report)
    lines += speed_lines(report) + method_lines(report) + unknowns_lines(report)
    lines.append("wrote " + ", ".join(str(p) for p in files.values()))
    return lines
