"""``compress``: checkpoint -> K+1 head -> sparse MOON fine-tuning -> report -> export.

Each stage is its own module; this one only wires them together, validates every
input *before* any output is written, and writes the outputs atomically.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
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
    ArchSpec,
    DenseModel,
    MoonpruneCheckpoint,
    load_dense,
    measured_sparsity,
    save_checkpoint,
)
from moonprune.config import CompressConfig
from moonprune.data import (
    ImageSet,
    ReadOptions,
    Splits,
    load_ood,
    make_splits,
    parse_spec,
    read_split_images,
)
from moonprune.distributed import DistContext, from_env
from moonprune.errors import CheckpointError, ConfigError
from moonprune.feature_scores import FeatureOptions
from moonprune.heads import add_unknown_output_, find_classifier, output_width
from moonprune.normalization import NormalizationChoice, choose_normalization
from moonprune.outputs import OutputDir, write_json
from moonprune.reliability.scores import check_score
from moonprune.reporting import layer_sparsity, unknowns_summary, write_html_report
from moonprune.sparsity import MASKERS
from moonprune.sparsity.channel.settings import check_channel_config
from moonprune.sparsity.channel.structure import module_structure
from moonprune.sparsity.channel.training import train_channel_pruned
from moonprune.streaming import LazyImages
from moonprune.training import TrainCallback, train
from moonprune.verification import GateCheck, check_gates
from moonprune.weights import ClassCountMismatch

logger = logging.getLogger(__name__)
CHANNEL = "channel"


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
    report: dict[str, Any]
    checkpoint: MoonpruneCheckpoint
    files: dict[str, Path] = field(default_factory=dict)
    checks: list[GateCheck] = field(default_factory=list)


@dataclass
class Inputs:
    """Everything validated and loaded before training starts."""

    dense: DenseModel
    splits: Splits
    ood: dict[str, ImageSet]
    normalization: NormalizationChoice


def prepare_inputs(
    cfg: CompressConfig, dense: DenseModel | None = None, device: torch.device | None = None
) -> Inputs:
    """Load data and model and check they fit together (class count, input shape), then
    normalise the data as the model expects (``cfg.normalize``, evaluated on ``device``)."""
    options = ReadOptions(cfg.image_size, cfg.channels, cfg.on_bad_image, cfg.workers)
    parts = read_split_images(cfg.data, seed=cfg.train.seed, options=options)
    splits = make_splits(cfg.data, parts)
    if dense is None:
        arch = None
        if cfg.arch:
            pre = splits.preprocessing
            arch = ArchSpec(cfg.arch, dict(cfg.arch_kwargs)).with_defaults(
                num_classes=splits.num_classes, in_channels=pre.channels
            )
        dense = _load_for_data(cfg, arch, splits)
    if dense.preprocessing is not None:  # a moonprune checkpoint keeps its own inputs
        splits = make_splits(cfg.data, parts, dense.preprocessing)
    try:
        width = output_width(dense.model, splits.train.x[:2])
    except RuntimeError as exc:
        raise CheckpointError(
            f"the model cannot run on the data's input of shape "
            f"{tuple(splits.train.x.shape[1:])}: {str(exc).splitlines()[0]}; check --arch and "
            "the data"
        ) from None
    expected = splits.num_classes + (1 if dense.head_layer else 0)
    if dense.head_layer and not cfg.moon.enabled:
        raise ConfigError(
            "the starting model already has the unknown output (a moonprune checkpoint); "
            "continue with MOON (drop --no-moon) or start from the dense model"
        )
    if width != expected:
        raise CheckpointError(
            f"the model has {width} outputs but the data {cfg.data!r} has "
            f"{splits.num_classes} classes; pick a matching class subset (e.g. "
            f"{cfg.data.partition(':')[0]}:0-{width - 1}) or the right checkpoint"
        )
    if dense.arch is None:
        raise CheckpointError(
            "a whole pickled module cannot be rebuilt for the saved checkpoint; "
            "also pass --arch package.module:factory"
        )
    check_score(cfg.score)
    if cfg.sparsity.method != CHANNEL:
        MASKERS.create(cfg.sparsity.method, cfg.sparsity.masker_config(cfg.train.seed))
    if device is not None:  # the candidates are evaluated where the model will train
        dense.model.to(device)
    choice = choose_normalization(
        dense.model,
        parts["val"],
        splits.preprocessing,
        cfg.normalize,
        splits.num_classes,
        dense.preprocessing,
    )
    if choice.preprocessing != splits.preprocessing:
        splits = make_splits(cfg.data, parts, choice.preprocessing)
    ood = {
        spec: load_ood(spec, splits.preprocessing, seed=cfg.train.seed, options=options)
        for spec in cfg.ood
    }
    return Inputs(dense, splits, ood, choice)


def _load_for_data(cfg: CompressConfig, arch: ArchSpec | None, splits: Splits) -> DenseModel:
    """:func:`load_dense`; when ``num_classes`` was taken from the data (not given by the
    user), a classifier of another width means the data is the thing to change."""
    try:
        return load_dense(cfg.checkpoint, arch, cfg.trust_checkpoint, splits.train.x[:2])
    except ClassCountMismatch as exc:
        if "num_classes" in cfg.arch_kwargs or exc.model_classes != splits.num_classes:
            raise
        n, name = exc.checkpoint_classes, parse_spec(cfg.data)[0]
        raise CheckpointError(
            f"the checkpoint has {n} classes but the data {cfg.data!r} has "
            f"{splits.num_classes}; pick a class subset such as {name}:0-{n - 1}, or the "
            "right checkpoint"
        ) from None


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


def _assess(model: nn.Module, inputs: Inputs, cfg: CompressConfig) -> Calibrated:
    """Assess ``model`` at T = 1 and at its temperature (fitted on val, or given)."""
    options = FeatureOptions(cfg.feature_bank, cfg.knn_k, cfg.train.seed)
    logits = collect(model, inputs.splits, inputs.ood, options=options)
    choice = choose_temperature(cfg.temperature, logits.val, inputs.splits.val.y)
    kwargs: dict[str, Any] = {"score": cfg.score, "tpr": cfg.tpr, "ece_bins": cfg.ece_bins,
                              "seed": cfg.train.seed}  # fmt: skip
    after = assess_logits(logits, inputs.splits, temperature=choice, **kwargs)
    before = after if choice.used == 1.0 else assess_logits(logits, inputs.splits, **kwargs)
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
        >>> abs(result.report["sparsity"] - 0.9) < 0.005
        True
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


def input_paths(cfg: CompressConfig) -> list[str]:
    """The files and folders a run reads (``--out`` must not replace any of them)."""
    specs = [cfg.data, *cfg.ood]  # "folder:0-3" names the folder before the colon
    return [cfg.checkpoint, *specs, *(s.rpartition(":")[0] for s in specs if ":" in s)]


#: Settings that do not change the trained weights (a resumed run may change them).
_NOT_TRAINING = ("out", "ood", "gates", "export", "device", "score", "tpr", "temperature",
                 "ece_bins", "trust_checkpoint", "feature_bank", "knn_k", "workers")  # fmt: skip


def training_settings(cfg: CompressConfig, splits: Splits) -> dict[str, Any]:
    """What shapes the trained weights: the settings, and a digest of the training rows
    (a data folder whose images changed is other data under the same name)."""
    digest = hashlib.sha256()
    x = splits.train.x
    if isinstance(x, LazyImages):  # the files' names, sizes and times, not the pixels
        digest.update(x.fingerprint())
    else:
        digest.update(x.detach().cpu().contiguous().numpy().tobytes())
    digest.update(splits.train.y.detach().cpu().contiguous().numpy().tobytes())
    settings = {k: v for k, v in cfg.as_dict().items() if k not in _NOT_TRAINING}
    return {**settings, "training_data_sha256": digest.hexdigest()}


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
    assert inputs.dense.arch is not None  # prepare_inputs checked it
    # settings that cannot train fail now, before the minutes of dense evaluation
    check_batch_size(dense_model, cfg.train.batch_size, dist.world_size)
    if cfg.sparsity.method == CHANNEL:
        check_channel_config(cfg)
    t0 = time.perf_counter()
    dense_calibrated = _assess(dense_model, inputs, cfg)
    dense_assessment = dense_calibrated.after
    dense_eval_s = time.perf_counter() - t0

    model = copy.deepcopy(dense_model)
    head_layer = None
    if inputs.dense.head_layer:  # continuing from a moonprune checkpoint: already K+1
        head_layer = inputs.dense.head_layer
    elif cfg.moon.enabled:
        head_layer = add_unknown_output_(
            model, inputs.splits.train.x[:2].to(device), cfg.head_layer
        )
    structure_stats: dict[str, Any] | None = None
    work = out.open() if dist.is_main else out.work
    if dist.is_main and not resume:
        out.save_settings(settings)
    try:
        t0 = time.perf_counter()
        if cfg.sparsity.method == CHANNEL:
            head = head_layer or find_classifier(model, inputs.splits.train.x[:2].to(device))
            result, structure_stats = train_channel_pruned(
                model,
                inputs.splits.train,
                head,
                cfg,
                callback if dist.is_main else None,
                dist,
                state_path=out.state_path,
                resume=resume,
            )
        else:
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
        train_s = time.perf_counter() - t0
    except (Exception, KeyboardInterrupt):
        if dist.is_main and not out.state_path.exists():  # nothing to resume: leave nothing
            out.discard()
        raise
    compressed = result.model.eval()
    unknowns, synthesized = unknowns_summary(
        compressed, inputs.splits.val, cfg.moon, cfg.train.seed
    )
    calibrated = _assess(compressed, inputs, cfg)
    assessment = calibrated.after
    dense_metrics, compressed_metrics = dense_assessment.metrics, assessment.metrics
    checks = check_gates(cfg.gates, assessment, dense_assessment) if cfg.gates.any else []
    sparsity = measured_sparsity(compressed)
    report: dict[str, Any] = {
        "moonprune_version": _version(),
        "structure": structure_stats,
        "method": cfg.sparsity.method,
        "moon": cfg.moon.enabled,
        "unknowns": unknowns,
        # channel runs aim at a MAC or parameter fraction (in "structure"), not at zeros
        "target_sparsity": None if structure_stats else cfg.sparsity.sparsity,
        "sparsity": sparsity,
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
            "dense_eval_s": dense_eval_s,
            "train_s": train_s,
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
    ckpt = MoonpruneCheckpoint(
        model=compressed.cpu(),
        arch=inputs.dense.arch,
        classes=inputs.splits.classes,
        preprocessing=inputs.splits.preprocessing,
        head_layer=head_layer,
        masks=result.masks,
        threshold=assessment.threshold,
        temperature=assessment.temperature,
        structure=(
            module_structure(compressed) if structure_stats or inputs.dense.structure else None
        ),
        tpr=cfg.tpr,
        score=cfg.score,
        config=cfg.as_dict(),
        metrics={"dense": dense_metrics, "compressed": compressed_metrics},
        feature_stats=assessment.feature_stats,
    )
    if not dist.is_main:  # data-parallel: rank 0 writes the outputs
        return CompressResult(out.final, report, ckpt, {}, checks)
    files = {"model.pt": save_checkpoint(ckpt, work / "model.pt")}
    if cfg.export:
        t0 = time.perf_counter()
        files["model.onnx"], report["export"] = _export(ckpt, inputs, work / "model.onnx", sparsity)
        if structure_stats is not None:
            report["structure"]["speed"] = _deployed_speed(
                files["model.onnx"], dense_model, dense_assessment, inputs, cfg
            )
        report["timing"]["export_s"] = time.perf_counter() - t0
    report["timing"]["total_s"] = time.perf_counter() - t_start
    write_json(report, work / "report.json")
    write_html_report(
        work / "report.html",
        report,
        {"dense": dense_assessment, "compressed": assessment},
        {"dense": layer_sparsity(dense_model), "compressed": layer_sparsity(compressed)},
        synthesized,
    )
    write_json(cfg.as_dict(), work / "recipe.json")
    final = out.commit()
    files = {name: final / name for name in [*files, "report.json", "report.html", "recipe.json"]}
    return CompressResult(final, report, ckpt, files, checks)


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


def _export(
    ckpt: MoonpruneCheckpoint, inputs: Inputs, path: Path, sparsity: float
) -> tuple[Path, dict[str, Any]]:
    from moonprune.exporters import export_onnx

    assert ckpt.threshold is not None
    export_report = export_onnx(
        ckpt.model,
        path,
        num_known=ckpt.num_known,
        input_shape=ckpt.preprocessing.input_shape,
        threshold=ckpt.threshold,
        tpr=ckpt.tpr,
        score=ckpt.score,
        classes=list(ckpt.classes),
        preprocessing=ckpt.preprocessing.as_dict(),
        sparsity=sparsity,
        temperature=ckpt.temperature,
        example_inputs=inputs.splits.val.x[:64],
        feature_stats=ckpt.feature_stats,
    )
    return path, export_report.as_dict()


def _deployed_speed(
    path: Path, dense_model: nn.Module, dense: Assessment, inputs: Inputs, cfg: CompressConfig
) -> dict[str, Any]:
    """The exported channel-pruned file timed against the dense model exported with the
    same rejector (score, and the dense model's own threshold and statistics), at batch
    1 and ``--latency-batch`` (:func:`moonprune.speed.time_speedups`)."""
    import tempfile

    from moonprune.exporters import export_onnx
    from moonprune.speed import default_threads, time_speedups

    threads = cfg.sparsity.threads or default_threads()
    batches = tuple(dict.fromkeys((1, cfg.sparsity.latency_batch)))
    with tempfile.TemporaryDirectory(prefix="moonprune-dense-") as tmp:
        dense_path = Path(tmp) / "dense.onnx"
        export_onnx(copy.deepcopy(dense_model).cpu(), dense_path,
                    num_known=len(inputs.splits.classes),
                    input_shape=inputs.splits.preprocessing.input_shape,
                    threshold=dense.threshold, score=cfg.score,
                    temperature=dense.temperature, example_inputs=inputs.splits.val.x[:64],
                    feature_stats=dense.feature_stats)  # fmt: skip
        measured = time_speedups(dense_path, {"model": path}, batches, threads)["model"]
    return {"speedup": {str(b): v for b, v in measured.items()}, "threads": threads,
            "compared_with": "the dense model exported with the same rejector"}  # fmt: skip


def _version() -> str:
    from moonprune import __version__

    return __version__
