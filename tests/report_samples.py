"""Hand-made typed reports for the tests of the records and their renderers: every
optional part filled (a channel run's structure and deployed speed, the export, a
rollback, gates, warnings), with numbers chosen so each rendered line is predictable."""

from __future__ import annotations

from moonprune.gate_checks import GateCheck
from moonprune.report_parts import (
    CalibrationSummary,
    DeployedSpeed,
    EpochRecord,
    ExportReport,
    TemperatureEffect,
    UnknownsRecord,
)
from moonprune.report_records import (
    DataSummary,
    RunReport,
    RunTiming,
    VerifyDataSummary,
    VerifyReport,
    VerifyTiming,
)
from moonprune.train_records import Rollback


def metrics(accuracy: float, auroc: float, fpr95: float) -> dict:
    """One model's metric table, as the assessment writes it."""
    ood = {"auroc": auroc, "fpr95": fpr95, "aupr_in": 0.9, "aupr_out": 0.8}
    return {"accuracy": accuracy, "ece": 0.05, "nll": 0.3, "ood": {"noise": ood},
            "p_unknown": {"id_test": {"mean": 0.01}, "noise": {"mean": 0.6}}}  # fmt: skip


def _calibration(temperature: float, before: float, after: float) -> CalibrationSummary:
    fit = {"setting": "auto", "fitted": temperature, "used": temperature, "refused": None}
    effect = TemperatureEffect(0.1, 0.05, 0.5, 0.4, {"noise": before}, {"noise": after})
    return CalibrationSummary(temperature, fit, effect)


GATES = [
    GateCheck("min_auroc", "AUROC vs noise", 0.9, 0.95, False, (0.88, 0.96)),
    GateCheck("max_ece", "ECE", 0.05, 0.1, True),
]
SCORES = {"msp": {"noise": {"auroc": 0.9, "fpr95": 0.4}},
          "energy": {"noise": {"auroc": 0.8, "fpr95": 0.6}}}  # fmt: skip


def run_report(channel: bool = True) -> RunReport:
    """A ``compress`` report; ``channel``: with a structure and its deployed speed."""
    structure = {"macs_fraction": 0.489, "params_fraction": 0.512, "plan": None}
    return (
        RunReport(
            moonprune_version="0.0.test",
            structure=structure if channel else None,
            method="channel" if channel else "rigl",
            moon=True,
            unknowns=UnknownsRecord(
                "patch4",
                ["patch4"],
                True,
                0.25,
                0.5,
                0.02,
                {"synth: patch4": 0.7},
                ["unknowns warning"],
            ),
            target_sparsity=None if channel else 0.9,
            sparsity=0.4 if channel else 0.9,
            threshold=0.75,
            tpr=0.95,
            score="msp",
            acceptance={
                "id_val_accepted": 0.954,
                "id_test_accepted": 0.95,
                "ood_rejected": {"noise": 0.875},
            },
            models={"dense": metrics(0.98, 0.93, 0.3), "compressed": metrics(0.96, 0.9, 0.4)},
            ci={
                m: {"noise": {"auroc": [0.88, 0.92], "fpr95": [0.3, 0.5]}}
                for m in ("dense", "compressed")
            },
            temperature=2.0,
            calibration={
                "dense": _calibration(1.5, 0.93, 0.93),
                "compressed": _calibration(2.0, 0.88, 0.9),
            },
            gates=list(GATES),
            timing=RunTiming(1.5, 20.0, 2.5),
            data=DataSummary(
                "digits:0-5", ["0", "1", "2", "3", "4", "5"], 650, 216, 217, {"noise": 217}
            ),
            preprocessing={"normalize": "none", "choice": "auto", "summary": "using none [x]"},
            history=[
                EpochRecord(0, 1.2, 0.1, None, 1.0, None),
                EpochRecord(1, 0.8, 0.05, 0.3, 0.1, 0.0),
            ],
            rollbacks=[Rollback(1, float("inf"), "non-finite loss", 1.0, 0.5)],
            auroc_t1={"dense": {"noise": 0.91}, "compressed": {"noise": 0.885}},
            warnings=["accuracy warning", "unknowns warning"],
            scores={"dense": SCORES, "compressed": SCORES},
            config={"data": "digits:0-5", "ood": ["noise"], "train": {"seed": 0}},
        )
        .with_export(
            ExportReport("model.onnx", 2048, 1024, 1e-6, True, 18, 0.5),
            DeployedSpeed({"1": 1.75, "64": 2.0}, 2, "the dense model") if channel else None,
            3.0,
        )
        .with_total(30.0)
    )


def verify_report() -> VerifyReport:
    """A ``verify`` report with a baseline."""
    return VerifyReport(
        moonprune_version="0.0.test",
        method="rigl",
        moon=True,
        target_sparsity=0.9,
        sparsity=0.9,
        structure=None,
        threshold=0.7,
        checkpoint_threshold=0.75,
        temperature=2.0,
        calibration={
            "dense": CalibrationSummary(1.0, None),
            "compressed": CalibrationSummary(2.0, None),
        },
        tpr=0.95,
        score="msp",
        acceptance={
            "id_val_accepted": 0.95,
            "id_test_accepted": 0.94,
            "ood_rejected": {"noise": 0.5},
        },
        models={"compressed": metrics(0.96, 0.9, 0.4), "dense": metrics(0.98, 0.93, 0.3)},
        ci={
            m: {"noise": {"auroc": [0.88, 0.92], "fpr95": [0.3, 0.5]}}
            for m in ("compressed", "dense")
        },
        scores={"dense": SCORES, "compressed": SCORES},
        data=VerifyDataSummary(
            "digits:0-5",
            ["noise"],
            0,
            "test",
            217,
            {"compressed": "checkpoint", "dense": "train split"},
        ),
        gates=list(GATES),
        timing=VerifyTiming(2.0, 4.5),
    )
