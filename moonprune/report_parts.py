"""The pieces shared by the typed reports (:mod:`moonprune.report_records`): the schema
version and its check, and the nested records whose structure is fixed (the export,
the deployed speed, the unknowns, a temperature's effect, an epoch, a gate).

Each record writes the exact JSON it stands for (``to_json``) and reads it back
(``from_json``); free-form tables (metrics, intervals, score tables) stay plain dicts,
held in their JSON form (:func:`plain`), so a report read back from disk equals the
one written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any

from moonprune.errors import MoonpruneError
from moonprune.gate_checks import GateCheck
from moonprune.train_records import EpochInfo
from moonprune.version import __version__

#: The layout of report.json; ``from_json`` refuses any other. Raise it when a key is
#: renamed, removed or changes meaning (adding a key keeps it).
SCHEMA_VERSION = 1


class ReportError(MoonpruneError):
    """A report.json this moonprune cannot read: another schema version, or a missing
    or malformed field."""


def check_schema(data: Mapping[str, Any], what: str) -> None:
    """Refuse ``data`` unless it is a JSON object of :data:`SCHEMA_VERSION`."""
    if not isinstance(data, Mapping):
        raise ReportError(f"{what} is not a JSON object ({type(data).__name__}); pass report.json")
    version = data.get("schema_version")
    if version == SCHEMA_VERSION and type(version) is int:
        return
    found = "has no schema_version" if version is None else f"has schema_version {version!r}"
    writer = data.get("moonprune_version", "an unknown version")
    raise ReportError(
        f"{what} {found} (written by moonprune {writer}); this moonprune ({__version__}) "
        f"reads schema_version {SCHEMA_VERSION}: read it with the moonprune that wrote it, "
        "or rerun the command to rewrite it"
    )


@contextmanager
def reading(what: str) -> Iterator[None]:
    """Turn a missing or malformed field met while reading ``what`` into a ReportError."""
    try:
        yield
    except KeyError as exc:
        raise ReportError(f"{what} has no field {exc.args[0]!r}; it is not a moonprune "
                          "report of this schema version") from exc  # fmt: skip
    except (TypeError, ValueError, AttributeError) as exc:
        raise ReportError(f"{what} has a malformed field ({exc})") from exc


def plain(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples become lists): the form a record holds
    its free-form tables in, so ``from_json(to_json())`` of a file equals the record."""
    return json.loads(json.dumps(value))


@dataclass(frozen=True)
class ExportReport:
    """What the ONNX export wrote and how well it agrees with PyTorch (report.json's
    ``export``; :func:`moonprune.exporters.export_onnx` returns it)."""

    path: str
    bytes: int
    gzip_bytes: int
    parity_max_abs_diff: float
    labels_agree: bool
    opset: int
    export_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExportReport:
        return cls(**data)


@dataclass(frozen=True)
class DeployedSpeed:
    """A channel-pruned model's exported file timed against the dense model's export
    (``structure.speed``): speed-up per batch size (keys are the batch sizes as text)."""

    speedup: dict[str, float]
    threads: int
    compared_with: str

    def to_json(self) -> dict[str, Any]:
        return {"speedup": dict(self.speedup), "threads": self.threads,
                "compared_with": self.compared_with}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeployedSpeed:
        return cls(dict(data["speedup"]), data["threads"], data["compared_with"])


@dataclass(frozen=True)
class UnknownsRecord:
    """The synthesized unknowns a run trained with (``unknowns``): the setting (``none``
    is MOON as published), the generators, their share of a batch and loss weight, the
    share of ID validation rows whose argmax is "unknown", the mean p(unknown) of each
    generator's rows, the warnings, and the K+1 head's kind (``mean`` or ``separate``,
    :mod:`moonprune.heads`; None without one, or in reports written before it existed)."""

    setting: str
    generators: list[str]
    beyond_paper: bool
    fraction: float | None
    weight: float | None
    val_unknown_rate: float | None
    p_unknown_synth: dict[str, float]
    warnings: list[str]
    head: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> UnknownsRecord:
        return cls(**{**data, "generators": list(data["generators"]),
                      "p_unknown_synth": dict(data["p_unknown_synth"]),
                      "warnings": list(data["warnings"])})  # fmt: skip


@dataclass(frozen=True)
class TemperatureEffect:
    """ECE, NLL and AUROC per OOD set before (T = 1) and after temperature scaling."""

    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    auroc_before: dict[str, float]
    auroc_after: dict[str, float]

    @property
    def auroc_changed(self) -> bool:
        """T changed the score's ranking of some OOD set (the MSP-like scores)."""
        return any(abs(v - self.auroc_before[n]) > 1e-12 for n, v in self.auroc_after.items())


@dataclass(frozen=True)
class CalibrationSummary:
    """One model's temperature, how it was chosen (``temperature_fit``: fitted, used,
    why refused; ``None`` when given), and with ``compress`` its effect."""

    temperature: float
    temperature_fit: dict[str, Any] | None
    effect: TemperatureEffect | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"temperature": self.temperature, "temperature_fit": self.temperature_fit}
        if self.effect is not None:
            out |= asdict(self.effect) | {"auroc_changed": self.effect.auroc_changed}
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CalibrationSummary:
        effect = None
        if "ece_before" in data:
            effect = TemperatureEffect(
                data["ece_before"], data["ece_after"], data["nll_before"], data["nll_after"],
                dict(data["auroc_before"]), dict(data["auroc_after"]),
            )  # fmt: skip
        return cls(data["temperature"], data["temperature_fit"], effect)


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of the fine-tuning (``history``): loss, lr, MOON's ``a``, density, and
    the share of training rows whose argmax was "unknown"."""

    epoch: int
    loss: float
    lr: float
    a: float | None
    density: float
    unknown_rate: float | None

    @classmethod
    def of(cls, info: EpochInfo) -> EpochRecord:
        return cls(info.epoch, info.loss, info.lr, info.a, info.density, info.unknown_rate)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EpochRecord:
        return cls(**data)


def gates_from_json(rows: list[Mapping[str, Any]]) -> list[GateCheck]:
    """Gate checks back from their JSON (``margin`` and ``uncertain`` are derived)."""
    return [
        GateCheck(
            d["gate"],
            d["subject"],
            d["value"],
            d["bound"],
            d["passed"],
            None if d["ci"] is None else (d["ci"][0], d["ci"][1]),
        )
        for d in rows
    ]


def calibrations_from_json(data: Mapping[str, Any]) -> dict[str, CalibrationSummary]:
    """The per-model ``calibration`` records back from their JSON."""
    return {name: CalibrationSummary.from_json(c) for name, c in data.items()}


def fields_from(
    cls: type, data: Mapping[str, Any], readers: Mapping[str, Callable[[Any], Any]],
    skip: tuple[str, ...] = (),
) -> dict[str, Any]:  # fmt: skip
    """The keyword arguments of dataclass ``cls`` from its JSON object ``data``: each
    field's key, read by its reader in ``readers`` (else taken as stored); ``skip``
    names the fields the caller reads itself."""
    return {
        f.name: readers.get(f.name, _as_stored)(data[f.name])
        for f in fields(cls)
        if f.name not in skip
    }


def _as_stored(value: Any) -> Any:
    return value
