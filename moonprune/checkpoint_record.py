"""moonprune's checkpoint as a record: :class:`MoonpruneCheckpoint` and its saved dict.

The saved form is a plain dict of tensors and JSON-like values (so it loads with
``weights_only=True``): the architecture spec (factory + kwargs), the weights, the
masks, the class names, the head surgery, the metrics, the moonprune version and,
under ``"run"``, the run record (:class:`~moonprune.run_record.RunRecord`: the resolved
config, the preprocessing, the score, TPR, threshold and temperature).
:func:`checkpoint_from_dict` checks every field before it rebuilds the network from the
factory, replays the head surgery and loads the weights; a checkpoint of format
version 1 (before the run record) has those fields at the top level and its record is
derived from them. Reading and writing the file is :mod:`moonprune.checkpoints`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moonprune.arch import ArchSpec
from moonprune.errors import CheckpointError
from moonprune.heads import add_unknown_output_, unknown_head_kind
from moonprune.preprocessing import Preprocessing
from moonprune.reliability.features import FeatureStats
from moonprune.run_record import RunRecord
from moonprune.trust import check_fields, recorded_arch
from moonprune.version import __version__
from moonprune.weights import check_finite, load_weights_

FORMAT = "moonprune-checkpoint"
#: 2: the run record under "run" (1: its fields at the top level, read as before);
#: 3: the ``separate`` unknown head. Only such files are written as 3 (a reader of 2
#: would rebuild a ``mean`` head and compute their unknown logit wrongly, so it must
#: refuse them); every other file is written as 2, readable by every release since 2.
FORMAT_VERSION = 3


@dataclass
class MoonpruneCheckpoint:
    """A compressed model and everything needed to evaluate, export or resume it.

    What the run was asked and deployed is :attr:`run`; ``preprocessing``,
    ``threshold``, ``temperature``, ``tpr``, ``score`` and ``config`` read it.
    """

    model: nn.Module
    arch: ArchSpec
    classes: tuple[str, ...]
    run: RunRecord
    head_layer: str | None = None
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    structure: dict[str, dict[str, int]] | None = None
    #: Mahalanobis/KNN statistics of the classifier's input, fitted on the training
    #: split of this model (None in checkpoints written before they existed).
    feature_stats: FeatureStats | None = None

    @property
    def num_known(self) -> int:
        """K, the number of known classes."""
        return len(self.classes)

    @property
    def has_unknown(self) -> bool:
        """True when the K+1 head surgery was applied."""
        return self.head_layer is not None

    @property
    def preprocessing(self) -> Preprocessing:
        """The inputs the model takes (:attr:`RunRecord.preprocessing`)."""
        return self.run.preprocessing

    @property
    def threshold(self) -> float | None:
        """The deployed threshold on :attr:`score` (None: not set)."""
        return self.run.threshold

    @property
    def temperature(self) -> float:
        """The temperature T the threshold was set at."""
        return self.run.temperature

    @property
    def tpr(self) -> float:
        """The ID true-positive rate the threshold keeps."""
        return self.run.tpr

    @property
    def score(self) -> str:
        """The deployed OOD score."""
        return self.run.score

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config as plain data (empty when none is recorded); typed:
        ``run.config``."""
        return {} if self.run.config is None else self.run.config.as_dict()

    def to_dict(self) -> dict[str, Any]:
        kind = unknown_head_kind(self.model, self.head_layer)
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION if kind == "separate" else 2,
            "moonprune_version": self.version or __version__,
            "arch": self.arch.as_dict(),
            "head_layer": self.head_layer,
            "unknown_head": kind,
            "classes": list(self.classes),
            "run": self.run.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "masks": {k: v.detach().cpu().bool() for k, v in self.masks.items()},
            "metrics": self.metrics,
            "structure": self.structure,
            "feature_stats": None if self.feature_stats is None else self.feature_stats.to_dict(),
        }


def checkpoint_from_dict(
    obj: Mapping[str, Any], source: str, arch: str | None = None
) -> MoonpruneCheckpoint:
    """Rebuild a :class:`MoonpruneCheckpoint` from its saved dict.

    Every field is checked first (:func:`moonprune.trust.check_fields`, and the run
    record by :meth:`RunRecord.from_dict`, or for a format 1 file, written before the
    record, by :meth:`RunRecord.from_legacy` from its top-level fields); the recorded
    factory is called only when it is a moonprune built-in, and ``arch`` (the user's
    ``--arch``) replaces it otherwise (:func:`moonprune.trust.recorded_arch`).
    """
    missing = [k for k in _required(obj) if k not in obj]
    if missing:
        raise CheckpointError(
            f"{source} is an incomplete moonprune checkpoint (no {missing[0]!r}); "
            "recreate it with `moonprune compress`"
        )
    check_fields(obj, source, FORMAT_VERSION)
    run = _run_record(obj, source)
    spec = recorded_arch(obj["arch"], source, arch)
    model = spec.build()
    if obj["head_layer"] is not None:
        add_unknown_output_(model, layer=obj["head_layer"], kind=obj.get("unknown_head") or "mean")
    state, masks = obj["state_dict"], obj["masks"]
    for key, value in (("state_dict", state), ("masks", masks)):
        if not isinstance(value, Mapping) or not all(
            isinstance(t, torch.Tensor) for t in value.values()
        ):
            raise CheckpointError(
                f"{source}: {key!r} must map names to tensors; recreate it with "
                "`moonprune compress`"
            )
    if obj.get("structure"):  # channel-pruned: rebuild the slimmer shapes first
        from moonprune.sparsity.channel.structure import apply_structure_

        try:
            apply_structure_(model, obj["structure"], state)
        except (AttributeError, KeyError) as exc:
            raise CheckpointError(
                f"{source}: the channel structure does not fit {spec.factory} ({exc}); "
                "recreate the checkpoint with `moonprune compress`"
            ) from None
    check_finite(state, source)
    load_weights_(model, state, source)
    model.eval()
    stats = obj.get("feature_stats")
    feature_stats = None if stats is None else FeatureStats.from_dict(stats, source)
    if feature_stats is not None and len(feature_stats.means) != len(obj["classes"]):
        raise CheckpointError(
            f"{source}: the feature statistics hold {len(feature_stats.means)} class means for "
            f"{len(obj['classes'])} classes; recreate it with `moonprune compress`"
        )
    return MoonpruneCheckpoint(
        model=model,
        arch=spec,
        classes=tuple(obj["classes"]),
        run=run,
        head_layer=obj["head_layer"],
        masks=dict(masks),
        metrics=dict(obj["metrics"]),
        version=str(obj["moonprune_version"]),
        structure=obj.get("structure"),
        feature_stats=feature_stats,
    )


#: What every checkpoint holds, and what one holds besides: the run record (format 2),
#: or (format 1, before it) the record's fields at the top level.
_REQUIRED = ("format_version", "moonprune_version", "arch", "head_layer", "classes",
             "state_dict", "masks", "metrics")  # fmt: skip
_RECORD = ("run",)
_LEGACY = ("preprocessing", "threshold", "tpr", "score", "config")


def _required(obj: Mapping[str, Any]) -> tuple[str, ...]:
    legacy = obj.get("format_version") == 1
    return (*_REQUIRED, *(_LEGACY if legacy else _RECORD))


def _run_record(obj: Mapping[str, Any], source: str) -> RunRecord:
    """The run record, or for a format 1 file the one its top-level fields give; a
    file holding both (hand-edited) is refused rather than read one way or the other."""
    if obj["format_version"] == 1:
        return RunRecord.from_legacy(obj, source)
    stray = [k for k in (*_LEGACY, "temperature") if k in obj]
    if stray:
        raise CheckpointError(
            f"{source}: {stray[0]!r} is a field of the run record, but it is also at the "
            "top level (an edited file?); recreate it with `moonprune compress`"
        )
    return RunRecord.from_dict(obj["run"], source)
