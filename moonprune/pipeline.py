"""``compress``: checkpoint -> K+1 head -> sparse MOON fine-tuning -> report -> export.

Each stage is its own module; this one only wires them together, validates every
input *before* any output is written, and writes the outputs atomically. The inputs
are :mod:`moonprune.compress_inputs`, the report :mod:`moonprune.run_report`, the
export :mod:`moonprune.compress_export`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moonprune.assessment import Assessment, assess_logits, collect
from moonprune.batching import check_batch_size
from moonprune.calibration import choose_temperature
from moonprune.checkpoints import (
    DenseModel,
    MoonpruneCheckpoint,
    RunRecord,
    measured_sparsity,
    save_checkpoint,
)
from moonprune.compress_export import deployed_speed, export_run
from moonprune.compress_inputs import Inputs, input_paths, training_settings
from moonprune.compress_inputs import prepare_inputs as prepare_inputs
from moonprune.config import CompressConfig
from moonprune.distributed import DistContext, from_env
from moonprune.errors import ConfigError
from moonprune.feature_scores import FeatureOptions
from moonprune.gate_checks import GateCheck, check_gates
from moonprune.heads import add_unknown_output_, find_classifier
from moonprune.outputs import OutputDir, write_json
from moonprune.reliability.options import EvalOptions
from moonprune.report_records import RunReport
from moonprune.reporting import layer_sparsity, unknowns_summary, write_html_report
from moonprune.run_report import Calibrated, RunFacts, build_report
from moonprune.sparsity import MASKERS, METHODS
from moonprune.sparsity.channel.settings import check_channel_config
from moonprune.sparsity.channel.structure import module_structure
from moonprune.sparsity.channel.training import train_channel_pruned
from moonprune.train_records import TrainResult
from moonprune.training import TrainCallback, train


def resolve_device(name: str, dist: DistContext | None = None) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error.

    Under ``torchrun`` a CUDA run gives each process the GPU of its ``LOCAL_RANK`` (and
    makes it the current one); a CPU run leaves the GPUs alone.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was given but no CUDA GPU is available; use --device cpu")
    device = torch.device(name)
    if device.type == "cuda" and dist is not None and dist.enabled and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


@dataclass
class CompressResult:
    """What ``compress`` produced: the output directory, the report, the checkpoint."""

    out: Path
    report: RunReport
    checkpoint: MoonpruneCheckpoint
    files: dict[str, Path] = field(default_factory=dict)
    checks: list[GateCheck] = field(default_factory=list)


def _assess(model: nn.Module, inputs: Inputs, cfg: CompressConfig) -> Calibrated:
    """Assess ``model`` at T = 1 and at its temperature (fitted on val, or given)."""
    options = FeatureOptions(cfg.feature_bank, cfg.knn_k, cfg.train.seed)
    logits = collect(model, inputs.splits, inputs.ood, options=options)
    choice = choose_temperature(cfg.temperature, logits.val, inputs.splits.val.y)
    eval_options = EvalOptions(cfg.score, cfg.tpr, cfg.ece_bins, seed=cfg.train.seed)
    after = assess_logits(logits, inputs.splits, eval_options, temperature=choice)
    before = after if choice.used == 1.0 else assess_logits(logits, inputs.splits, eval_options)
    return Calibrated(after, before)


def compress(
    cfg: CompressConfig,
    *,
    callback: TrainCallback | None = None,
    resume: bool = False,
    force: bool = False,
    dense: DenseModel | None = None,
    protect: Sequence[str | Path] = (),
) -> CompressResult:
    """Run the whole pipeline for ``cfg``; see the module docstring.

    ``--out`` is checked before anything is read (:class:`~moonprune.outputs.OutputDir`):
    it must not be, or hold, an input (the checkpoint, data, OOD sets, and ``protect``,
    e.g. the recipe), and ``force`` replaces only a folder moonprune wrote.

    Example::

        >>> import torch, moonprune
        >>> torch.save(moonprune.models.demo_cnn(num_classes=3, width=4).state_dict(), "d.pt")
        >>> cfg = moonprune.build_config({
        ...     "checkpoint": "d.pt", "arch": "moonprune.models:demo_cnn",
        ...     "arch_kwargs": {"width": 4}, "data": "digits:0-2", "ood": ["noise"],
        ...     "out": "run", "export": False, "train": {"epochs": 2},
        ...     "moon": {"warmup_epochs": 1}})
        >>> result = moonprune.compress(cfg)
        >>> sorted(p.name for p in result.out.iterdir())
        ['.moonprune-run', 'model.pt', 'recipe.json', 'report.html', 'report.json']
        >>> abs(result.report.sparsity - 0.9) < 0.005, result.report.to_json()["schema_version"]
        (True, 1)
    """
    t_start = time.perf_counter()
    dist = from_env()
    out = OutputDir(cfg.out, force=force, resume=resume, inputs=[*input_paths(cfg), *protect])
    if dist.is_main:
        out.lock()
    try:
        return _compress(cfg, out, dist, t_start, callback=callback, resume=resume, dense=dense)
    finally:
        out.unlock()


def _compress(
    cfg: CompressConfig,
    out: OutputDir,
    dist: Any,
    t_start: float,
    *,
    callback: TrainCallback | None,
    resume: bool,
    dense: DenseModel | None,
) -> CompressResult:
    """:func:`compress` once ``--out`` is checked and locked."""
    device = resolve_device(cfg.device, dist)
    torch.manual_seed(cfg.train.seed)
    inputs = prepare_inputs(cfg, dense, device)
    settings = training_settings(cfg, inputs.splits)
    if resume:  # before the minutes of dense evaluation
        out.check_settings(settings)
        out.check_state()
    if cfg.arch and inputs.dense.arch is not None:  # record the kwargs actually used
        cfg = dataclasses.replace(cfg, arch_kwargs=dict(inputs.dense.arch.kwargs))
    dense_model = inputs.dense.model.to(device).eval()
    # settings that cannot train fail now, before the minutes of dense evaluation
    check_batch_size(dense_model, cfg.train.batch_size, dist.world_size)
    if METHODS.is_structured(cfg.sparsity.method):
        check_channel_config(cfg)
    t0 = time.perf_counter()
    dense_calibrated = _assess(dense_model, inputs, cfg)
    dense_eval_s = time.perf_counter() - t0
    model = copy.deepcopy(dense_model)
    head_layer = _unknown_head(model, inputs, cfg, device)
    work = out.open() if dist.is_main else out.work
    if dist.is_main and not resume:
        out.save_settings(settings)
    t0 = time.perf_counter()
    result, structure_stats = _train(model, head_layer, inputs, cfg, out, dist, device,
                                     callback, resume)  # fmt: skip
    train_s = time.perf_counter() - t0
    compressed = result.model.eval()
    unknowns, synthesized = unknowns_summary(
        compressed, inputs.splits.val, cfg.moon, cfg.train.seed
    )
    calibrated = _assess(compressed, inputs, cfg)
    assessment, dense_assessment = calibrated.after, dense_calibrated.after
    checks = check_gates(cfg.gates, assessment, dense_assessment) if cfg.gates.any else []
    facts = RunFacts(measured_sparsity(compressed), structure_stats, unknowns, dense_eval_s,
                     train_s)  # fmt: skip
    report = build_report(cfg, inputs, dense_calibrated, calibrated, result, facts, checks)
    ckpt = _checkpoint(cfg, inputs, compressed, head_layer, result, assessment,
                       dense_assessment.metrics, structure_stats)  # fmt: skip
    if not dist.is_main:  # data-parallel: rank 0 writes the outputs
        return CompressResult(out.final, report, ckpt, {}, checks)
    models = {"dense": dense_model, "compressed": compressed}
    assessments = {"dense": dense_assessment, "compressed": assessment}
    names, report = _write_outputs(cfg, inputs, ckpt, report, facts, models, assessments,
                                   synthesized, work, t_start)  # fmt: skip
    final = out.commit()
    files = {name: final / name for name in names}
    return CompressResult(final, report, ckpt, files, checks)


def _unknown_head(
    model: nn.Module, inputs: Inputs, cfg: CompressConfig, device: torch.device
) -> str | None:
    """The layer holding the unknown output: the checkpoint's when continuing from a
    moonprune checkpoint (already K+1, its head kept), else added now when MOON is on,
    of the kind ``--unknown-head`` names (:mod:`moonprune.heads`)."""
    if inputs.dense.head_layer:
        return inputs.dense.head_layer
    if cfg.moon.enabled:
        return add_unknown_output_(model, inputs.splits.train.x[:2].to(device), cfg.head_layer,
                                   cfg.moon.unknown_head)  # fmt: skip
    return None


def _train(
    model: nn.Module, head_layer: str | None, inputs: Inputs, cfg: CompressConfig,
    out: OutputDir, dist: Any, device: torch.device, callback: TrainCallback | None,
    resume: bool,
) -> tuple[TrainResult, dict[str, Any] | None]:  # fmt: skip
    """Fine-tune ``model`` with a masker, or prune its channels (then also the
    structure's record); an interrupted run with no state to resume leaves nothing."""
    try:
        if METHODS.is_structured(cfg.sparsity.method):
            head = head_layer or find_classifier(model, inputs.splits.train.x[:2].to(device))
            return train_channel_pruned(
                model,
                inputs.splits.train,
                head,
                cfg,
                callback if dist.is_main else None,
                dist,
                state_path=out.state_path,
                resume=resume,
            )
        masker = MASKERS.create(cfg.sparsity.method, cfg.sparsity.masker_config(cfg.train.seed))
        result = train(
            model,
            masker,
            inputs.splits.train,
            cfg.train,
            cfg.moon,
            state_path=out.state_path,
            resume=resume,
            callback=callback if dist.is_main else None,
            dist=dist,
        )
        return result, None
    except (Exception, KeyboardInterrupt):
        if dist.is_main and not out.state_path.exists():  # nothing to resume: leave nothing
            out.discard()
        raise


def _checkpoint(
    cfg: CompressConfig, inputs: Inputs, compressed: nn.Module, head_layer: str | None,
    result: TrainResult, assessment: Assessment, dense_metrics: dict[str, Any],
    structure_stats: dict[str, Any] | None,
) -> MoonpruneCheckpoint:  # fmt: skip
    """The compressed model with everything needed to deploy and re-verify it."""
    assert inputs.dense.arch is not None  # prepare_inputs checked it
    run = RunRecord(inputs.splits.preprocessing, cfg.score, cfg.tpr, assessment.threshold,
                    assessment.temperature, config=cfg)  # fmt: skip
    return MoonpruneCheckpoint(
        model=compressed.cpu(),
        arch=inputs.dense.arch,
        classes=inputs.splits.classes,
        run=run,
        head_layer=head_layer,
        masks=result.masks,
        structure=(
            module_structure(compressed) if structure_stats or inputs.dense.structure else None
        ),
        metrics={"dense": dense_metrics, "compressed": assessment.metrics},
        feature_stats=assessment.feature_stats,
    )


def _write_outputs(
    cfg: CompressConfig, inputs: Inputs, ckpt: MoonpruneCheckpoint, report: RunReport,
    facts: RunFacts, models: dict[str, nn.Module], assessments: dict[str, Assessment],
    synthesized: dict[str, np.ndarray], work: Path, t_start: float,
) -> tuple[list[str], RunReport]:  # fmt: skip
    """model.pt, model.onnx (with ``export``), report.json/.html and recipe.json written
    to ``work``. Returns the names, and the report with the export's record and timing."""
    files = {"model.pt": save_checkpoint(ckpt, work / "model.pt")}
    if cfg.export:
        t0 = time.perf_counter()
        files["model.onnx"], export = export_run(ckpt, inputs, work / "model.onnx", facts.sparsity)
        speed = None
        if facts.structure is not None:
            speed = deployed_speed(
                files["model.onnx"], models["dense"], assessments["dense"], inputs, cfg
            )
        report = report.with_export(export, speed, time.perf_counter() - t0)
    report = report.with_total(time.perf_counter() - t_start)
    write_json(report.to_json(), work / "report.json")
    write_html_report(
        work / "report.html",
        report,
        assessments,
        {name: layer_sparsity(model) for name, model in models.items()},
        synthesized,
    )
    write_json(cfg.as_dict(), work / "recipe.json")
    return [*files, "report.json", "report.html", "recipe.json"], report
