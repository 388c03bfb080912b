"""An output directory that appears whole or not at all, and never eats an input.

Work happens in a hidden sibling ``.<name>.partial/``; :meth:`OutputDir.commit`
renames it to ``<name>``. On a bad-input error the partial directory is removed; on
an interruption it is kept, holding the training state, so ``--resume`` continues.

Safety: every folder moonprune writes holds a marker file (:data:`MARKER`);
``--force`` replaces only a folder that has it, and never one that is or contains
the current directory or an input (checkpoint, data, OOD set, recipe). A run holds
an exclusive lock (``.<name>.lock`` beside it) from the checks to the commit, so a
second run writing the same ``--out`` stops at once instead of deleting the first
one's files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from moonprune.errors import ConfigError

STATE_FILE = "train-state.pt"
#: The settings that shaped training, compared on ``--resume``.
SETTINGS_FILE = "run-settings.json"
#: The file that marks a folder as written by moonprune (what ``--force`` may replace).
MARKER = ".moonprune-run"


class OutputDir:
    """``--out DIR`` handling: refuse a non-empty DIR unless ``force`` and moonprune
    wrote it; refuse a DIR that is or holds the current directory or one of ``inputs``.

    The checks run in the constructor, before anything is read or written;
    :meth:`lock` then takes the run's lock (call it before :meth:`open`).
    """

    def __init__(
        self,
        out: str | Path,
        *,
        force: bool = False,
        resume: bool = False,
        inputs: Iterable[str | Path] = (),
    ) -> None:
        self.final = Path(out)
        if not self.final.name or self.final.name in (".", ".."):
            self.final = Path(os.path.abspath(self.final))
        self.work = self.final.parent / f".{self.final.name}.partial"
        self.force = force
        self.resume = resume
        self._lock: IO[bytes] | None = None
        self._check_name_length()
        self._refuse_inputs(inputs)
        if self.final.exists() and not self.final.is_dir():
            raise ConfigError(f"--out {str(self.final)!r} exists and is a file; choose a directory")
        if self.final.is_symlink():
            raise ConfigError(
                f"--out {str(self.final)!r} is a symbolic link; give the real folder's path"
            )
        if self.final.is_dir() and any(self.final.iterdir()):
            if not force:
                raise ConfigError(
                    f"--out {str(self.final)!r} exists and is not empty; choose another "
                    "directory or pass --force to replace it"
                )
            if not (self.final / MARKER).is_file():
                raise ConfigError(
                    f"--force replaces only a folder moonprune wrote, and {str(self.final)!r} "
                    "is not one; choose another --out"
                )
        if self.work.exists() and not (self.work / MARKER).is_file():
            raise ConfigError(
                f"{str(self.work)!r} exists and was not written by moonprune; move it away "
                "or choose another --out"
            )
        if resume and not (self.work / STATE_FILE).is_file():
            raise ConfigError(
                f"--resume: no interrupted run found at {str(self.work)!r}; "
                "run without --resume to start afresh"
            )
        self._check_writable()

    def _refuse_inputs(self, inputs: Iterable[str | Path]) -> None:
        """The out folder must not be, or hold, the current directory or an input."""
        final = Path(os.path.realpath(self.final))
        named = [(Path.cwd(), "the current directory")]
        named += [(Path(p), repr(str(p))) for p in inputs if str(p) and Path(p).exists()]
        for path, what in named:
            real = Path(os.path.realpath(path))
            if real == final or final in real.parents:
                raise ConfigError(
                    f"--out {str(self.final)!r} is or contains {what}, which moonprune must "
                    "not replace; choose a new folder for the outputs"
                )

    def _check_writable(self) -> None:
        """Fail now, not after minutes of evaluation and training."""
        parent = self.final.parent
        existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise ConfigError(
                f"--out {str(self.final)!r}: {str(existing)!r} is a file, not a folder; "
                "choose another --out"
            )
        if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(
                f"--out {str(self.final)!r}: the folder {str(existing)!r} is not writable; "
                "choose another --out"
            )

    def _check_name_length(self) -> None:
        """A name the file system cannot hold (checked before any ``exists()``)."""
        try:
            max_name = os.pathconf("/" if self.final.is_absolute() else ".", "PC_NAME_MAX")
        except (OSError, ValueError):
            max_name = 255
        too_long = next((p for p in self.work.parts if len(os.fsencode(p)) > max_name), None)
        if too_long is not None:
            raise ConfigError(
                f"--out: the name {too_long[:40]!r}... is longer than this file system allows "
                f"({max_name} bytes); choose a shorter --out"
            )

    def lock(self) -> None:
        """Take the exclusive lock of this ``--out``, or stop: another run holds it."""
        self.final.parent.mkdir(parents=True, exist_ok=True)
        path = self.final.parent / f".{self.final.name}.lock"
        handle = path.open("ab")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise ConfigError(
                f"another moonprune run is writing {str(self.final)!r}; wait for it to finish "
                "or choose another --out"
            ) from None
        self._lock = handle

    def unlock(self) -> None:
        """Release the lock (and remove its file); safe to call twice."""
        if self._lock is not None:
            Path(self._lock.name).unlink(missing_ok=True)
            self._lock.close()
            self._lock = None

    @property
    def state_path(self) -> Path:
        return self.work / STATE_FILE

    def open(self) -> Path:
        """Create (or, when resuming, reuse) the partial directory."""
        if self.work.exists() and not self.resume:
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / MARKER).write_text("written by moonprune; --force may replace this folder\n")
        return self.work

    def check_state(self) -> None:
        """On ``--resume``: the training state must be a plain dict of tensors and
        numbers (``weights_only``: a pickled object in it is refused, never run)."""
        import warnings

        import torch

        try:
            with warnings.catch_warnings():  # torch's notes on pickle protocols
                warnings.simplefilter("ignore")
                state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception:  # any unreadable file means the same thing here
            state = None
        if not isinstance(state, dict):
            raise ConfigError(
                f"--resume: the training state {str(self.state_path)!r} is damaged or not "
                "moonprune's (pickled code in it is never loaded); run without --resume"
            )

    def save_settings(self, settings: dict[str, Any]) -> None:
        """Record what shapes training, for :meth:`check_settings` on ``--resume``."""
        write_json(settings, self.work / SETTINGS_FILE)

    def check_settings(self, settings: dict[str, Any]) -> None:
        """On ``--resume``: stop at the first setting that differs from the recorded one."""
        path = self.work / SETTINGS_FILE
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            raise ConfigError(
                f"--resume: the interrupted run's settings ({str(path)!r}) are missing or "
                "damaged; run without --resume to start afresh"
            ) from None
        now, before = _flat(json.loads(json.dumps(settings))), _flat(saved)
        for key in sorted(set(now) | set(before)):
            if now.get(key) != before.get(key):
                raise ConfigError(
                    f"--resume: {key} was {before.get(key)!r} in the interrupted run and is "
                    f"{now.get(key)!r} now; resume with the same settings, or run without "
                    "--resume to start afresh"
                )

    def commit(self) -> Path:
        """Move the finished work into place (replacing DIR when ``force``)."""
        for done in (self.state_path, self.work / SETTINGS_FILE):
            done.unlink(missing_ok=True)
        if self.final.exists():
            shutil.rmtree(self.final) if any(self.final.iterdir()) else self.final.rmdir()
        os.replace(self.work, self.final)
        self.unlock()
        return self.final

    def discard(self) -> None:
        """Remove the partial directory (after an error that resuming cannot fix)."""
        shutil.rmtree(self.work, ignore_errors=True)
        self.unlock()


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


def refuse_input_overwrite(target: str | Path, inputs: Iterable[str | Path], option: str) -> None:
    """Stop when ``target`` (a file about to be written) is one of ``inputs``."""
    real = os.path.realpath(target)
    for p in inputs:
        if str(p) and Path(p).exists() and os.path.realpath(p) == real:
            raise ConfigError(
                f"{option} {str(target)!r} is an input of this command ({str(p)!r}); "
                "moonprune never writes over what it reads: choose another path"
            )


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``."""
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for key, value in d.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def check_output_path(path: str | Path, option: str, inputs: Sequence[str | Path] = ()) -> Path:
    """``path`` if a file can be written there, else a ConfigError naming it and the fix.

    Called before any evaluation, so a typo in ``--json`` costs no time and reads as
    bad input (exit 2), not as a failed gate. A path that is one of ``inputs`` (the
    checkpoint, the data) is refused: an output never replaces what was read.
    """
    target = Path(path)
    refuse_input_overwrite(target, inputs, option)
    folder = target.parent
    if target.is_dir():
        raise ConfigError(f"{option} {str(target)!r} is a folder; pass a file path in it")
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ConfigError(
            f"{option} {str(target)!r}: the folder {str(folder)!r} {what}; "
            "create it first or choose another path"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{option} {str(target)!r}: the folder {str(folder)!r} is not writable; "
            "choose another path"
        )
    return target
