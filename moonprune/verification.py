"""``verify``: re-measure a compressed model and hold it to reliability gates.

A gate is a bound on one number: ``min_auroc`` / ``max_fpr95`` apply to every OOD
set, ``max_accuracy_drop`` / ``max_auroc_drop`` compare with a dense baseline
(``--baseline``), ``min_accuracy`` and ``max_ece`` are absolute. Verdicts use the
point estimate; the bootstrap interval is reported beside it, and a gate whose
bound lies inside the interval is flagged ``uncertain`` (noise could flip it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moonprune.assessment import Assessment, assess
from moonprune.checkpoints import (
    ArchSpec,
    MoonpruneCheckpoint,
    load_checkpoint,
    load_dense,
    measured_sparsity,
)
from moonprune.config import Gates
from moonprune.data import ImageSet, ReadOptions, Splits, load_ood, load_splits
from moonprune.errors import CheckpointError, ConfigError, MoonpruneError
from moonprune.heads import add_unknown_output_
from moonprune.outputs import check_output_path as check_output_path
from moonprune.outputs import write_json
from moonprune.reporting import layer_sparsity, write_html_report
from moonprune.sparsity.channel.structure import size_vs_dense
from moonprune.streaming import concat_images


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


@dataclass
class VerifyResult:
    """The report (DESIGN.md contract + gates), the checks, and the assessments."""

    report: dict[str, Any]
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
    cfg = ckpt.config
    split = _choose_split(split, data, cfg.get("data"), temperature)
    data = data or cfg.get("data")
    ood = ood or tuple(cfg.get("ood", ()))
    if not data:
        raise ConfigError("pass --data: the checkpoint does not record its data")
    if not ood:
        raise ConfigError("pass at least one --ood set (e.g. --ood noise)")
    seed = cfg.get("train", {}).get("seed", 0) if seed is None else seed
    score = score or ckpt.score
    tpr = ckpt.tpr if tpr is None else tpr
    if not 0 < tpr < 1:
        raise ConfigError(f"--tpr must be in (0, 1), got {tpr}")
    options = ReadOptions(
        tuple(cfg["image_size"]) if cfg.get("image_size") else None,
        cfg.get("channels"),
        cfg.get("on_bad_image", "skip"),
        workers,
    )
    splits = load_splits(data, seed=seed, options=options, preprocessing=ckpt.preprocessing)
    if splits.num_classes != ckpt.num_known:
        raise ConfigError(
            f"the model knows {ckpt.num_known} classes but {data!r} has {splits.num_classes}; "
            "use the class subset the model was compressed on"
        )
    fit_on, fitted_on = splits.train, f"{data} (training split)"
    if split == "all":
        if ckpt.feature_stats is None or baseline is not None:
            fit_on, fitted_on = _training_split(cfg, seed, options, ckpt, fit_on, data)
        splits = whole(splits)
    ood_sets: dict[str, ImageSet] = {
        spec: load_ood(spec, ckpt.preprocessing, seed=seed, options=options) for spec in ood
    }
    dense_model = None
    if baseline is not None:
        base_arch = ArchSpec(baseline_arch) if baseline_arch else _dense_arch(ckpt.arch)
        dense_model = load_dense(baseline, base_arch).model.eval()
    kwargs: dict[str, Any] = {"score": score, "tpr": tpr, "ece_bins": ece_bins,
                              "n_boot": n_boot, "seed": seed}  # fmt: skip
    t0 = time.perf_counter()
    t_model = ckpt.temperature if temperature is None else temperature
    t_dense = cfg.get("temperature", "auto") if temperature is None else temperature
    # on a held-out set the deployed threshold is measured, not recalibrated
    deployed = (score, tpr, t_model) == (ckpt.score, ckpt.tpr, ckpt.temperature)
    fixed = ckpt.threshold if split == "all" and deployed else None
    compressed = assess(
        ckpt.model, splits, ood_sets, temperature=t_model, threshold=fixed,
        feature_stats=ckpt.feature_stats, fit_on=fit_on, **kwargs,
    )  # fmt: skip
    compressed_s = time.perf_counter() - t0
    dense = None
    if dense_model is not None:
        dense = assess(dense_model, splits, ood_sets, temperature=t_dense, fit_on=fit_on,
                       **kwargs)  # fmt: skip
    timing = {"compressed_eval_s": compressed_s, "total_eval_s": time.perf_counter() - t0}
    checks = check_gates(gates, compressed, dense)
    models = {"compressed": compressed.metrics}
    ci = {"compressed": compressed.ci}
    if dense is not None:
        models["dense"] = dense.metrics
        ci["dense"] = dense.ci
    report = {
        "moonprune_version": ckpt.version,
        "method": cfg.get("sparsity", {}).get("method"),
        "moon": ckpt.has_unknown,
        "target_sparsity": None
        if cfg.get("sparsity", {}).get("method") == "channel"
        else cfg.get("sparsity", {}).get("sparsity"),
        "sparsity": measured_sparsity(ckpt.model),
        "structure": _structure(ckpt),
        "threshold": compressed.threshold,
        "checkpoint_threshold": ckpt.threshold,
        "temperature": compressed.temperature,
        "calibration": {
            name: {"temperature": a.temperature, "temperature_fit": a.temperature_record()}
            for name, a in (("dense", dense), ("compressed", compressed))
            if a is not None
        },
        "tpr": tpr,
        "score": score,
        "acceptance": compressed.acceptance,
        "models": models,
        "ci": ci,
        "scores": {
            name: a.score_table
            for name, a in (("dense", dense), ("compressed", compressed))
            if a is not None
        },
        "data": {
            "id": data,
            "ood": list(ood),
            "seed": seed,
            "split": split,
            "n_test": len(splits.test),
            # where the feature scores' statistics come from
            "features_fitted_on": {
                "compressed": "checkpoint" if ckpt.feature_stats else fitted_on,
                **({"dense": fitted_on} if dense is not None else {}),
            },
        },
        "gates": [c.as_dict() for c in checks],
        "passed": all(c.passed for c in checks),
        "timing": timing,
    }
    sparsity = {"compressed": layer_sparsity(ckpt.model)}
    if dense_model is not None:
        sparsity = {"dense": layer_sparsity(dense_model), **sparsity}
    return VerifyResult(report, checks, compressed, dense, sparsity)


SPLITS = ("test", "all")


def _training_split(
    cfg: dict[str, Any], seed: int, options: ReadOptions, ckpt: MoonpruneCheckpoint,
    fallback: ImageSet, data: str,
) -> tuple[ImageSet, str]:  # fmt: skip
    """The training split of the data ``cfg`` records (feature statistics are fitted on
    it when a held-out set is evaluated whole), and what it is; when that data cannot be
    read, ``fallback`` (the held-out set's own training split, which is also evaluated)."""
    recorded = cfg.get("data")
    if isinstance(recorded, str) and recorded:
        try:
            train = load_splits(recorded, seed=seed, options=options,
                                preprocessing=ckpt.preprocessing).train  # fmt: skip
            return train, f"{recorded} (training split)"
        except MoonpruneError:
            pass  # the recorded data moved: fall back, and say so in the report
    return fallback, f"{data} (training split, also evaluated: the recorded data is unreadable)"


def _choose_split(
    split: str | None, data: str | None, recorded: str | None, temperature: Any
) -> str:
    """``test`` (the seed's test split) for the data compressed on, ``all`` for another
    set: a held-out file is evaluated whole, so anyone can reproduce the numbers."""
    if split is None:
        split = "test" if data is None or data == recorded else "all"
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "all" and temperature == "auto":
        raise ConfigError(
            "--temperature auto fits T on a validation split, and --split all leaves none; "
            "use the checkpoint's temperature (drop --temperature) or give a number"
        )
    return split


def whole(splits: Splits) -> Splits:
    """Every row of ``splits`` as the test (and validation) set: a held-out data set."""
    parts = (splits.train, splits.val, splits.test)
    everything = ImageSet(
        splits.test.name,
        concat_images([p.x for p in parts]),
        torch.cat([p.y for p in parts]),
        splits.test.classes,
    )
    return Splits(everything, everything, everything, splits.preprocessing)


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
                write_json(result.report, target)
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
