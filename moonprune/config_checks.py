"""The range checks behind the config dataclasses' ``__post_init__``.

:mod:`moonprune.config` declares the fields and their defaults; this module holds what
makes a value acceptable, so each message (naming the field, the bad value and a fix)
is written once. The ``[sparsity]`` section checks itself, with the method options it
depends on (:mod:`moonprune.sparsity.config`).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import TYPE_CHECKING

from moonprune.augment import check_augment
from moonprune.errors import ConfigError
from moonprune.heads import UNKNOWN_HEADS
from moonprune.normalization import check_normalize
from moonprune.unknowns import check_unknowns

if TYPE_CHECKING:  # the dataclasses call these checks: no import at run time
    from moonprune.config import CompressConfig, Gates, MoonConfig, TrainConfig


def check_train(cfg: TrainConfig) -> None:
    """A :class:`TrainConfig` within its ranges (ConfigError naming the field)."""
    if cfg.epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {cfg.epochs}; e.g. --epochs 30")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed must be an integer in [0, 2**32), got {cfg.seed}")
    for name in ("lr", "lr_peak_factor", "lr_floor_factor"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a positive number, got {value}")
    if not 0 <= cfg.momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {cfg.momentum}")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise ConfigError(f"weight_decay must be >= 0, got {cfg.weight_decay}")
    if not 0 < cfg.update_end <= 1:
        raise ConfigError(f"update_end must be in (0, 1], got {cfg.update_end}")
    if not (math.isfinite(cfg.lr_warmup_epochs) and cfg.lr_warmup_epochs >= 0):
        raise ConfigError(f"lr_warmup_epochs must be >= 0, got {cfg.lr_warmup_epochs}")
    check_augment(cfg.augment)
    if cfg.max_rollbacks < 0:
        raise ConfigError(f"max_rollbacks must be >= 0, got {cfg.max_rollbacks}")
    if not (math.isfinite(cfg.divergence_factor) and cfg.divergence_factor > 1):
        raise ConfigError(f"divergence_factor must be > 1, got {cfg.divergence_factor}")


def check_moon(cfg: MoonConfig) -> None:
    """A :class:`MoonConfig` within its ranges."""
    check_unknowns(cfg.unknowns, cfg.unknowns_fraction, cfg.unknowns_weight)
    if cfg.unknown_head not in UNKNOWN_HEADS:
        raise ConfigError(f"unknown_head must be mean or separate, got {cfg.unknown_head!r}")
    if cfg.warmup_epochs < 0:
        raise ConfigError(f"warmup_epochs must be >= 0, got {cfg.warmup_epochs}")
    if not (math.isfinite(cfg.init_factor) and cfg.init_factor > 0):
        raise ConfigError(f"init_factor must be > 0, got {cfg.init_factor}")
    if not (math.isfinite(cfg.a_final) and cfg.a_final >= 0):
        raise ConfigError(f"a_final must be >= 0, got {cfg.a_final}")
    if cfg.average_epochs is not None and cfg.average_epochs < 0:
        raise ConfigError(f"average_epochs must be >= 0, got {cfg.average_epochs}")
    if not 0 < cfg.average_fraction <= 1:
        raise ConfigError(f"average_fraction must be in (0, 1], got {cfg.average_fraction}")


def check_gates(cfg: Gates) -> None:
    """Every bound of :class:`Gates` a finite fraction; a percentage is named as such."""
    for name, value in asdict(cfg).items():
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"--{name.replace('_', '-')} must be a number, got {value}")
        if value is not None and not 0 <= value <= 1:
            hint = f"; did you mean {value / 100:.2f}?" if 1.5 < value <= 100 else ""
            raise ConfigError(
                f"--{name.replace('_', '-')} must be a fraction in [0, 1] (e.g. 0.9), "
                f"got {value}{hint}"
            )


def check_compress(cfg: CompressConfig) -> None:
    """The top-level fields of :class:`CompressConfig` (its sections check themselves)."""
    if not 0 < cfg.tpr < 1:
        raise ConfigError(f"tpr must be in (0, 1), got {cfg.tpr}; e.g. --tpr 0.95")
    if cfg.temperature != "auto" and not (
        isinstance(cfg.temperature, int | float)
        and math.isfinite(cfg.temperature)
        and cfg.temperature > 0
    ):
        raise ConfigError(
            f"temperature must be 'auto' or a number > 0, got {cfg.temperature!r}; "
            "1 turns temperature scaling off"
        )
    if cfg.ece_bins < 1:
        raise ConfigError(f"ece_bins must be >= 1, got {cfg.ece_bins}")
    check_normalize(cfg.normalize)
    if not 1 <= cfg.knn_k <= cfg.feature_bank:
        raise ConfigError(
            f"knn_k ({cfg.knn_k}) must be >= 1 and at most feature_bank "
            f"({cfg.feature_bank}); e.g. knn_k = 10, feature_bank = 2000"
        )
    if cfg.image_size is not None and (len(cfg.image_size) != 2 or min(cfg.image_size) < 1):
        raise ConfigError(f"image_size must be [height, width], got {cfg.image_size}")
    if cfg.channels not in (None, 1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {cfg.channels}")
    if cfg.on_bad_image not in ("skip", "fail"):
        raise ConfigError(f"on_bad_image must be 'skip' or 'fail', got {cfg.on_bad_image!r}")
    if cfg.workers is not None and (isinstance(cfg.workers, bool) or cfg.workers < 0):
        raise ConfigError(f"workers must be 0 or more, got {cfg.workers}")
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {cfg.device!r}")
