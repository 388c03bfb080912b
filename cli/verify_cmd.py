"""``moonprune verify``: the reliability gate (exit 0 pass, 1 a gate failed, 2 bad input)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

if TYPE_CHECKING:
    from moonprune.report_records import VerifyReport
    from moonprune.verification import VerifyResult

GATE_HELP = "Fraction in [0, 1], e.g. 0.9."
#: ``verify``'s gate options: the fields of :class:`moonprune.config.Gates`
GATES = ("min_auroc", "max_fpr95", "min_accuracy", "max_accuracy_drop", "max_ece",
         "max_auroc_drop")  # fmt: skip


def gate_table(result: Any) -> Table:
    """One row per gate: value, bound, 95% interval, verdict."""
    table = Table(title="reliability gates")
    for col in ("gate", "value", "bound", "95% CI", "margin", "verdict"):
        table.add_column(col, justify="left" if col == "gate" else "right")
    for check in result.checks:
        ci = "-" if check.ci is None else f"[{check.ci[0]:.4f}, {check.ci[1]:.4f}]"
        verdict = "[green]pass[/]" if check.passed else "[red]FAIL[/]"
        if check.uncertain:
            verdict += " [yellow](within CI)[/]"
        table.add_row(
            f"{check.gate} {check.subject}",
            f"{check.value:.4f}",
            f"{check.bound:.4f}",
            ci,
            f"{check.margin:+.4f}",
            verdict,
        )
    return table


def metrics_table(report: VerifyReport) -> Table:
    """Accuracy, ECE, NLL and per-OOD AUROC/FPR95 with intervals, per model."""
    table = Table(title=f"score {report.score}, threshold {report.threshold:.4f}")
    names = list(report.models)
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    for key in ("accuracy", "ece", "nll"):
        table.add_row(key, *(f"{report.models[n][key]:.4f}" for n in names))
    for ood in report.models["compressed"]["ood"]:
        for key in ("auroc", "fpr95"):
            cells = []
            for n in names:
                lo, hi = report.ci[n][ood][key]
                cells.append(f"{report.models[n]['ood'][ood][key]:.4f} [{lo:.3f}, {hi:.3f}]")
            table.add_row(f"{key} vs {ood}", *cells)
    return table


def enforce_gates(checks: list[Any], note: str = "") -> None:
    """Exit 1 (through GateFailed) when any gate failed, naming each failure."""
    from moonprune.cli.guard import run_guarded

    from moonprune.errors import GateFailed

    failed = [c for c in checks if not c.passed]

    def gate() -> None:
        if failed:
            raise GateFailed(
                f"{len(failed)} of {len(checks)} gates failed{note}: "
                + "; ".join(f"{c.gate} {c.subject} {c.value:.4f} vs {c.bound:.4f}" for c in failed)
            )

    run_guarded(gate)


def verify(
    model: Annotated[str, typer.Argument(help="A moonprune checkpoint (model.pt).")],
    data: Annotated[
        str | None, typer.Option(help="ID data (default: what the model was compressed on).")
    ] = None,
    ood: Annotated[
        list[str] | None, typer.Option(help="OOD set (repeatable; default: the model's).")
    ] = None,
    baseline: Annotated[
        str | None, typer.Option(help="Dense checkpoint to compare with (state_dict).")
    ] = None,
    baseline_arch: Annotated[
        str | None, typer.Option(help="Factory of the baseline (default: the model's).")
    ] = None,
    min_auroc: Annotated[
        float | None, typer.Option(help=f"Every OOD AUROC >= X. {GATE_HELP}")
    ] = None,
    max_fpr95: Annotated[
        float | None, typer.Option(help=f"Every OOD FPR95 <= X. {GATE_HELP}")
    ] = None,
    min_accuracy: Annotated[float | None, typer.Option(help=f"Accuracy >= X. {GATE_HELP}")] = None,
    max_accuracy_drop: Annotated[
        float | None,
        typer.Option(help="Dense accuracy - compressed accuracy <= X (needs --baseline)."),
    ] = None,
    max_ece: Annotated[float | None, typer.Option(help=f"ECE <= X. {GATE_HELP}")] = None,
    max_auroc_drop: Annotated[
        float | None,
        typer.Option(help="Dense AUROC - compressed AUROC <= X per OOD set (needs --baseline)."),
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option(
            help="Factory of a network of your own (package.module:factory); a "
            "checkpoint's recorded factory is called only when it is a moonprune built-in."
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            help="test: the seed's test split (default for the data compressed on); "
            "all: every row (default for other --data, a held-out set)."
        ),
    ] = None,
    score: Annotated[str | None, typer.Option(help="OOD score (default: the model's).")] = None,
    temperature: Annotated[
        str | None, typer.Option(help="auto (refit), a number, or the model's (default).")
    ] = None,
    tpr: Annotated[float | None, typer.Option(help="ID acceptance of the threshold.")] = None,
    seed: Annotated[int | None, typer.Option(help="Split seed (default: the model's).")] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Processes reading image-folder batches (default: CPUs - 1, <= 4)."),
    ] = None,
    html_path: Annotated[
        Path | None, typer.Option("--html", help="Write report.html (plots) here.")
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the report with gate verdicts here.")
    ] = None,
) -> None:
    """Measure a compressed model's reliability and gate it, for CI pipelines.

    Exit code 0 when every gate holds, 1 when any fails, 2 for bad usage or input.

    Example:  moonprune verify run1/model.pt --baseline run1/dense.pt
    --min-auroc 0.9 --max-accuracy-drop 0.01 --json verify.json
    """
    flags = dict(locals())  # every parameter by name, before any other local exists
    from moonprune.cli.guard import console, run_guarded

    from moonprune.verification import save_outputs

    result = run_guarded(lambda: _measure(flags))
    _show(result)
    written = run_guarded(lambda: save_outputs(result, json_path=json_path, html_path=html_path))
    if written:
        console.print("wrote " + ", ".join(str(p) for p in written), highlight=False)

    enforce_gates(result.checks)


def _measure(flags: Mapping[str, Any]) -> Any:
    """Check the output paths (before the minutes of evaluation), then run
    :func:`moonprune.verification.verify` with ``verify``'s parameters ``flags``."""
    from moonprune.cli.flags import parse_temperature

    from moonprune.config import Gates
    from moonprune.verification import check_output_path
    from moonprune.verification import verify as run_verify

    model, baseline, data, ood = flags["model"], flags["baseline"], flags["data"], flags["ood"]
    inputs = [p for p in (model, baseline, data, *(ood or ())) if p]
    for option, path in (("--json", flags["json_path"]), ("--html", flags["html_path"])):
        if path is not None:
            check_output_path(path, option, inputs=inputs)
    gates = Gates(**{name: flags[name] for name in GATES})
    return run_verify(
        model, data=data, ood=tuple(ood or ()), baseline=baseline,
        baseline_arch=flags["baseline_arch"], arch=flags["arch"], split=flags["split"],
        gates=gates, score=flags["score"], tpr=flags["tpr"], seed=flags["seed"],
        workers=flags["workers"],
        temperature=parse_temperature(flags["temperature"]),
    )  # fmt: skip


def _show(result: VerifyResult) -> None:
    """The ID data measured on, the metrics with intervals, the scores, the acceptance
    and temperature lines, and the gate verdicts."""
    from moonprune.cli.guard import console
    from moonprune.cli.render import acceptance_lines, scores_table, temperature_lines

    d = result.report.data
    where = (
        f"all {d.n_test} rows of {d.id} (a held-out set; --split test for the seed's test split)"
        if d.split == "all"
        else f"the test split of {d.id} (seed {d.seed}, {d.n_test} rows)"
    )
    console.print(f"ID data: {where}", highlight=False)
    structure = result.report.structure
    if structure:
        from moonprune.reporting import structure_phrase

        console.print(f"channel-pruned: {structure_phrase(structure)}", highlight=False)
    console.print(metrics_table(result.report))
    table = scores_table(result.report)
    if table is not None:
        console.print(table)
    for line in acceptance_lines(result.report) + temperature_lines(result.report):
        console.print(line, highlight=False)
    if result.checks:
        console.print(gate_table(result))


def register(app: typer.Typer) -> None:
    """Add ``verify`` to ``app``."""
    app.command()(verify)
