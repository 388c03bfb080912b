"""``moonprune compress`` and ``moonprune demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from moonprune.cli.render import RichProgress, comparison_table, scores_table, summary_lines

METHOD_HELP = (
    "Sparse method: rigl, set, gmp (gradual magnitude), magnitude (one-shot), torch-ao, "
    "channel (structured: removes whole channels, faster on CPU), or a plug-in "
    "(see `moonprune methods`)."
)


def parse_json_object(text: str | None, flag: str) -> dict[str, Any] | None:
    """``'{"width": 16}'`` -> dict; a clear error otherwise."""
    if text is None:
        return None
    import json

    from moonprune.errors import ConfigError

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{flag} is not valid JSON ({exc.msg}); e.g. '{{\"width\": 16}}'"
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object, e.g. '{{\"width\": 16}}'")
    return value


def parse_temperature(text: str | None) -> str | float | None:
    """``"auto"`` stays; anything else must be a number (validated by the config)."""
    if text is None or text == "auto":
        return text
    from moonprune.errors import ConfigError

    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--temperature must be 'auto' or a number > 0, got {text!r}") from None


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"32"`` -> (32, 32); ``"24x32"`` -> (24, 32)."""
    if text is None:
        return None
    from moonprune.errors import ConfigError

    try:
        values = [int(p) for p in text.lower().replace(",", "x").split("x")]
    except ValueError:
        raise ConfigError(f"--image-size {text!r} is not HxW, e.g. 32x32") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise ConfigError(f"--image-size {text!r} is not HxW, e.g. 32x32")
    return values[0], values[1]


def _interrupted(out: Path, can_resume: bool = True) -> NoReturn:
    """Say what Ctrl-C left behind: a resumable state only once an epoch has finished."""
    from moonprune.cli.app import err_console
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


def _show(result: Any) -> None:
    from moonprune.cli.app import console
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


def register(app: typer.Typer) -> None:
    """Add ``compress`` and ``demo`` to ``app``."""

    @app.command()
    def compress(
        checkpoint: Annotated[
            str | None,
            typer.Argument(
                help="Dense checkpoint: a state_dict file (with --arch) or a moonprune model.pt."
            ),
        ] = None,
        data: Annotated[str | None, typer.Option(help="ID data: digits, digits:0-5, ...")] = None,
        ood: Annotated[
            list[str] | None,
            typer.Option(help="OOD set to evaluate against (repeatable): digits:6-9, noise, ..."),
        ] = None,
        out: Annotated[
            str | None, typer.Option(help="Output directory (created; must be new or empty).")
        ] = None,
        arch: Annotated[
            str | None,
            typer.Option(help="Network factory, package.module:callable or file.py:callable."),
        ] = None,
        arch_kwargs: Annotated[
            str | None,
            typer.Option(
                help="Factory keyword arguments as JSON, e.g. '{\"width\": 16}'. "
                "num_classes/in_channels default to the data's."
            ),
        ] = None,
        method: Annotated[str | None, typer.Option(help=METHOD_HELP)] = None,
        sparsity: Annotated[
            float | None,
            typer.Option(
                help="Fraction of conv/linear weights set to zero, in (0, 1). Default 0.9."
            ),
        ] = None,
        epochs: Annotated[int | None, typer.Option(help="Fine-tuning epochs. Default 30.")] = None,
        lr: Annotated[float | None, typer.Option(help="Base learning rate. Default 0.05.")] = None,
        batch_size: Annotated[int | None, typer.Option(help="Batch size. Default 64.")] = None,
        augment: Annotated[
            str | None,
            typer.Option(
                help="Training-row augmentation: none (default), crop (random crop with "
                "padding), crop+flip (natural images)."
            ),
        ] = None,
        macs_target: Annotated[
            float | None,
            typer.Option(
                help="channel: keep this fraction of the dense MACs (instead of --sparsity)."
            ),
        ] = None,
        prune_steps: Annotated[
            int | None,
            typer.Option(
                help="channel: pruning steps, each followed by fine-tuning. Default min(4, epochs)."
            ),
        ] = None,
        importance: Annotated[
            str | None, typer.Option(help="channel: magnitude (default) or taylor importance.")
        ] = None,
        round_to: Annotated[
            int | None,
            typer.Option(
                help="channel: keep channel counts multiples of this (e.g. 8: faster on "
                "onnxruntime's CPU kernels than odd counts)."
            ),
        ] = None,
        allocation: Annotated[
            str | None,
            typer.Option(
                help="channel: latency (default: layer widths chosen by timing candidate "
                "networks in onnxruntime on this machine), global (per MAC saved, no timing) "
                "or uniform (every layer loses the same fraction)."
            ),
        ] = None,
        speedup: Annotated[
            float | None,
            typer.Option(
                help="channel: make the model this many times faster (dense / pruned "
                "onnxruntime latency at --latency-batch, measured on this machine, within "
                "10%). Default with no other target: the least pruning that is at least "
                "1.5x faster at batch 1 and 1.8x at --latency-batch (else the fastest)."
            ),
        ] = None,
        latency_batch: Annotated[
            int | None, typer.Option(help="channel: batch size the speed-up is for. Default 64.")
        ] = None,
        latency_threads: Annotated[
            int | None,
            typer.Option(help="channel: onnxruntime threads to time with. Default: all CPUs."),
        ] = None,
        distribution: Annotated[
            str | None, typer.Option(help="Layer densities: erk (default) or uniform.")
        ] = None,
        no_moon: Annotated[
            bool,
            typer.Option(
                "--no-moon", help="Plain baseline: K-way head, cross-entropy, no averaging."
            ),
        ] = False,
        unknowns: Annotated[
            str | None,
            typer.Option(
                help="Synthesized 'unknown' training rows (beyond the MOON paper): none "
                "(default; MOON as published), synth (the evidence-chosen generators), or "
                "generator names joined by '+' (patch2, patch4, mixup, blur, permute, "
                "lowfreq, vos)."
            ),
        ] = None,
        unknowns_fraction: Annotated[
            float | None,
            typer.Option(help="Synthesized rows per batch, as a fraction of it. Default 0.25."),
        ] = None,
        unknowns_weight: Annotated[
            float | None,
            typer.Option(help="Weight of their cross-entropy in the loss. Default 0.5."),
        ] = None,
        score: Annotated[
            str | None,
            typer.Option(
                help="OOD score: mahalanobis++ (default), mahalanobis or knn, of the "
                "classifier's input "
                "(fitted on the training split), or of the logits: msp, energy, max_logit, unknown."
            ),
        ] = None,
        temperature: Annotated[
            str | None,
            typer.Option(help="auto (default): fit T on validation data; or a number (1 = off)."),
        ] = None,
        tpr: Annotated[
            float | None,
            typer.Option(help="Share of ID inputs the threshold accepts. Default 0.95."),
        ] = None,
        normalize: Annotated[
            str | None,
            typer.Option(
                help="How the dense model's inputs were normalised: auto (default: the most "
                "accurate on validation data), none ([0, 1]), dataset (the training split's "
                "mean/std), symmetric ([-1, 1]), imagenet, 0-255, or 'mean=..;std=..' on "
                "pixels in [0, 1]."
            ),
        ] = None,
        head_layer: Annotated[
            str | None, typer.Option(help="Name of the final nn.Linear (found automatically).")
        ] = None,
        config: Annotated[
            Path | None,
            typer.Option(help="Recipe TOML with any of these options; flags override it."),
        ] = None,
        seed: Annotated[
            int | None, typer.Option(help="Random seed (splits, shuffling, growth). Default 0.")
        ] = None,
        device: Annotated[str | None, typer.Option(help="auto (default), cpu or cuda.")] = None,
        no_export: Annotated[
            bool, typer.Option("--no-export", help="Skip writing model.onnx.")
        ] = False,
        image_size: Annotated[
            str | None,
            typer.Option(
                help="Resize folder images to HxW (e.g. 32x32); default: the first image's size."
            ),
        ] = None,
        channels: Annotated[
            int | None, typer.Option(help="Convert images to 1 (gray) or 3 (RGB) channels.")
        ] = None,
        on_bad_image: Annotated[
            str | None, typer.Option(help="An undecodable image file: skip (warn) or fail.")
        ] = None,
        workers: Annotated[
            int | None,
            typer.Option(
                help="Processes that read image-folder batches (decode, resize, normalise) "
                "while the model trains; 0 reads in the main process. Default: one per CPU "
                "beyond the first, at most 4. Results do not depend on it."
            ),
        ] = None,
        min_auroc: Annotated[
            float | None, typer.Option(help="Gate: every OOD AUROC >= X (exit 1 if not).")
        ] = None,
        max_fpr95: Annotated[float | None, typer.Option(help="Gate: every OOD FPR95 <= X.")] = None,
        min_accuracy: Annotated[float | None, typer.Option(help="Gate: accuracy >= X.")] = None,
        max_accuracy_drop: Annotated[
            float | None, typer.Option(help="Gate: dense - compressed accuracy <= X.")
        ] = None,
        max_ece: Annotated[float | None, typer.Option(help="Gate: ECE <= X.")] = None,
        max_auroc_drop: Annotated[
            float | None, typer.Option(help="Gate: dense - compressed AUROC <= X per OOD set.")
        ] = None,
        trust_checkpoint: Annotated[
            bool,
            typer.Option("--trust-checkpoint", help="Allow a pickled nn.Module (can run code!)."),
        ] = False,
        force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False,
        resume: Annotated[
            bool, typer.Option("--resume", help="Continue an interrupted run into the same --out.")
        ] = False,
    ) -> None:
        """Compress a dense checkpoint with sparse MOON fine-tuning; write model.pt,
        report.json, model.onnx into --out and print dense vs compressed.

        Example:  moonprune compress dense.pt --arch moonprune.models:demo_cnn
        --data digits:0-5 --ood digits:6-9 --ood noise --out run1
        """
        from moonprune.cli.app import console, run_guarded
        from rich.console import Console

        from moonprune.config import build_config
        from moonprune.distributed import is_main_process
        from moonprune.pipeline import compress as run_compress
        from moonprune.recipe import merge, read_recipe
        from moonprune.trust import checked_recipe_arch

        def build() -> Any:
            recipe = read_recipe(config) if config is not None else {}
            checked_recipe_arch(recipe.get("arch"), arch, str(config))
            overrides: dict[str, Any] = {
                "checkpoint": checkpoint,
                "data": data,
                "out": out,
                "arch": arch,
                "arch_kwargs": parse_json_object(arch_kwargs, "--arch-kwargs"),
                "ood": tuple(ood) if ood else None,
                "head_layer": head_layer,
                "device": device,
                "score": score,
                "tpr": tpr,
                "temperature": parse_temperature(temperature),
                "normalize": normalize,
                "image_size": parse_size(image_size),
                "channels": channels,
                "on_bad_image": on_bad_image,
                "workers": workers,
                "trust_checkpoint": True if trust_checkpoint else None,
                "export": False if no_export else None,
                "sparsity.method": method,
                "sparsity.sparsity": sparsity,
                "sparsity.distribution": distribution,
                "sparsity.macs_target": macs_target,
                "sparsity.steps": prune_steps,
                "sparsity.importance": importance,
                "sparsity.round_to": round_to,
                "sparsity.allocation": allocation,
                "sparsity.speedup": speedup,
                "sparsity.latency_batch": latency_batch,
                "sparsity.threads": latency_threads,
                "train.epochs": epochs,
                "train.lr": lr,
                "train.batch_size": batch_size,
                "train.augment": augment,
                "train.seed": seed,
                "moon.enabled": False if no_moon else None,
                "moon.unknowns": unknowns,
                "moon.unknowns_fraction": unknowns_fraction,
                "moon.unknowns_weight": unknowns_weight,
                "gates.min_auroc": min_auroc,
                "gates.max_fpr95": max_fpr95,
                "gates.min_accuracy": min_accuracy,
                "gates.max_accuracy_drop": max_accuracy_drop,
                "gates.max_ece": max_ece,
                "gates.max_auroc_drop": max_auroc_drop,
            }
            merged = merge(recipe, overrides)
            for key, flag in (("checkpoint", "CHECKPOINT"), ("data", "--data"), ("out", "--out")):
                if not merged.get(key):
                    from moonprune.errors import ConfigError

                    raise ConfigError(
                        f"missing {flag}: give it on the command line or as "
                        f"{key} = ... in the recipe"
                    )
            return build_config(merged)

        cfg = run_guarded(build)
        main_rank = is_main_process()  # under torchrun only rank 0 prints
        try:
            with RichProgress(console if main_rank else Console(quiet=True),
                              cfg.train.epochs) as progress:  # fmt: skip
                result = run_guarded(
                    lambda: run_compress(
                        cfg,
                        callback=progress,
                        resume=resume,
                        force=force,
                        protect=[config] if config else [],
                    )
                )
        except KeyboardInterrupt:
            _interrupted(Path(cfg.out))
        if main_rank:
            _show(result)

    @app.command()
    def methods() -> None:
        """List the sparse methods (built-in and plug-ins): origin and the options each takes."""
        from moonprune.cli.app import console
        from rich.markup import escape
        from rich.table import Table

        from moonprune.config import method_options
        from moonprune.sparsity import MASKERS
        from moonprune.sparsity.channel.settings import CHANNEL_DESCRIPTION

        table = Table(title="sparse methods (--method)")
        for col in ("name", "description", "origin"):
            table.add_column(col)
        rows = [(n, d, MASKERS.origin(n)) for n, d in MASKERS.describe().items()]
        rows.append(("channel", CHANNEL_DESCRIPTION, "moonprune"))
        options: dict[str, list[str]] = {}  # one line per option list
        for name, description, origin in rows:
            table.add_row(name, description, origin)
            options.setdefault(", ".join(method_options(name)), []).append(name)
        console.print(table)
        for flags, names in options.items():
            console.print(f"options of {', '.join(names)}: {flags}", highlight=False)
        for name, error in MASKERS.plugin_errors.items():
            console.print(
                f"[yellow]plug-in {escape(repr(name))} failed to load:[/] {escape(error)}"
            )

    @app.command()
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
        from moonprune.cli.app import console, run_guarded

        from moonprune.demo import run_demo

        console.print(
            f"[bold]moonprune demo[/]: dense CNN on digits 0-5 -> RigL 90% + MOON -> {out}"
        )
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
