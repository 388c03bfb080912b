"""An output directory that appears whole or not at all.

Work happens in a hidden sibling ``.<name>.partial/``; :meth:`OutputDir.commit`
renames it to ``<name>``. On a bad-input error the partial directory is removed; on
an interruption it is kept, holding the training state, so ``--resume`` continues.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moonprune.errors import ConfigError

STATE_FILE = "train-state.pt"


class OutputDir:
    """``--out DIR`` handling: refuse a non-empty DIR unless ``force``."""

    def __init__(self, out: str | Path, *, force: bool = False, resume: bool = False) -> None:
        self.final = Path(out)
        self.work = self.final.parent / f".{self.final.name}.partial"
        self.force = force
        self.resume = resume
        if self.final.exists() and not self.final.is_dir():
            raise ConfigError(f"--out {str(self.final)!r} exists and is a file; choose a directory")
        if self.final.is_dir() and any(self.final.iterdir()) and not force:
            raise ConfigError(
                f"--out {str(self.final)!r} exists and is not empty; choose another directory "
                "or pass --force to replace it"
            )
        if resume and not (self.work / STATE_FILE).is_file():
            raise ConfigError(
                f"--resume: no interrupted run found at {str(self.work)!r}; "
                "run without --resume to start afresh"
            )

    @property
    def state_path(self) -> Path:
        return self.work / STATE_FILE

    def open(self) -> Path:
        """Create (or, when resuming, reuse) the partial directory."""
        if self.work.exists() and not self.resume:
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        return self.work

    def commit(self) -> Path:
        """Move the finished work into place (replacing DIR when ``force``)."""
        if self.state_path.exists():
            self.state_path.unlink()
        if self.final.exists():
            shutil.rmtree(self.final) if any(self.final.iterdir()) else self.final.rmdir()
        os.replace(self.work, self.final)
        return self.final

    def discard(self) -> None:
        """Remove the partial directory (after an error that resuming cannot fix)."""
        shutil.rmtree(self.work, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``path`` to write; when the block succeeds it
    replaces ``path`` in one rename, when it raises the temporary file is removed."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(obj: Any, path: str | Path) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
