"""What every command shares: the consoles, the ``--debug`` switch, and the mapping of
errors to one stderr line and an exit code (:func:`run_guarded`).

The application (:mod:`moonprune.cli.app`) imports the command modules, and they import
this module, never the application: the arrows point one way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from moonprune.errors import GateFailed, MoonpruneError

console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")
_state = {"debug": False}


def set_debug(debug: bool) -> None:
    """``--debug``: let errors propagate with their traceback instead of one line."""
    _state["debug"] = debug


def debug_enabled() -> bool:
    """Whether ``--debug`` was given."""
    return _state["debug"]


def run_guarded(fn: Callable[[], T]) -> T:
    """Call ``fn``; map moonprune errors to one stderr line and an exit code."""
    try:
        return fn()
    except GateFailed as exc:
        err_console.print(f"[red]gate failed:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None
    except MoonpruneError as exc:
        if _state["debug"]:
            raise
        # the message quotes user input (paths, specs): print it literally, not as markup
        err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except (typer.Exit, typer.Abort, typer.BadParameter, KeyboardInterrupt):
        raise
    except Exception as exc:
        if _state["debug"]:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        err_console.print(
            f"[red]internal error:[/] {escape(type(exc).__name__)}"
            f"{escape(': ' + first) if first else ''} (a moonprune bug, not your input); "
            "rerun with --debug for the traceback and report it",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(3) from None
