"""What ``verify`` evaluates: the settings a checkpoint records or the caller overrides,
and the data they name (the seed's test split, or a held-out set evaluated whole)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moonprune.checkpoints import MoonpruneCheckpoint
from moonprune.data import ImageSet, ReadOptions, Splits, load_ood, load_splits
from moonprune.errors import ConfigError, MoonpruneError
from moonprune.streaming import concat_images

SPLITS = ("test", "all")


@dataclass(frozen=True)
class VerifyRequest:
    """The resolved settings of one ``verify`` run: the caller's, else the checkpoint's."""

    data: str
    ood: tuple[str, ...]
    split: str
    seed: int
    score: str
    tpr: float
    options: ReadOptions


@dataclass(frozen=True)
class VerifyData:
    """The rows evaluated, and the training split feature statistics are fitted on."""

    splits: Splits
    ood: dict[str, ImageSet]
    fit_on: ImageSet
    fitted_on: str


def resolve_request(
    ckpt: MoonpruneCheckpoint, data: str | None, ood: tuple[str, ...], split: str | None,
    seed: int | None, score: str | None, tpr: float | None, temperature: Any,
    workers: int | None,
) -> VerifyRequest:  # fmt: skip
    """The data spec, OOD sets, split, seed, score, TPR and read options to verify with:
    each given one, else the one ``ckpt`` records."""
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
    return VerifyRequest(data, tuple(ood), split, seed, score, tpr, options)


def load_verify_data(
    ckpt: MoonpruneCheckpoint, request: VerifyRequest, has_baseline: bool
) -> VerifyData:
    """The ID splits (all rows as the test set for ``split="all"``) and OOD sets of
    ``request`` in the checkpoint's input, and the split feature scores are fitted on."""
    data, seed, options = request.data, request.seed, request.options
    splits = load_splits(data, seed=seed, options=options, preprocessing=ckpt.preprocessing)
    if splits.num_classes != ckpt.num_known:
        raise ConfigError(
            f"the model knows {ckpt.num_known} classes but {data!r} has {splits.num_classes}; "
            "use the class subset the model was compressed on"
        )
    fit_on, fitted_on = splits.train, f"{data} (training split)"
    if request.split == "all":
        if ckpt.feature_stats is None or has_baseline:
            fit_on, fitted_on = _training_split(ckpt.config, seed, options, ckpt, fit_on, data)
        splits = whole(splits)
    ood_sets: dict[str, ImageSet] = {
        spec: load_ood(spec, ckpt.preprocessing, seed=seed, options=options) for spec in request.ood
    }
    return VerifyData(splits, ood_sets, fit_on, fitted_on)


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
