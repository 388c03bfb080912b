"""Reliability gates: a bound on one number each, checked against an assessment.

A gate is a bound on one number: ``min_auroc`` / ``max_fpr95`` apply to every OOD
set, ``max_accuracy_drop`` / ``max_auroc_drop`` compare with a dense baseline
(``--baseline``), ``min_accuracy`` and ``max_ece`` are absolute. Verdicts use the
point estimate; the bootstrap interval is reported beside it, and a gate whose
bound lies inside the interval is flagged ``uncertain`` (noise could flip it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moonprune.assessment import Assessment
from moonprune.config import Gates
from moonprune.errors import ConfigError


@dataclass(frozen=True)
class GateCheck:
    """One gate applied to one number."""

    gate: str
    subject: str
    value: float
    bound: float
    passed: bool
    ci: tuple[float, float] | None = None

    @property
    def uncertain(self) -> bool:
        """The bound lies inside the bootstrap interval of the value."""
        return self.ci is not None and self.ci[0] <= self.bound <= self.ci[1]

    @property
    def margin(self) -> float:
        """How far the value is on the right side of the bound (negative = failed)."""
        lower_is_better = self.gate.startswith("max_")
        return self.bound - self.value if lower_is_better else self.value - self.bound

    def as_dict(self) -> dict[str, Any]:
        return {
            "gate": self.gate, "subject": self.subject, "value": self.value,
            "bound": self.bound, "passed": self.passed, "margin": self.margin,
            "ci": None if self.ci is None else list(self.ci), "uncertain": self.uncertain,
        }  # fmt: skip


def check_gates(
    gates: Gates, model: Assessment, baseline: Assessment | None = None
) -> list[GateCheck]:
    """Every gate in ``gates`` checked against ``model`` (and ``baseline`` for drops)."""
    if gates.needs_baseline and baseline is None:
        raise ConfigError(
            "--max-accuracy-drop and --max-auroc-drop compare with the dense model: "
            "pass --baseline DENSE_CHECKPOINT"
        )
    m = model.metrics
    checks: list[GateCheck] = []

    def add(gate: str, subject: str, value: float, bound: float | None, ci: Any = None) -> None:
        if bound is None:
            return
        ok = value <= bound if gate.startswith("max_") else value >= bound
        checks.append(GateCheck(gate, subject, value, bound, ok, None if ci is None else tuple(ci)))

    add("min_accuracy", "accuracy", m["accuracy"], gates.min_accuracy)
    add("max_ece", "ECE", m["ece"], gates.max_ece)
    for name, ood in m["ood"].items():
        add("min_auroc", f"AUROC vs {name}", ood["auroc"], gates.min_auroc, model.ci[name]["auroc"])
        add("max_fpr95", f"FPR95 vs {name}", ood["fpr95"], gates.max_fpr95, model.ci[name]["fpr95"])
    if baseline is not None:
        b = baseline.metrics
        add("max_accuracy_drop", "accuracy drop", b["accuracy"] - m["accuracy"],
            gates.max_accuracy_drop)  # fmt: skip
        for name, ood in m["ood"].items():
            add("max_auroc_drop", f"AUROC drop vs {name}", b["ood"][name]["auroc"] - ood["auroc"],
                gates.max_auroc_drop)  # fmt: skip
    return checks
