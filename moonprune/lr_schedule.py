"""The learning-rate schedule of fine-tuning: a cosine from ``lr_peak_factor`` to
``lr_floor_factor`` over the main epochs, held at the floor during the averaging epochs,
times an optional linear warm-up. The factors multiply ``TrainConfig.lr``."""

from __future__ import annotations

import math

from moonprune.config import TrainConfig


def lr_factor(epoch_float: float, config: TrainConfig, main_epochs: int) -> float:
    """Cosine factor from ``lr_peak_factor`` to ``lr_floor_factor`` over ``main_epochs``,
    then held at the floor (the averaging epochs)."""
    if epoch_float >= main_epochs:
        return config.lr_floor_factor
    cos = 0.5 * (1 + math.cos(math.pi * epoch_float / main_epochs))
    return config.lr_floor_factor + (config.lr_peak_factor - config.lr_floor_factor) * cos


def lr_shape(
    epoch: int, step: int, steps_per_epoch: int, config: TrainConfig, main_epochs: int
) -> float:
    """The schedule's factor at this step: cosine (reference) times a linear warm-up
    over the first ``lr_warmup_epochs`` (reaching 1 at its last step)."""
    t = epoch + step / steps_per_epoch
    factor = lr_factor(t, config, main_epochs)
    if config.lr_warmup_epochs > 0:
        factor *= min(1.0, (t + 1 / steps_per_epoch) / config.lr_warmup_epochs)
    return factor
