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
from moonprune.train_records import TrainResult
from moonprune.version import __version__


@dataclass
class Calibrated:
    """A model's assessment with its temperature, and the same without (T = 1)."""

    after: Assessment
    before: Assessment

    def summary(self) -> dict[str, Any]:
        """ECE/NLL/AUROC before and after temperature scaling (the report's view)."""
        b, a = self.before.metrics, self.after.metrics
        auroc_b = {n: m["auroc"] for n, m in b["ood"].items()}
        auroc_a = {n: m["auroc"] for n, m in a["ood"].items()}
        return {
            "temperature": self.after.temperature,
            "temperature_fit": self.after.temperature_record(),
            "ece_before": b["ece"], "ece_after": a["ece"],
            "nll_before": b["nll"], "nll_after": a["nll"],
            "auroc_before": auroc_b, "auroc_after": auroc_a,
            "auroc_changed": any(abs(auroc_a[n] - auroc_b[n]) > 1e-12 for n in auroc_a),
        }  # fmt: skip


@dataclass(frozen=True)
class RunFacts:
    """What the run measured besides the assessments: the measured sparsity, the channel
    pruning's record (``None`` for a masker), the unknowns' record, and the seconds of
    dense evaluation and of training."""

    sparsity: float
    structure: dict[str, Any] | None
    unknowns: dict[str, Any]
    dense_eval_s: float
    train_s: float


#: A compressed model this far (accuracy, absolute) below the dense one is flagged.
ACCURACY_DROP_WARNING = 0.05


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


def _aurocs(assessment: Assessment) -> dict[str, float]:
    return {name: m["auroc"] for name, m in assessment.metrics["ood"].items()}


def build_report(
    cfg: CompressConfig, inputs: Inputs, dense_calibrated: Calibrated, calibrated: Calibrated,
    result: TrainResult, facts: RunFacts, checks: list[GateCheck],
) -> dict[str, Any]:  # fmt: skip
    """report.json's record (``export`` and the timing of the export and of the whole
    run are added when the files are written)."""
    dense_assessment, assessment = dense_calibrated.after, calibrated.after
    dense_metrics, compressed_metrics = dense_assessment.metrics, assessment.metrics
    structure_stats, unknowns = facts.structure, facts.unknowns
    return {
        "moonprune_version": __version__,
        "structure": structure_stats,
        "method": cfg.sparsity.method,
        "moon": cfg.moon.enabled,
        "unknowns": unknowns,
        # channel runs aim at a MAC or parameter fraction (in "structure"), not at zeros
        "target_sparsity": None if structure_stats else cfg.sparsity.sparsity,
        "sparsity": facts.sparsity,
        "threshold": assessment.threshold,
        "tpr": cfg.tpr,
        "score": cfg.score,
        "acceptance": assessment.acceptance,
        "models": {"dense": dense_metrics, "compressed": compressed_metrics},
        "ci": {"dense": dense_assessment.ci, "compressed": assessment.ci},
        "temperature": assessment.temperature,
        "calibration": {"dense": dense_calibrated.summary(), "compressed": calibrated.summary()},
        "gates": [c.as_dict() for c in checks],
        "passed": all(c.passed for c in checks),
        "timing": {
            "dense_eval_s": facts.dense_eval_s,
            "train_s": facts.train_s,
            "epoch_s_mean": float(np.mean([h.seconds for h in result.history]))
            if result.history
            else 0.0,
        },
        "data": {
            "id": cfg.data,
            "classes": list(inputs.splits.classes),
            "n_train": len(inputs.splits.train),
            "n_val": len(inputs.splits.val),
            "n_test": len(inputs.splits.test),
            "ood": {name: len(s) for name, s in inputs.ood.items()},
        },
        "preprocessing": inputs.normalization.as_dict(),
        "history": [
            {"epoch": h.epoch, "loss": h.loss, "lr": h.lr, "a": h.a, "density": h.density}
            | {"unknown_rate": h.unknown_rate}
            for h in result.history
        ],
        "rollbacks": [vars(r) for r in getattr(result, "rollbacks", [])],
        # the method's figure (the paper reports T = 1) beside the deployed one
        "auroc_t1": {
            "dense": _aurocs(dense_calibrated.before),
            "compressed": _aurocs(calibrated.before),
        },
        "warnings": inputs.normalization.warnings()
        + accuracy_warnings(dense_metrics, compressed_metrics)
        + unknowns["warnings"],
        # AUROC / FPR95 of every score, so the user sees which one works on this data
        "scores": {"dense": dense_assessment.score_table, "compressed": assessment.score_table},
        "config": cfg.as_dict(),
    }
