"""Reading the weights a user brings: safely, and with errors that name the fix.

Loading is safe by default: ``torch.load(..., weights_only=True)``, which cannot run
code; a whole pickled ``nn.Module`` loads only with ``trust=True``
(``--trust-checkpoint``), because unpickling it can run arbitrary code. A state_dict
is found where training scripts put it (nested under ``state_dict``, ``model``, ...),
keys saved through a wrapper (``module.``, ``model.``, ``_orig_mod.``) are matched
without that prefix, ``.safetensors`` is read with the ``safetensors`` package, and
NaN/inf weights, corrupt files and shape mismatches are refused in one line each
(:class:`~moonprune.errors.CheckpointError`). :mod:`moonprune.checkpoints` builds on
these for the dense model and for moonprune's own checkpoint.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moonprune.errors import CheckpointError
from moonprune.heads import find_classifier

#: Keys under which training scripts nest a state_dict, tried in this order.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
#: Key prefixes a training wrapper adds: DataParallel/DDP, Lightning, torch.compile.
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
#: What torch's safe unpickler says when it meets a class it will not build (a pickled
#: module); other unpickling errors (e.g. "Unsupported operand") mean a damaged file.
_NAMES_A_GLOBAL = re.compile(r"Unsupported (global|class)")


def torch_load(path: Path, trust: bool, trust_flag: bool = True) -> Any:
    """``torch.load`` on the CPU, ``weights_only`` unless ``trust``; one-line errors.

    ``trust_flag`` says whether the command offers ``--trust-checkpoint``; the messages
    suggest it only then.
    """
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder; pass the file itself")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; check the path")
    trust_hint = ", or pass --trust-checkpoint if you trust this file" if trust_flag else ""
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: not for users
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        # torch's safe unpickler says "weights_only" about garbage bytes too: only a named
        # class, or a file torch.save wrote (a zip archive), means "a pickled object".
        if not trust and (_NAMES_A_GLOBAL.search(str(exc)) or zipfile.is_zipfile(path)):
            fix = (
                f"save model.state_dict() and pass --arch{trust_hint}"
                if trust_flag
                else "pass the model.pt that `moonprune compress` wrote (a whole module of "
                "your own goes to `moonprune compress ... --trust-checkpoint` first)"
            )
            raise CheckpointError(
                f"{str(path)!r} holds pickled Python objects (e.g. a whole nn.Module), which "
                f"could run code when loaded; {fix}"
            ) from None
        if _is_plain_pickle(path):
            raise CheckpointError(
                f"{str(path)!r} was written by pickle, not torch.save, and the safe loader "
                "reads only torch.save's format; re-save it with "
                f"torch.save(model.state_dict(), path){trust_hint}"
            ) from None
        raise _corrupt(path, exc) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise _corrupt(path, exc) from None


def _is_plain_pickle(path: Path) -> bool:
    """A file ``pickle.dump`` wrote starts with the PROTO opcode (0x80) and a version."""
    with path.open("rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _corrupt(path: Path, exc: Exception) -> CheckpointError:
    """One line for an unreadable file, with torch's own reason when it has a short one."""
    text = str(exc).split("WeightsUnpickler error:")[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[0] if lines else type(exc).__name__
    return CheckpointError(
        f"{str(path)!r} is corrupt or not a PyTorch checkpoint ({reason}); re-save it with "
        "torch.save(model.state_dict(), path)"
    )


def find_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The tensor dict in ``obj``: itself, or nested under a common key."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for key in NESTED_KEYS:
            if key in obj:
                found = find_state_dict(obj[key])
                if found is not None:
                    return found
    return None


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Reject NaN/inf weights with the first offending tensor's name."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(
                f"{source}: tensor {name!r} contains NaN or infinite values; "
                "the checkpoint is damaged or training diverged"
            )


class ClassCountMismatch(CheckpointError):
    """The checkpoint's classifier has another number of outputs than the built model's.

    A separate type because the caller often knows better what to suggest: when the
    model was built for the data's class count, the fix is the data's class subset.
    """

    def __init__(self, message: str, checkpoint_classes: int, model_classes: int) -> None:
        super().__init__(message)
        self.checkpoint_classes = checkpoint_classes
        self.model_classes = model_classes


def _without_wrapper_prefix(
    state: Mapping[str, torch.Tensor], own: set[str]
) -> Mapping[str, torch.Tensor]:
    """``state`` with the prefix common to all its keys (``module.``, ``model.``, ...)
    removed, repeatedly, as far as that makes more keys match ``own``."""
    candidates = [state]
    while candidates[-1]:
        keys = list(candidates[-1])
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in keys)), None)
        if prefix is None:
            break
        candidates.append({k[len(prefix) :]: v for k, v in candidates[-1].items()})
    return max(candidates, key=lambda c: len(own.intersection(c)))  # ties: the least stripped


def _check_head(
    model: nn.Module,
    key: str,
    saved: torch.Tensor,
    built: torch.Tensor,
    source: str,
    example_input: torch.Tensor | None,
) -> None:
    """Raise :class:`ClassCountMismatch` when ``key`` is the classifier's output dimension."""
    if example_input is None or saved.shape[1:] != built.shape[1:]:
        return
    try:
        head = find_classifier(model, example_input)
    except (CheckpointError, RuntimeError):
        return  # no recognisable head: the plain shape message says enough
    if key in (f"{head}.weight", f"{head}.bias"):
        n_saved, n_built = int(saved.shape[0]), int(built.shape[0])
        raise ClassCountMismatch(
            f"{source} has {n_saved} classes (its classifier {key!r}) but the model was built "
            f"for {n_built}; set num_classes = {n_saved} in the arch kwargs or use data with "
            f"{n_saved} classes",
            n_saved,
            n_built,
        )


def load_weights_(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    example_input: torch.Tensor | None = None,
) -> None:
    """Strictly load ``state`` into ``model``; the error names the first mismatched key.

    Keys saved through a wrapper (``module.`` by DataParallel/DDP, ``model.`` by
    Lightning, ``_orig_mod.`` by torch.compile) are matched without that prefix. With
    ``example_input`` (to find the classifier) a classifier of another width is
    reported as a :class:`ClassCountMismatch`, which is what that mismatch means.
    """
    own = model.state_dict()
    state = _without_wrapper_prefix(state, set(own))
    for key, tensor in own.items():
        if key not in state:
            raise CheckpointError(
                f"{source} does not fit the architecture: key {key!r} is missing from the "
                "checkpoint; check --arch and its keyword arguments"
            )
        if state[key].shape != tensor.shape:
            _check_head(model, key, state[key], tensor, source, example_input)
            raise CheckpointError(
                f"{source} does not fit the architecture: {key!r} has shape "
                f"{tuple(state[key].shape)} in the checkpoint but {tuple(tensor.shape)} in the "
                "model; check --arch kwargs (e.g. num_classes, in_channels)"
            )
    extra = [k for k in state if k not in own]
    if extra:
        raise CheckpointError(
            f"{source} does not fit the architecture: unexpected key {extra[0]!r}; check --arch"
        )
    model.load_state_dict(state, strict=True)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (needs the ``safetensors`` package)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; check the path")
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            "reading .safetensors needs the safetensors package: pip install safetensors"
        ) from None
    try:
        return load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{str(path)!r} is not a valid safetensors file ({exc})") from None
