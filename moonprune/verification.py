"""``verify``: re-measure a compressed model and hold it to reliability gates.

The gates and their checks are :mod:`moonprune.gate_checks`; which data and settings a
run uses, :mod:`moonprune.verify_data`. This module evaluates, builds the report and
writes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moonprune.assessment import Assessment, assess
from moonprune.checkpoints import (
    ArchSpec,
    MoonpruneCheckpoint,
    load_checkpoint,
    load_dense,
    measured_sparsity,
)
from moonprune.config import Gates as Gates
from moonprune.errors import CheckpointError, ConfigError
from moonprune.gate_checks import GateCheck as GateCheck
from moonprune.gate_checks import check_gates as check_gates
from moonprune.heads import add_unknown_output_
from moonprune.outputs import check_output_path as check_output_path
from moonprune.outputs import write_json
from moonprune.reliability.options import EvalOptions
from moonprune.reopen import SPLITS as SPLITS
from moonprune.reopen import RunData as VerifyData
from moonprune.reopen import RunOverrides, reopen_run
from moonprune.reopen import RunSettings as VerifyRequest
from moonprune.reopen import whole as whole
from moonprune.report_parts import CalibrationSummary, plain
from moonprune.report_records import VerifyDataSummary, VerifyReport, VerifyTiming
from moonprune.reporting import layer_sparsity, write_html_report
from moonprune.sparsity.channel.structure import size_vs_dense


@dataclass
class VerifyResult:
    """The report (DESIGN.md contract + gates), the checks, and the assessments."""

    report: VerifyReport
    checks: list[GateCheck]
    compressed: Assessment
    dense: Assessment | None
    layer_sparsity: dict[str, dict[str, float]]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def _structure(ckpt: MoonpruneCheckpoint) -> dict[str, float] | None:
    """MACs and parameters against the dense factory, for a channel-pruned checkpoint."""
    if not ckpt.structure:
        return None
    dense = ckpt.arch.build().eval()
    if ckpt.head_layer is not None:
        add_unknown_output_(dense, layer=ckpt.head_layer)
    try:
        return size_vs_dense(ckpt.model, dense, torch.zeros(1, *ckpt.preprocessing.input_shape))
    except ConfigError:  # Torch-Pruning (which counts MACs) is not installed here
        return None


def verify(
    model_path: str | Path,
    *,
    data: str | None = None,
    ood: tuple[str, ...] = (),
    baseline: str | Path | None = None,
    baseline_arch: str | None = None,
    arch: str | None = None,
    split: str | None = None,
    gates: Gates | None = None,
    score: str | None = None,
    tpr: float | None = None,
    seed: int | None = None,
    ece_bins: int = 15,
    n_boot: int = 200,
    temperature: str | float | None = None,
    workers: int | None = None,
) -> VerifyResult:
    """Evaluate a moonprune checkpoint on ``data`` and ``ood``.

    Defaults come from the checkpoint: the data spec and OOD sets it was compressed
    with, its seed (so the split is the same), score and TPR. ``split="test"`` (the
    default for the data compressed on) evaluates the seed's test split and
    recalibrates the threshold on the validation split with that score and TPR, after
    the temperature (default: the checkpoint's; ``"auto"`` refits it on validation
    data). ``split="all"`` (the default for any other ``data``: a held-out set)
    evaluates every row and measures the checkpoint's own threshold on it, so a client
    running the exported file on the same rows gets the same numbers. The dense
    baseline gets its own temperature the same way the checkpoint's was set. Feature
    scores use the statistics the checkpoint stores; where it has none (an older
    checkpoint) and for the baseline they are fitted on the ID training split (with
    ``split="all"``, that of the data the checkpoint records, never the rows
    evaluated). ``arch``
    names the factory of a network that is not a moonprune built-in
    (:mod:`moonprune.trust`).

    Example::

        >>> import torch, moonprune
        >>> torch.save(moonprune.models.demo_cnn(num_classes=3, width=4).state_dict(), "d.pt")
        >>> _ = moonprune.compress(moonprune.build_config({
        ...     "checkpoint": "d.pt", "arch": "moonprune.models:demo_cnn",
        ...     "arch_kwargs": {"width": 4},
        ...     "data": "digits:0-2", "ood": ["noise"], "out": "run", "export": False,
        ...     "train": {"epochs": 1}, "moon": {"warmup_epochs": 0}}))
        >>> result = moonprune.verify("run/model.pt", gates=moonprune.Gates(max_ece=0.0))
        >>> result.passed, [c.gate for c in result.checks]
        (False, ['max_ece'])
    """
    gates = gates or Gates()
    ckpt = load_checkpoint(model_path, arch)
    overrides = RunOverrides(data, ood, split, seed, score, tpr, temperature, workers)
    run = reopen_run(ckpt, overrides, require_ood=True, has_baseline=baseline is not None)
    request, loaded = run.settings, run.data
    assert loaded is not None  # reopened with its data
    dense_model = None
    if baseline is not None:
        base_arch = ArchSpec(baseline_arch) if baseline_arch else _dense_arch(ckpt.arch)
        dense_model = load_dense(baseline, base_arch).model.eval()
    compressed, dense, timing = _assess_models(
        ckpt, dense_model, request, loaded, temperature, ece_bins, n_boot
    )
    checks = check_gates(gates, compressed, dense)
    report = _report(ckpt, request, loaded, compressed, dense, checks, timing)
    sparsity = {"compressed": layer_sparsity(ckpt.model)}
    if dense_model is not None:
        sparsity = {"dense": layer_sparsity(dense_model), **sparsity}
    return VerifyResult(report, checks, compressed, dense, sparsity)


def _assess_models(
    ckpt: MoonpruneCheckpoint, dense_model: nn.Module | None, request: VerifyRequest,
    loaded: VerifyData, temperature: str | float | None, ece_bins: int, n_boot: int,
) -> tuple[Assessment, Assessment | None, VerifyTiming]:  # fmt: skip
    """The checkpoint's assessment, the baseline's (if any), and their timing. The
    baseline gets its own temperature the way the checkpoint's was set; on a held-out
    set the deployed threshold is measured, not recalibrated."""
    score, tpr = request.score, request.tpr
    splits, ood_sets, fit_on = loaded.splits, loaded.ood, loaded.fit_on
    options = EvalOptions(score, tpr, ece_bins, n_boot, request.seed)
    t0 = time.perf_counter()
    t_model = ckpt.temperature if temperature is None else temperature
    t_dense = request.baseline_temperature
    # on a held-out set the deployed threshold is measured, not recalibrated
    deployed = (score, tpr, t_model) == (ckpt.score, ckpt.tpr, ckpt.temperature)
    fixed = ckpt.threshold if request.split == "all" and deployed else None
    compressed = assess(
        ckpt.model, splits, ood_sets, options, temperature=t_model, threshold=fixed,
        feature_stats=ckpt.feature_stats, fit_on=fit_on,
    )  # fmt: skip
    compressed_s = time.perf_counter() - t0
    dense = None
    if dense_model is not None:
        dense = assess(dense_model, splits, ood_sets, options, temperature=t_dense,
                       fit_on=fit_on)  # fmt: skip
    return compressed, dense, VerifyTiming(compressed_s, time.perf_counter() - t0)


def _data_spec(request: VerifyRequest) -> str:
    if request.data is None:  # reopen_run refuses to load a run without a data spec
        raise RuntimeError("verify reopened a run without its data spec")
    return request.data


def _report(
    ckpt: MoonpruneCheckpoint, request: VerifyRequest, loaded: VerifyData,
    compressed: Assessment, dense: Assessment | None, checks: list[GateCheck],
    timing: VerifyTiming,
) -> VerifyReport:  # fmt: skip
    """The typed report (DESIGN.md contract + gates)."""
    fitted_on, method = loaded.fitted_on, request.method
    named = {"dense": dense, "compressed": compressed}
    models = {n: a for n, a in named.items() if a is not None}
    # where the feature scores' statistics come from
    fitted = {"compressed": "checkpoint" if ckpt.feature_stats else fitted_on}
    if dense is not None:
        fitted["dense"] = fitted_on
    return VerifyReport(
        moonprune_version=ckpt.version,
        method=method,
        moon=ckpt.has_unknown,
        target_sparsity=request.target_sparsity,
        sparsity=measured_sparsity(ckpt.model),
        structure=_structure(ckpt),
        threshold=compressed.threshold,
        checkpoint_threshold=ckpt.threshold,
        temperature=compressed.temperature,
        calibration={
            n: CalibrationSummary(a.temperature, plain(a.temperature_record()))
            for n, a in models.items()
        },
        tpr=request.tpr,
        score=request.score,
        acceptance=plain(compressed.acceptance),
        models=plain({n: models[n].metrics for n in ("compressed", "dense") if n in models}),
        ci=plain({n: models[n].ci for n in ("compressed", "dense") if n in models}),
        scores=plain({n: a.score_table for n, a in models.items()}),
        data=VerifyDataSummary(
            _data_spec(request),
            list(request.ood),
            request.seed,
            request.split,
            len(loaded.splits.test),
            fitted,
        ),
        gates=list(checks),
        timing=timing,
    )


def _dense_arch(arch: ArchSpec) -> ArchSpec:
    """The compressed model's own factory (without the unknown row) builds the baseline."""
    if not arch.factory:
        raise CheckpointError("the checkpoint records no architecture; pass --baseline-arch")
    return arch


def save_outputs(
    result: VerifyResult,
    *,
    json_path: str | Path | None = None,
    html_path: str | Path | None = None,
) -> list[Path]:
    """Write the JSON report and/or ``report.html``; an OSError becomes a ConfigError."""
    written: list[Path] = []
    for option, path in (("--json", json_path), ("--html", html_path)):
        if path is None:
            continue
        target = check_output_path(path, option)
        try:
            if option == "--json":
                write_json(result.report.to_json(), target)
            else:
                _write_html(result, target)
        except OSError as exc:
            raise ConfigError(
                f"{option} {str(target)!r} could not be written ({exc.strerror or exc}); "
                "choose another path"
            ) from exc
        written.append(target)
    return written


def _write_html(result: VerifyResult, path: Path) -> None:
    models = {"compressed": result.compressed}
    if result.dense is not None:
        models = {"dense": result.dense, **models}
    write_html_report(path, result.report, models, result.layer_sparsity)
