"""Epoch-wise weight averaging ("voting", MOON_METHOD.md part 4) on torch's swa_utils.

In the last ``average_epochs`` epochs the learning rate sits at its floor and the
masks are frozen. During the first ``update_fraction`` of each such epoch's steps the
running average ``avg <- avg * (1 - 1/(n+1)) + current / (n+1)`` is updated (that is
:class:`torch.optim.swa_utils.AveragedModel`'s default equal-weight average; its first
update copies the model). At the end of every averaging epoch the averaged model's
BatchNorm statistics are recomputed on the training rows, shuffled and augmented by
``--augment`` as the training batches are (:func:`recompute_batchnorm`;
``EpochLoop._recalibration_batches``). Because every averaged weight is zero wherever
the (frozen) mask is zero, the average keeps the zeros.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def recompute_batchnorm(batches: Iterable[torch.Tensor], model: nn.Module) -> None:
    """Replace ``model``'s BatchNorm running statistics by those of ``batches``, each
    batch weighted by its rows, as the reference's ``bn_update`` does
    (openood/utils/average.py:35-65 of StevenBoys/MOON: statistics reset, then momentum
    ``b / (n + b)`` for a batch of ``b`` rows after ``n``). torch's ``update_bn`` weights
    every batch equally instead, which gives a small last batch (mnist5k 0-5: 8 rows
    after 7 batches of 256) an eighth of the statistics. The model's mode and momenta
    are restored."""
    layers = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not layers:
        return
    momenta = [m.momentum for m in layers]
    was_training = model.training
    for layer in layers:
        layer.reset_running_stats()
    model.train()
    seen = 0
    with torch.no_grad():
        for x in batches:
            for layer in layers:
                layer.momentum = len(x) / (seen + len(x))
            model(x)
            seen += len(x)
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    model.train(was_training)


class WeightAveraging:
    """Policy on top of ``AveragedModel``: when to update, when to recompute BN.

    Example::

        >>> import torch
        >>> model = torch.nn.Linear(2, 2)
        >>> averaging = WeightAveraging(start_epoch=1)
        >>> averaging.maybe_update(model, epoch=0, step_in_epoch=0, steps_per_epoch=10)
        False
        >>> averaging.maybe_update(model, epoch=1, step_in_epoch=0, steps_per_epoch=10)
        True
    """

    def __init__(self, start_epoch: int, update_fraction: float = 0.1) -> None:
        self.start_epoch = start_epoch
        self.update_fraction = update_fraction
        self.averaged: AveragedModel | None = None

    def is_active(self, epoch: int) -> bool:
        """True in the averaging epochs (``epoch >= start_epoch``)."""
        return epoch >= self.start_epoch

    def updates_per_epoch(self, steps_per_epoch: int) -> int:
        """How many of an epoch's first steps update the average (at least one)."""
        return max(1, math.ceil(self.update_fraction * steps_per_epoch))

    def maybe_update(
        self, model: nn.Module, epoch: int, step_in_epoch: int, steps_per_epoch: int
    ) -> bool:
        """Fold ``model`` into the average if this step is an averaging step."""
        if not self.is_active(epoch) or step_in_epoch >= self.updates_per_epoch(steps_per_epoch):
            return False
        if self.averaged is None:
            self.averaged = AveragedModel(model)
        self.averaged.update_parameters(model)
        return True

    def end_epoch(self, epoch: int, batches: Iterable[Any]) -> None:
        """Recompute the averaged model's BatchNorm statistics on ``batches``."""
        if self.averaged is not None and self.is_active(epoch):
            recompute_batchnorm(batches, self.averaged)

    def result(self) -> nn.Module | None:
        """The averaged network (the inner module, ready to save), or None if none yet."""
        return None if self.averaged is None else self.averaged.module

    def state_dict(self) -> dict[str, Any]:
        return {"averaged": None if self.averaged is None else self.averaged.state_dict()}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        """Restore; ``model`` is a network of the right shape to hold the average."""
        if state["averaged"] is None:
            self.averaged = None
            return
        self.averaged = AveragedModel(model)
        self.averaged.load_state_dict(state["averaged"])


def n_averaged(averaging: WeightAveraging) -> int:
    """How many snapshots are in the average (0 before averaging starts)."""
    if averaging.averaged is None:
        return 0
    return int(torch.as_tensor(averaging.averaged.n_averaged).item())
