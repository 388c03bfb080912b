"""What a ``compress`` run reads, loaded and checked before any output is written.

:func:`prepare_inputs` loads the data and the model and checks they fit together;
:func:`input_paths` names what ``--out`` must never replace; :func:`training_settings`
is what a resumed run must share with the interrupted one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from moonprune.checkpoints import ArchSpec, DenseModel, load_dense
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
from moonprune.errors import CheckpointError, ConfigError
from moonprune.heads import output_width
from moonprune.normalization import NormalizationChoice, choose_normalization
from moonprune.reliability.scores import check_score
from moonprune.sparsity import MASKERS, METHODS
from moonprune.streaming import LazyImages
from moonprune.weights import ClassCountMismatch


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
    if not METHODS.is_structured(cfg.sparsity.method):  # an unknown name fails here
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
