"""The report of a ``compress`` run (report.json): what was trained, how it scores
before and after, at what cost, with the warnings the user should see."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moonprune.assessment import Assessment
from moonprune.compress_inputs import Inputs
from moonprune.config import CompressConfig
from moonprune.gate_checks import GateCheck
from moonprune.report_parts import (
    CalibrationSummary,
    EpochRecord,
    TemperatureEffect,
    UnknownsRecord,
    plain,
)
from moonprune.report_records import DataSummary, RunReport, RunTiming
from moonprune.train_records import TrainResult
from moonprune.version import __version__


@dataclass
class Calibrated:
    """A model's assessment with its temperature, and the same without (T = 1)."""

    after: Assessment
    before: Assessment

    def summary(self) -> CalibrationSummary:
        """ECE/NLL/AUROC before and after temperature scaling (the report's view)."""
        b, a = self.before.metrics, self.after.metrics
        effect = TemperatureEffect(
            b["ece"], a["ece"], b["nll"], a["nll"], _aurocs(self.before), _aurocs(self.after)
        )
        return CalibrationSummary(self.after.temperature, self.after.temperature_record(), effect)


@dataclass(frozen=True)
class RunFacts:
    """What the run measured besides the assessments: the measured sparsity, the channel
    pruning's record (``None`` for a masker), the unknowns' record, and the seconds of
    dense evaluation and of training."""

    sparsity: float
    structure: dict[str, Any] | None
    unknowns: UnknownsRecord
    dense_eval_s: float
    train_s: float


#: A compressed model this far (accuracy, absolute) below the dense one is flagged.
ACCURACY_DROP_WARNING = 0.05


def _aurocs(assessment: Assessment) -> dict[str, float]:
    return {name: m["auroc"] for name, m in assessment.metrics["ood"].items()}


def accuracy_warnings(dense: dict[str, Any], compressed: dict[str, Any]) -> list[str]:
    """The report's and console's warning when fine-tuning lost much accuracy."""
    drop = dense["accuracy"] - compressed["accuracy"]
    if drop <= ACCURACY_DROP_WARNING:
        return []
    return [
        f"the compressed model's accuracy is {100 * drop:.1f} points below the dense model's "
        f"({100 * compressed['accuracy']:.1f}% vs {100 * dense['accuracy']:.1f}%); try more "
        "--epochs, a lower --sparsity or a lower --lr"
    ]


def build_report(
    cfg: CompressConfig, inputs: Inputs, dense_calibrated: Calibrated, calibrated: Calibrated,
    result: TrainResult, facts: RunFacts, checks: list[GateCheck],
) -> RunReport:  # fmt: skip
    """report.json's record (the export and the timing of the export and of the whole
    run are added when the files are written: :meth:`RunReport.with_export`)."""
    dense, compressed = dense_calibrated.after, calibrated.after
    seconds = [h.seconds for h in result.history]
    splits = inputs.splits
    return RunReport(
        moonprune_version=__version__,
        structure=plain(facts.structure),
        method=cfg.sparsity.method,
        moon=cfg.moon.enabled,
        unknowns=facts.unknowns,
        # channel runs aim at a MAC or parameter fraction (in "structure"), not at zeros
        target_sparsity=None if facts.structure else cfg.sparsity.sparsity,
        sparsity=facts.sparsity,
        threshold=compressed.threshold,
        tpr=cfg.tpr,
        score=cfg.score,
        acceptance=plain(compressed.acceptance),
        models=plain({"dense": dense.metrics, "compressed": compressed.metrics}),
        ci=plain({"dense": dense.ci, "compressed": compressed.ci}),
        temperature=compressed.temperature,
        calibration={"dense": dense_calibrated.summary(), "compressed": calibrated.summary()},
        gates=list(checks),
        timing=RunTiming(
            facts.dense_eval_s, facts.train_s, float(np.mean(seconds)) if seconds else 0.0
        ),
        data=DataSummary(
            cfg.data,
            list(splits.classes),
            len(splits.train),
            len(splits.val),
            len(splits.test),
            {n: len(s) for n, s in inputs.ood.items()},
        ),
        preprocessing=plain(inputs.normalization.as_dict()),
        history=[EpochRecord.of(h) for h in result.history],
        rollbacks=list(result.rollbacks),
        # the method's figure (the paper reports T = 1) beside the deployed one
        auroc_t1={
            "dense": _aurocs(dense_calibrated.before),
            "compressed": _aurocs(calibrated.before),
        },
        warnings=inputs.normalization.warnings()
        + accuracy_warnings(dense.metrics, compressed.metrics)
        + facts.unknowns.warnings,
        # AUROC / FPR95 of every score, so the user sees which one works on this data
        scores=plain({"dense": dense.score_table, "compressed": compressed.score_table}),
        config=plain(cfg.as_dict()),
    )
