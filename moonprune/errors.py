"""moonprune's exception types.

Every error a user can cause by what they pass in (a path, a number, a data set)
is a :class:`MoonpruneError` whose message names the bad value and the fix. The CLI
maps them to exit code 2 and prints the message as one line, without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MoonpruneError(Exception):
    """Base class: a problem the user can fix; the message says how."""


class ConfigError(MoonpruneError, ValueError):
    """An option or recipe value is out of range or inconsistent."""


class CheckpointError(MoonpruneError):
    """A checkpoint is missing, corrupt, unsafe to load, or does not fit the model."""


class DataError(MoonpruneError):
    """A data spec cannot be read, is empty, or does not fit the model."""


class ExportError(MoonpruneError):
    """The ONNX export or its parity check failed."""


class GateFailed(MoonpruneError):
    """A reliability gate did not hold (the CLI exits 1 for this one)."""


def did_you_mean(name: object, names: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the valid name closest to ``name``, else ``""``: the
    hint every registry's unknown-name error carries."""
    close = difflib.get_close_matches(str(name), list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
