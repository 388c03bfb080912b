"""The typed reports: :class:`RunReport` (``compress``'s report.json) and
:class:`VerifyReport` (``verify``'s). One frozen record each, read by attribute;
``to_json`` writes report.json (DESIGN.md's contract, plus ``schema_version``) and
``from_json`` reads it back, refusing another schema version.

Example::

    >>> from moonprune.report_parts import ReportError
    >>> from moonprune.report_records import SCHEMA_VERSION, RunReport
    >>> try:
    ...     RunReport.from_json({"schema_version": SCHEMA_VERSION + 1})
    ... except ReportError as exc:
    ...     print(str(exc).split(";")[0])
    report.json has schema_version 2 (written by moonprune an unknown version)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from moonprune.gate_checks import GateCheck
from moonprune.report_parts import (
    SCHEMA_VERSION,
    CalibrationSummary,
    DeployedSpeed,
    EpochRecord,
    ExportReport,
    UnknownsRecord,
    calibrations_from_json,
    check_schema,
    fields_from,
    gates_from_json,
    reading,
)
from moonprune.train_records import Rollback

__all__ = ["SCHEMA_VERSION", "DataSummary", "Report", "RunReport", "RunTiming",
           "VerifyDataSummary", "VerifyReport", "VerifyTiming"]  # fmt: skip


@dataclass(frozen=True)
class RunTiming:
    """Seconds of a ``compress`` run: dense evaluation, training, an epoch on average,
    the export (``None`` without one) and the whole run (set when the files are written)."""

    dense_eval_s: float
    train_s: float
    epoch_s_mean: float
    export_s: float | None = None
    total_s: float | None = None

    def to_json(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class DataSummary:
    """The ID data spec, its class names, its split sizes and each OOD set's size."""

    id: str
    classes: list[str]
    n_train: int
    n_val: int
    n_test: int
    ood: dict[str, int]


@dataclass(frozen=True)
class RunReport:
    """What ``compress`` trained, how the dense and compressed models score, at what
    cost. ``models``, ``ci``, ``scores`` and ``auroc_t1`` are keyed ``dense`` /
    ``compressed``; ``structure`` is the channel pruning's record (``None`` for a
    masker), ``deployed_speed`` its exported file's measured speed (``structure.speed``
    in JSON); ``export`` is ``None`` without ``--export``."""

    moonprune_version: str
    structure: dict[str, Any] | None
    method: str
    moon: bool
    unknowns: UnknownsRecord
    #: ``None`` for channel runs, which aim at a MAC or parameter fraction, not at zeros
    target_sparsity: float | None
    sparsity: float
    threshold: float
    tpr: float
    score: str
    acceptance: dict[str, Any]
    models: dict[str, dict[str, Any]]
    ci: dict[str, dict[str, Any]]
    temperature: float
    calibration: dict[str, CalibrationSummary]
    gates: list[GateCheck]
    timing: RunTiming
    data: DataSummary
    preprocessing: dict[str, Any]
    history: list[EpochRecord]
    rollbacks: list[Rollback]
    #: the method's AUROC at T = 1 (the paper's protocol) beside the deployed one
    auroc_t1: dict[str, dict[str, float]]
    warnings: list[str]
    #: AUROC / FPR95 of every score: ``{model: {score: {ood: {"auroc", "fpr95"}}}}``
    scores: dict[str, dict[str, Any]]
    config: dict[str, Any]
    export: ExportReport | None = None
    deployed_speed: DeployedSpeed | None = None

    def __post_init__(self) -> None:
        if self.deployed_speed is not None and self.structure is None:
            raise ValueError("a deployed speed belongs to a channel-pruned run's structure")

    @property
    def passed(self) -> bool:
        """Every gate held (true without gates)."""
        return all(c.passed for c in self.gates)

    def with_export(
        self, export: ExportReport, speed: DeployedSpeed | None, seconds: float
    ) -> RunReport:
        """This report with the ONNX export's record, speed and seconds."""
        timing = dataclasses.replace(self.timing, export_s=seconds)
        return dataclasses.replace(self, export=export, deployed_speed=speed, timing=timing)

    def with_total(self, seconds: float) -> RunReport:
        """This report with the whole run's seconds."""
        return dataclasses.replace(self, timing=dataclasses.replace(self.timing, total_s=seconds))

    def to_json(self) -> dict[str, Any]:
        """report.json's object."""
        structure = self.structure
        if structure is not None and self.deployed_speed is not None:
            structure = {**structure, "speed": self.deployed_speed.to_json()}
        out = {
            "schema_version": SCHEMA_VERSION,
            "moonprune_version": self.moonprune_version,
            "structure": structure,
            "method": self.method,
            "moon": self.moon,
            "unknowns": self.unknowns.to_json(),
            "target_sparsity": self.target_sparsity,
            "sparsity": self.sparsity,
            "threshold": self.threshold,
            "tpr": self.tpr,
            "score": self.score,
            "acceptance": self.acceptance,
            "models": self.models,
            "ci": self.ci,
            "temperature": self.temperature,
            "calibration": {n: c.to_json() for n, c in self.calibration.items()},
            "gates": [c.as_dict() for c in self.gates],
            "passed": self.passed,
            "timing": self.timing.to_json(),
            "data": asdict(self.data),
            "preprocessing": self.preprocessing,
            "history": [h.to_json() for h in self.history],
            "rollbacks": [vars(r) for r in self.rollbacks],
            "auroc_t1": self.auroc_t1,
            "warnings": self.warnings,
            "scores": self.scores,
            "config": self.config,
        }
        return out | ({} if self.export is None else {"export": self.export.as_dict()})

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunReport:
        """A report.json object read back; another schema version is refused."""
        check_schema(data, "report.json")
        with reading("report.json"):
            structure = data["structure"]
            speed = None
            if structure is not None and "speed" in structure:
                structure = {k: v for k, v in structure.items() if k != "speed"}
                speed = DeployedSpeed.from_json(data["structure"]["speed"])
            export = data.get("export")
            return cls(
                **fields_from(cls, data, _RUN_FIELDS, skip=_RUN_OWN),
                structure=structure,
                export=None if export is None else ExportReport.from_json(export),
                deployed_speed=speed,
            )


@dataclass(frozen=True)
class VerifyTiming:
    """Seconds ``verify`` spent evaluating the checkpoint, and everything in all."""

    compressed_eval_s: float
    total_eval_s: float


@dataclass(frozen=True)
class VerifyDataSummary:
    """What ``verify`` measured on: the ID data spec, the OOD specs, the seed and split
    (``all``: every row of a held-out set), the rows evaluated, and where each model's
    feature-score statistics come from (``checkpoint``, or the split they were fitted on)."""

    id: str
    ood: list[str]
    seed: int
    split: str
    n_test: int
    features_fitted_on: dict[str, str]


@dataclass(frozen=True)
class VerifyReport:
    """``verify``'s report: the checkpoint re-measured (``compressed``) and, with
    ``--baseline``, the dense model (``dense``), with the gate verdicts. The threshold
    is the one measured (``checkpoint_threshold``: the one the checkpoint records)."""

    moonprune_version: str
    method: str | None
    moon: bool
    target_sparsity: float | None
    sparsity: float
    structure: dict[str, float] | None
    threshold: float
    checkpoint_threshold: float | None
    temperature: float
    calibration: dict[str, CalibrationSummary]
    tpr: float
    score: str
    acceptance: dict[str, Any]
    models: dict[str, dict[str, Any]]
    ci: dict[str, dict[str, Any]]
    scores: dict[str, dict[str, Any]]
    data: VerifyDataSummary
    gates: list[GateCheck]
    timing: VerifyTiming

    @property
    def passed(self) -> bool:
        """Every gate held (true without gates)."""
        return all(c.passed for c in self.gates)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` report's object."""
        return {
            "schema_version": SCHEMA_VERSION,
            "moonprune_version": self.moonprune_version,
            "method": self.method,
            "moon": self.moon,
            "target_sparsity": self.target_sparsity,
            "sparsity": self.sparsity,
            "structure": self.structure,
            "threshold": self.threshold,
            "checkpoint_threshold": self.checkpoint_threshold,
            "temperature": self.temperature,
            "calibration": {n: c.to_json() for n, c in self.calibration.items()},
            "tpr": self.tpr,
            "score": self.score,
            "acceptance": self.acceptance,
            "models": self.models,
            "ci": self.ci,
            "scores": self.scores,
            "data": asdict(self.data),
            "gates": [c.as_dict() for c in self.gates],
            "passed": self.passed,
            "timing": asdict(self.timing),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VerifyReport:
        """A ``verify --json`` object read back; another schema version is refused."""
        check_schema(data, "the verify report")
        with reading("the verify report"):
            return cls(**fields_from(cls, data, _VERIFY_FIELDS))


#: How the typed fields of each report are read back from JSON (the rest are as stored).
_RUN_FIELDS: dict[str, Callable[[Any], Any]] = {
    "unknowns": UnknownsRecord.from_json,
    "calibration": calibrations_from_json,
    "gates": gates_from_json,
    "timing": lambda d: RunTiming(**d),
    "data": lambda d: DataSummary(**d),
    "history": lambda rows: [EpochRecord.from_json(h) for h in rows],
    "rollbacks": lambda rows: [Rollback(**r) for r in rows],
}
#: The fields RunReport.from_json reads itself (``structure.speed`` is ``deployed_speed``).
_RUN_OWN = ("structure", "export", "deployed_speed")
_VERIFY_FIELDS: dict[str, Callable[[Any], Any]] = {
    "calibration": calibrations_from_json,
    "gates": gates_from_json,
    "timing": lambda d: VerifyTiming(**d),
    "data": lambda d: VerifyDataSummary(**d),
}

#: Either report: what the shared renderers (scores, acceptance, temperature) read.
Report = RunReport | VerifyReport
