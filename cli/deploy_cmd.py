"""``moonprune export``, ``inspect`` and ``bench``: the edge side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from moonprune.exporters.export_record import CheckpointExport

ARCH_HELP = (
    "Factory of a network of your own (package.module:factory); a checkpoint's recorded "
    "factory is called only when it is a moonprune built-in."
)


def _kb(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def _print_inspection(info: dict[str, Any]) -> None:
    from moonprune.cli.guard import console

    table = Table(title=f"{info['path']} ({info['format']})")
    for col in ("layer", "shape", "parameters", "nonzeros", "sparsity %"):
        table.add_column(col, justify="left" if col in ("layer", "shape") else "right")
    for row in info["layers"]:
        table.add_row(row["name"], "x".join(map(str, row["shape"])), str(row["parameters"]),
                      str(row["nonzeros"]), f"{100 * row['sparsity']:.1f}")  # fmt: skip
    table.add_row("total", "", str(info["parameters"]), str(info["nonzeros"]),
                  f"{100 * info['prunable_sparsity']:.1f}", style="bold")  # fmt: skip
    console.print(table)
    console.print(f"file {_kb(info['bytes'])}, gzip {_kb(info['gzip_bytes'])}")
    structure = info.get("structure")
    if structure:
        console.print(
            f"channel-pruned: MACs {structure['dense_macs']:,} -> {structure['macs']:,} "
            f"({100 * structure['macs'] / structure['dense_macs']:.1f}%), parameters "
            f"{structure['dense_params']:,} -> {structure['params']:,}"
        )
        for name, change in structure["changed_layers"].items():
            b, a = change["before"], change["after"]
            diff = ", ".join(f"{k} {b[k]}->{a[k]}" for k in b if b[k] != a[k])
            console.print(f"  {name}: {diff}", highlight=False)
    for key, value in info["metadata"].items():
        # metadata is the file's text (class names, paths): never rich markup
        console.print(f"  {escape(key)}: {escape(str(value))}", highlight=False)


def _export_table(report: CheckpointExport, out: Path) -> Table:
    """What ``export`` wrote: sizes, threshold, parity and the ONNX file's metrics; for
    an int8 export, the float32 file beside it."""
    table = Table(title=f"exported {out}")
    table.add_column("")
    q, m = report.int8, report.metrics
    if q is not None:
        table.add_column("float32", justify="right")
        table.add_column("int8", justify="right")
        fm = q.float_metrics
        table.add_row("opset", "", str(report.opset))
        table.add_row("size", _kb(q.float_bytes), _kb(report.bytes))
        table.add_row("gzip size", _kb(q.float_gzip_bytes), _kb(report.gzip_bytes))
        table.add_row("threshold", f"{q.float_threshold:.4f}", f"{report.threshold:.4f}")
        table.add_row("accuracy %", f"{100 * fm['accuracy']:.2f}", f"{100 * m['accuracy']:.2f}")
        table.add_row("ID val accepted %", f"{100 * fm['id_val_accepted']:.2f}",
                      f"{100 * m['id_val_accepted']:.2f}")  # fmt: skip
        for name in m["auroc"]:
            table.add_row(f"AUROC % vs {name}", f"{100 * fm['auroc'][name]:.2f}",
                          f"{100 * m['auroc'][name]:.2f}")  # fmt: skip
        speed = q.speedup_vs_float
        table.add_row("speed vs float32, batch 1 / 64", "1.00x / 1.00x",
                      f"{speed['batch_1']:.2f}x / {speed['batch_64']:.2f}x")  # fmt: skip
        return table
    table.add_column("value", justify="right")
    table.add_row("opset", str(report.opset))
    table.add_row("size", _kb(report.bytes))
    if report.dense_storage_bytes is not None:
        table.add_row("size, dense storage", _kb(report.dense_storage_bytes))
    table.add_row("gzip size", _kb(report.gzip_bytes))
    table.add_row("threshold", f"{report.threshold:.4f}")
    table.add_row("parity max |logit diff|", f"{report.parity_max_abs_diff:.2e}")
    table.add_row("accuracy %", f"{100 * m['accuracy']:.2f}")
    table.add_row("ID val accepted %", f"{100 * m['id_val_accepted']:.2f}")
    for name, value in m["auroc"].items():
        table.add_row(f"AUROC % vs {name}", f"{100 * value:.2f}")
    return table


def _slower_note(report: CheckpointExport) -> str | None:
    """A note when the int8 file runs slower than the float32 one on this CPU."""
    slower = report.int8.slower() if report.int8 is not None else {}
    if not slower:
        return None
    where = ", ".join(f"{v:.2f}x at batch {b}" for b, v in slower.items())
    return (
        f"[yellow]note:[/] on this CPU the int8 file runs at {where} of "
        "the float32 file's speed: it is smaller, not faster here; for speed, export "
        "without --quantize"
    )


def export(
    model: Annotated[str, typer.Argument(help="A moonprune checkpoint (model.pt).")],
    out: Annotated[Path, typer.Option(help="The .onnx file to write.")],
    tpr: Annotated[
        float | None,
        typer.Option(help="Share of ID inputs accepted (default: the model's, 0.95)."),
    ] = None,
    score: Annotated[
        str | None,
        typer.Option(
            help="OOD score: msp, energy, max_logit, unknown, mahalanobis++, mahalanobis, knn."
        ),
    ] = None,
    opset: Annotated[
        int | None, typer.Option(help="ONNX opset (default 18); an unsupported one is refused.")
    ] = None,
    temperature: Annotated[
        str | None, typer.Option(help="auto (refit), a number, or the model's (default).")
    ] = None,
    quantize: Annotated[
        str | None, typer.Option(help="int8: static quantization calibrated on ID data.")
    ] = None,
    sparse_storage: Annotated[
        bool,
        typer.Option(
            "--sparse-storage",
            help="Store mostly-zero weights as ONNX sparse initializers (smaller file).",
        ),
    ] = False,
    bake_preprocessing: Annotated[
        bool,
        typer.Option(
            "--bake-preprocessing",
            help="The graph takes raw pixels (e.g. 0-255) and applies the checkpoint's "
            "recorded --normalize inside: (x * scale - mean) / std.",
        ),
    ] = False,
    arch: Annotated[str | None, typer.Option(help=ARCH_HELP)] = None,
) -> None:
    """Export a compressed model to ONNX with the in-graph rejector (label -1 = unknown).

    Example:  moonprune export run1/model.pt --out model-int8.onnx --quantize int8
    """
    from moonprune.cli.flags import parse_temperature
    from moonprune.cli.guard import console, run_guarded
    from moonprune.exporters.checkpoint_export import export_checkpoint

    report = run_guarded(
        lambda: export_checkpoint(model, out, tpr=tpr, score=score, opset=opset,
                                  quantize=quantize, bake_preprocessing=bake_preprocessing,
                                  sparse_storage=sparse_storage, arch=arch,
                                  temperature=parse_temperature(temperature))
    )  # fmt: skip
    console.print(_export_table(report, out))
    note = _slower_note(report)
    if note:
        console.print(note)


def inspect(
    path: Annotated[str, typer.Argument(help="A moonprune checkpoint (.pt) or an .onnx file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    arch: Annotated[str | None, typer.Option(help=ARCH_HELP)] = None,
) -> None:
    """Layers, sparsity, size and metadata of a .pt or .onnx file.

    An .onnx file whose metadata disagrees with its graph (e.g. a threshold edited in
    the metadata only) is shown in full, then named on stderr with exit code 2.
    """
    from moonprune.cli.guard import run_guarded
    from moonprune.exporters.inspection import inspect_checkpoint, inspect_onnx

    is_onnx = Path(path).suffix.lower() == ".onnx"
    info: dict[str, Any] = run_guarded(
        lambda: inspect_onnx(path) if is_onnx else inspect_checkpoint(path, arch)
    )
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        _print_inspection(info)
    if info.get("problems"):
        from moonprune.cli.guard import err_console

        err_console.print(f"[red]error:[/] {escape('; '.join(info['problems']))}",
                          highlight=False, soft_wrap=True)  # fmt: skip
        raise typer.Exit(2)


def bench(
    path: Annotated[str, typer.Argument(help="An .onnx file.")],
    vs: Annotated[str | None, typer.Option(help="Another .onnx file to compare with.")] = None,
    threads: Annotated[int | None, typer.Option(help="onnxruntime intra-op threads.")] = None,
    batch: Annotated[int, typer.Option(help="Batch size for throughput.")] = 64,
    runs: Annotated[int, typer.Option(help="Timed runs per batch size.")] = 100,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up runs.")] = 10,
) -> None:
    """onnxruntime latency (p50/p95 at batch 1) and throughput at --batch.

    A file with a fixed batch size B (a foreign export) is measured at batch B only.
    """
    from moonprune.cli.guard import console, run_guarded
    from moonprune.exporters.inspection import bench_onnx

    paths = [path] + ([vs] if vs else [])
    results = [
        run_guarded(lambda p=p: bench_onnx(p, batch_sizes=(1, batch), threads=threads,
                                           warmup=warmup, runs=runs))
        for p in paths
    ]  # fmt: skip
    table = Table(title=f"onnxruntime CPU, threads={threads or 'default'}")
    for col in ("file", "p50 ms (b=1)", "p95 ms (b=1)", f"images/s (b={batch})"):
        table.add_column(col, justify="left" if col == "file" else "right")
    for r in results:
        b1, bn = _at(r, "1"), _at(r, str(batch))
        table.add_row(
            r["path"], f"{b1['p50_ms']:.3f}", f"{b1['p95_ms']:.3f}", f"{bn['throughput']:.0f}"
        )
    console.print(table)
    for r in results:
        if r["fixed_batch"] is not None:
            console.print(f"{r['path']} takes a fixed batch of {r['fixed_batch']}: measured "
                          "at that batch size only", highlight=False)  # fmt: skip
    if vs and all(r["fixed_batch"] is None for r in results):
        base, other = results[1]["batches"], results[0]["batches"]
        console.print(
            f"{path} vs {vs}: {base['1']['p50_ms'] / other['1']['p50_ms']:.2f}x at batch 1, "
            f"{other[str(batch)]['throughput'] / base[str(batch)]['throughput']:.2f}x "
            f"throughput at batch {batch}"
        )


def _at(result: dict[str, Any], batch: str) -> dict[str, float]:
    """The measurement at ``batch``, or the only one of a fixed-batch file."""
    batches: dict[str, dict[str, float]] = result["batches"]
    return batches.get(batch) or next(iter(batches.values()))


def register(app: typer.Typer) -> None:
    """Add ``export``, ``inspect`` and ``bench`` to ``app``."""
    app.command()(export)
    app.command()(inspect)
    app.command()(bench)
