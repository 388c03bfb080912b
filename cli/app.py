"""The ``moonprune`` command. Thin: parse options, call one library function, render.

Exit codes: 0 success, 1 a reliability gate failed, 2 bad usage or bad input (one
line on stderr, no traceback; ``--debug`` shows it), 3 an internal error (a bug: one
line, ``--debug`` for the traceback), 130 interrupted. Exit 1 therefore always means
"a gate failed", which is what a CI pipeline reads it as.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Any

import typer
from moonprune.cli import compress_cmd, deploy_cmd, verify_cmd
from moonprune.cli.guard import debug_enabled, err_console, run_guarded, set_debug
from rich.logging import RichHandler
from rich.markup import escape

app = typer.Typer(
    name="moonprune",
    help=(
        "Compress a dense PyTorch image classifier into a sparse model that still knows when "
        "it does not know (MOON), verify its OOD reliability, and export it as ONNX with an "
        "in-graph 'class or unknown' rejector.\n\nStart with `moonprune demo`."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail.")] = False,
) -> None:
    set_debug(debug)
    # third-party warnings (torch, numpy) are detail, not one-line errors: shown with -v
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(
        logging.WARNING if verbose or debug else logging.ERROR
    )
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )


compress_cmd.register(app)
verify_cmd.register(app)
deploy_cmd.register(app)


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point. A usage error (an option typed wrong) is one line and
    exit 2, like every bad input; an exception no command caught is exit 3, one line."""
    from typer._click.exceptions import ClickException

    from moonprune.streaming import limit_heap_growth

    limit_heap_growth()  # memory that does not grow with the data (see its docstring)
    args = argv if argv is not None else sys.argv[1:]
    try:
        code = app(args=args, prog_name="moonprune", standalone_mode=False)
    except ClickException as exc:
        if exc.format_message():  # empty when the help was shown (no arguments)
            err_console.print(
                f"[red]error:[/] {escape(exc.format_message())} (see moonprune --help)",
                highlight=False,
                soft_wrap=True,
            )
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:
        if debug_enabled():
            raise
        error = exc

        def reraise() -> None:
            raise error

        try:
            run_guarded(reraise)
        except typer.Exit as done:
            sys.exit(done.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
