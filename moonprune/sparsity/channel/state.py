"""A channel-pruning run's training state: what ``--resume`` needs to continue exactly.

Each stage fine-tunes with a :class:`StageTrainer`, moonprune's
:class:`~moonprune.training.Trainer` whose training-state file (written atomically
after every epoch, with the model, optimiser, schedule and averaging state) also holds
a ``"channel"`` entry, :class:`ChannelState`:

- ``stage``: the stage whose trainer wrote the file (its pruning step is done);
- ``structure``: the module sizes after that step
  (:func:`~moonprune.sparsity.channel.structure.module_structure`), so a fresh dense
  model is re-shaped (:func:`~moonprune.sparsity.channel.structure.apply_structure_`)
  before the saved weights are loaded;
- ``pruner``: :meth:`ChannelPruner.state_dict
  <moonprune.sparsity.channel.pruner.ChannelPruner.state_dict>` (steps done, and the
  ``latency`` allocation's plan: a resumed run never times candidates again);
- ``history``: the epochs of the stages before, counted over the whole run;
- ``fingerprint``: the channel settings, so a resume with other settings is refused.

Plain containers of numbers and strings only: :func:`read_channel_state` loads the
file with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any

import torch

from moonprune.errors import CheckpointError, ConfigError
from moonprune.training import Trainer

STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ChannelState:
    """The channel part of a stage's training state (see the module docstring)."""

    stage: int
    structure: dict[str, dict[str, int]]
    pruner: dict[str, Any]
    history: list[dict[str, Any]]
    fingerprint: dict[str, Any]

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **dataclasses.asdict(self)}


class StageTrainer(Trainer):
    """The :class:`~moonprune.training.Trainer` of one stage, whose saved state (and the
    in-memory copy a rollback restores, which ignores it) holds the :class:`ChannelState`."""

    def __init__(self, *args: Any, channel: ChannelState, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.channel = channel

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "channel": self.channel.state_dict()}


def read_channel_state(
    path: Path, fingerprint: dict[str, Any]
) -> tuple[ChannelState, dict[str, torch.Tensor]]:
    """The channel state in ``path`` and the saved model's tensors (whose shapes re-shape
    a fresh model); a ConfigError of one line when it was written with other settings."""
    damaged = (
        f"the training state {str(path)!r} is damaged or not moonprune's (it may hold "
        "pickled code, which is never loaded); run without --resume to start afresh"
    )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
        raise CheckpointError(damaged) from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(damaged)
    channel = state.get("channel")
    if not isinstance(channel, dict):
        raise ConfigError(
            f"the training state in {str(path)!r} was not written by a --method channel run; "
            "resume with the same command and options, or start afresh without --resume"
        )
    if channel.get("version") != STATE_VERSION:
        raise CheckpointError(damaged)
    difference = _first_difference(channel.get("fingerprint"), fingerprint)
    if difference:
        raise ConfigError(
            f"the training state in {str(path)!r} was written with other settings "
            f"({difference}); resume with the same command and options, or start afresh "
            "without --resume"
        )
    try:
        fields = {f.name: channel[f.name] for f in dataclasses.fields(ChannelState)}
    except KeyError:
        raise CheckpointError(damaged) from None
    return ChannelState(**fields), state["model"]


def _first_difference(saved: Any, now: dict[str, Any]) -> str | None:
    """``"KEY was A, now B"`` for the first setting that differs (one level deep)."""
    saved = saved if isinstance(saved, dict) else {}
    flat_saved, flat_now = _flat(saved), _flat(now)
    for key in sorted(set(flat_saved) | set(flat_now)):
        if flat_saved.get(key) != flat_now.get(key):
            return f"{key} was {flat_saved.get(key)!r}, now {flat_now.get(key)!r}"
    return None


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat
