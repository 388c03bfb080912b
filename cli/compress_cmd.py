"""``moonprune compress``, ``methods`` and ``demo``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from moonprune.cli import compress_options as opts
from moonprune.cli.compress_recipe import compress_config
from moonprune.cli.render import RichProgress, comparison_table, scores_table, summary_lines

if TYPE_CHECKING:
    from moonprune.config import CompressConfig
    from moonprune.pipeline import CompressResult


def _interrupted(out: Path, can_resume: bool = True) -> NoReturn:
    """Say what Ctrl-C left behind: a resumable state only once an epoch has finished."""
    from moonprune.cli.guard import err_console
    from rich.markup import escape

    from moonprune.outputs import STATE_FILE

    partial = out.parent / f".{out.name}.partial"
    if not (partial / STATE_FILE).is_file():
        message = " before the first epoch finished; nothing was saved. Rerun the same command."
    elif can_resume:
        message = (
            f". The last finished epoch is saved in {escape(str(partial))}; rerun the same "
            "command with --resume to continue."
        )
    else:
        message = ". Rerun the same command to start again."
    err_console.print(f"[yellow]interrupted[/]{message}", highlight=False, soft_wrap=True)
    raise typer.Exit(130)


def _show(result: CompressResult) -> None:
    from moonprune.cli.guard import console
    from moonprune.cli.verify_cmd import enforce_gates, gate_table

    console.print(comparison_table(result.report))
    table = scores_table(result.report)
    if table is not None:
        console.print(table)
    for line in summary_lines(result.report, result.files):
        console.print(line, highlight=False)
    if result.checks:
        console.print(gate_table(result))
        enforce_gates(result.checks, " (the outputs were written)")


def compress(
    checkpoint: opts.Checkpoint = None,
    data: opts.Data = None,
    ood: opts.Ood = None,
    out: opts.Out = None,
    arch: opts.Arch = None,
    arch_kwargs: opts.ArchKwargs = None,
    method: opts.Method = None,
    sparsity: opts.Sparsity = None,
    epochs: opts.Epochs = None,
    lr: opts.Lr = None,
    batch_size: opts.BatchSize = None,
    augment: opts.Augment = None,
    macs_target: opts.MacsTarget = None,
    prune_steps: opts.PruneSteps = None,
    importance: opts.Importance = None,
    round_to: opts.RoundTo = None,
    allocation: opts.Allocation = None,
    speedup: opts.Speedup = None,
    latency_batch: opts.LatencyBatch = None,
    latency_threads: opts.LatencyThreads = None,
    distribution: opts.Distribution = None,
    no_moon: opts.NoMoon = False,
    unknowns: opts.Unknowns = None,
    unknowns_fraction: opts.UnknownsFraction = None,
    unknowns_weight: opts.UnknownsWeight = None,
    unknown_head: opts.UnknownHead = None,
    score: opts.Score = None,
    temperature: opts.Temperature = None,
    tpr: opts.Tpr = None,
    normalize: opts.Normalize = None,
    head_layer: opts.HeadLayer = None,
    config: opts.Config = None,
    seed: opts.Seed = None,
    device: opts.Device = None,
    no_export: opts.NoExport = False,
    image_size: opts.ImageSize = None,
    channels: opts.Channels = None,
    on_bad_image: opts.OnBadImage = None,
    workers: opts.Workers = None,
    min_auroc: opts.MinAuroc = None,
    max_fpr95: opts.MaxFpr95 = None,
    min_accuracy: opts.MinAccuracy = None,
    max_accuracy_drop: opts.MaxAccuracyDrop = None,
    max_ece: opts.MaxEce = None,
    max_auroc_drop: opts.MaxAurocDrop = None,
    trust_checkpoint: opts.TrustCheckpoint = False,
    force: opts.Force = False,
    resume: opts.Resume = False,
) -> None:
    """Compress a dense checkpoint with sparse MOON fine-tuning; write model.pt,
    report.json, model.onnx into --out and print dense vs compressed.

    Example:  moonprune compress dense.pt --arch moonprune.models:demo_cnn
    --data digits:0-5 --ood digits:6-9 --ood noise --out run1
    """
    flags = dict(locals())  # every parameter by name, before any other local exists
    from moonprune.cli.guard import run_guarded

    from moonprune.distributed import is_main_process, shutdown

    cfg = run_guarded(lambda: compress_config(flags))
    main_rank = is_main_process()  # under torchrun only rank 0 prints
    finished = False
    try:
        result = _run(cfg, main_rank, resume=resume, force=force, config=config)
        finished = True
    except KeyboardInterrupt:
        _interrupted(Path(cfg.out))
    finally:
        shutdown(finished)  # under torchrun: end the process group before exiting
    if main_rank:
        _show(result)


def _run(
    cfg: CompressConfig, main_rank: bool, *, resume: bool, force: bool, config: Path | None
) -> CompressResult:
    """``compress`` with a progress bar (silent on the other ranks under torchrun)."""
    from moonprune.cli.guard import console, run_guarded
    from rich.console import Console

    from moonprune.pipeline import compress as run_compress

    with RichProgress(console if main_rank else Console(quiet=True),
                      cfg.train.epochs) as progress:  # fmt: skip
        return run_guarded(
            lambda: run_compress(
                cfg,
                callback=progress,
                resume=resume,
                force=force,
                protect=[config] if config else [],
            )
        )


def methods() -> None:
    """List the sparse methods (built-in and plug-ins): origin and the options each takes."""
    from moonprune.cli.guard import console
    from rich.markup import escape
    from rich.table import Table

    from moonprune.sparsity import MASKERS, METHODS

    table = Table(title="sparse methods (--method)")
    for col in ("name", "description", "origin"):
        table.add_column(col)
    options: dict[str, list[str]] = {}  # one line per option list and step time
    for name in METHODS.names():
        info = METHODS.info(name)
        table.add_row(name, info.description, info.origin)
        options.setdefault(f"(steps {info.steps}): {', '.join(info.flags())}", []).append(name)
    console.print(table)
    for flags, names in options.items():
        console.print(f"options of {', '.join(names)} {flags}", highlight=False)
    for name, error in MASKERS.plugin_errors.items():
        console.print(f"[yellow]plug-in {escape(repr(name))} failed to load:[/] {escape(error)}")


def demo(
    out: Annotated[Path, typer.Option(help="Where to write the demo's outputs.")] = Path(
        "moonprune-demo"
    ),
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs.")] = 30,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False,
    no_export: Annotated[
        bool, typer.Option("--no-export", help="Skip writing model.onnx.")
    ] = False,
) -> None:
    """The whole pipeline on built-in data, no arguments needed: train a small CNN on
    digits 0-5, compress it with RigL at 90% sparsity + MOON, evaluate against
    held-out digits 6-9 and noise, export ONNX, print the table."""
    from moonprune.cli.guard import console, run_guarded

    from moonprune.demo import run_demo

    console.print(f"[bold]moonprune demo[/]: dense CNN on digits 0-5 -> RigL 90% + MOON -> {out}")
    try:
        with RichProgress(console, epochs) as progress:
            result = run_guarded(
                lambda: run_demo(
                    out,
                    seed=seed,
                    epochs=epochs,
                    force=force,
                    export=not no_export,
                    callback=progress,
                )
            )
    except KeyboardInterrupt:
        _interrupted(out, can_resume=False)
    _show(result)


def register(app: typer.Typer) -> None:
    """Add ``compress``, ``methods`` and ``demo`` to ``app``."""
    app.command()(compress)
    app.command()(methods)
    app.command()(demo)
