"""The MOON objective: the unknown-aware loss (pure) and the auto-tuned schedule of ``a``.

Notation (MOON_METHOD.md, parts 2-3), for logits ``z`` of shape ``(N, K + 1)`` with
the unknown class at column ``K`` and labels ``y`` in ``[0, K)``:

    h_i    = CE(softmax(z_i), y_i)                         per-sample cross-entropy
    p_u,i  = min(softmax(z_i)[K], 1 - 1e-7)
    c_i    = 1 if argmax_j z_ij == y_i (over all K+1), else 0
    w_i    = c_i + (1 - c_i) * (1 + a / (1 + a * p_u,i))
    loss   = mean_i(h_i * w_i)

    t      = mean_i((1 - p_u,i) * h_i)   (no gradient), tracked every batch
    ewma  <- 0.05 * t + 0.95 * ewma      (first value: t)

The gradient flows through ``p_u`` inside ``w``; only ``c`` and ``a`` are constants.
That is the reference's loss (StevenBoys/MOON, ``openood/losses/extra_c_loss.py``):
lines 83-86 take ``h_c`` and ``p_out_abstain`` from ``F.log_softmax(input_batch)`` with
their graph, lines 88-91 build ``correct`` from ``topk`` indices (no gradient), lines
97-102 clamp with ``torch.min(p_out_abstain, Variable(torch.Tensor([1. - epsilon])))``
(a constant), line 123 makes ``alpha_var`` a leaf, and lines 133-134 are
``pred_out_bound = (1 + alpha_var * 1 / (1 + alpha_var * p_out_abstain)) * (1 - correct)
+ correct`` and ``loss = (h_c * pred_out_bound).mean()``. For a misclassified row,

    dL/dz_u = p_u * (w - h * a^2 * (1 - p_u) / (1 + a * p_u)^2)
           ~= p_u * (1 + a - a^2 * h)          (p_u small)

so the unknown logit rises when ``h > (1 + a) / a^2``: confusable rows are pushed to
the unknown class. (A detached ``w`` would leave ``dL/dz_u = w * p_u > 0``.)

``reduction="sum"`` gives ``sum_i`` instead of ``mean_i``: data-parallel training
sums over each rank's rows and divides by the global row count, so a batch split
unevenly over the ranks still gives the mean over the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from moonprune.errors import CheckpointError, ConfigError

P_UNKNOWN_MAX = 1.0 - 1e-7
EWMA_MOMENTUM = 0.05

Reduction = Literal["mean", "sum"]
"""How per-sample values become one: ``mean`` over the rows, or their ``sum``."""


def unknown_probability(logits: torch.Tensor) -> torch.Tensor:
    """``(N,)`` softmax probability of the unknown column (the last), at most ``1 - 1e-7``.

    The bound is ``torch.minimum`` against a constant, as in the reference: the
    gradient flows to ``p_u`` below the bound and not above it.
    """
    p_u = torch.softmax(logits, dim=-1)[:, -1]
    return torch.minimum(p_u, p_u.new_tensor(P_UNKNOWN_MAX))


def unknown_aware_loss(
    logits: torch.Tensor, target: torch.Tensor, a: float, reduction: Reduction = "mean"
) -> torch.Tensor:
    """MOON's loss ``mean(h * w)`` (or ``sum(h * w)``) for ``(N, K+1)`` logits and
    ``(N,)`` labels < K. The sum over ``N = 0`` rows is 0 (the mean would be NaN).

    ``w`` keeps its graph through ``p_u`` (module docstring); ``a`` and the argmax test
    are constants.

    Example::

        >>> import torch
        >>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])   # K = 2, unknown last
        >>> target = torch.tensor([0, 0])                              # row 2 is misclassified
        >>> weighted = unknown_aware_loss(logits, target, a=1.0)
        >>> bool(weighted > unknown_aware_loss(logits, target, a=0.0))
        True
    """
    h = F.cross_entropy(logits, target, reduction="none")
    p_u = unknown_probability(logits)
    correct = logits.detach().argmax(dim=-1) == target
    weight = torch.where(correct, torch.ones_like(p_u), 1.0 + a / (1.0 + a * p_u))
    weighted = h * weight
    return weighted.sum() if reduction == "sum" else weighted.mean()


def moon_loss(
    logits: torch.Tensor, target: torch.Tensor, a: float | None, reduction: Reduction = "mean"
) -> torch.Tensor:
    """The training loss at ``a`` (:meth:`MoonSchedule.a_for`): cross-entropy while ``a``
    is ``None`` (warm-up), else :func:`unknown_aware_loss`. Pure: a loop that calls
    :meth:`MoonSchedule.observe` itself computes its loss with this.

    Example::

        >>> import torch
        >>> logits, target = torch.zeros(2, 3), torch.tensor([0, 1])
        >>> bool(moon_loss(logits, target, None) == F.cross_entropy(logits, target))
        True
    """
    if a is None:
        return F.cross_entropy(logits, target, reduction=reduction)
    return unknown_aware_loss(logits, target, a, reduction)


def threshold_statistic(
    logits: torch.Tensor, target: torch.Tensor, reduction: Reduction = "mean"
) -> float:
    """``t = mean((1 - p_u) * h)`` over the batch (or the ``sum``), without gradient.

    Example::

        >>> import torch
        >>> round(threshold_statistic(torch.zeros(2, 3), torch.tensor([0, 1])), 4)   # (2/3)*ln 3
        0.7324
    """
    with torch.no_grad():
        h = F.cross_entropy(logits, target, reduction="none")
        values = (1.0 - unknown_probability(logits)) * h
        return float(values.sum() if reduction == "sum" else values.mean())


@dataclass(frozen=True)
class MoonScheduleConfig:
    """Reference settings: 5 warm-up epochs, init factor 64, ``a`` ramps to 1.0.

    Example::

        >>> MoonScheduleConfig(total_epochs=100).init_factor
        64.0
    """

    total_epochs: int
    warmup_epochs: int = 5
    init_factor: float = 64.0
    a_final: float = 1.0

    def __post_init__(self) -> None:
        if self.total_epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.total_epochs}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.init_factor <= 0:
            raise ConfigError(f"init_factor must be > 0, got {self.init_factor}")
        if self.a_final < 0:
            raise ConfigError(f"a_final must be >= 0, got {self.a_final}")


class MoonSchedule:
    """The auto-tuned weight ``a``, advanced by the loop: :meth:`observe` each batch, then
    :meth:`a_for` its epoch, then the pure :func:`moon_loss` (or :meth:`loss`, which does
    the three).

    Epochs are 0-based; ``T = total_epochs``, ``W = warmup_epochs``.

    - Epochs ``0 .. W - 1``: plain mean cross-entropy; ``ewma`` is tracked.
    - First batch after warm-up (epoch ``e0``, normally ``W``): ``a0 = ewma / init_factor``
      and ``step = (a_final - a0) / (T - 1 - e0)``.
    - Epoch ``e >= e0`` trains with ``a = a0 + (e - e0) * step`` throughout: the step is
      added at the first batch of each later epoch, so the last epoch ``T - 1`` trains
      with ``a_final`` exactly.

    This is the reference's ramp (StevenBoys/MOON, ``openood/losses/extra_c_loss.py``,
    epochs counted from 1 by ``openood/pipelines/train_pipeline.py:122,140``): line 52
    (``epoch <= self.learn_epochs``) is warm-up, lines 123-125 set ``alpha_var =
    alpha_thresh_ewma / alpha_init_factor`` and ``alpha_inc = (alpha_final - alpha_var) /
    (total_epochs - epoch)`` at the first batch after it, and lines 129-131 add
    ``alpha_inc`` at the first batch of each later epoch (``if epoch > alpha_set_epoch``).
    With 1-based epochs ``total_epochs - epoch`` is our ``T - 1 - e0``. When warm-up
    leaves one epoch (``e0 = T - 1``) that epoch trains with ``a0``, as in the reference
    (whose step divides by zero there and is never used); ``step`` is then 0. When
    ``T <= W`` the loss stays cross-entropy.

    Example::

        >>> import torch
        >>> schedule = MoonSchedule(MoonScheduleConfig(total_epochs=3, warmup_epochs=1))
        >>> logits, target = torch.zeros(4, 3), torch.tensor([0, 1, 0, 1])
        >>> loss = schedule.loss(logits, target, epoch=0)   # warm-up: cross-entropy
        >>> schedule.a is None
        True
        >>> loss = schedule.loss(logits, target, epoch=1)   # a = ewma / 64
        >>> round(schedule.a * 64 / schedule.ewma, 6)
        1.0
        >>> schedule.a_for(2)                               # the last epoch: a_final
        1.0
    """

    def __init__(
        self,
        config: MoonScheduleConfig,
        all_reduce_sum: Callable[[list[float]], list[float]] | None = None,
    ) -> None:
        """``all_reduce_sum`` (data-parallel only) sums values over all ranks, so that
        ``t`` is the mean over the global batch rather than over this rank's rows."""
        self.config = config
        self._all_reduce_sum = all_reduce_sum
        self.ewma: float | None = None
        self.a_start: float | None = None
        """``a0``: ``a`` of the ramp's first epoch (``None`` until warm-up ends)."""
        self.ramp_epoch: int | None = None
        """``e0``: the first epoch after warm-up that was observed."""
        self.a: float | None = None
        """``a`` of the epoch last observed: what its batches train with."""

    @property
    def a_step(self) -> float:
        """``(a_final - a0) / (T - 1 - e0)``: the per-epoch increment (0 before the ramp)."""
        if self.a_start is None or self.ramp_epoch is None:
            return 0.0
        span = self.config.total_epochs - 1 - self.ramp_epoch
        return (self.config.a_final - self.a_start) / span if span > 0 else 0.0

    def observe(self, logits: torch.Tensor, target: torch.Tensor, epoch: int) -> None:
        """Update the EWMA threshold statistic with one batch of ``epoch``; the first
        batch after warm-up also fixes the ramp (``a0`` from the updated ``ewma``).

        Data-parallel, rank ``r`` holds ``n_r`` of the batch's rows (possibly none), and
        ``t = sum_r S_r / sum_r n_r`` with ``S_r`` the sum of ``(1 - p_u) * h`` over them:
        the single-process mean, whatever the split (an equal-weight mean of the
        per-rank means would not be)."""
        if self._all_reduce_sum is None:
            t = threshold_statistic(logits, target)
        else:
            local = [threshold_statistic(logits, target, reduction="sum"), float(len(target))]
            total, count = self._all_reduce_sum(local)
            t = total / count
        ewma = t if self.ewma is None else EWMA_MOMENTUM * t + (1 - EWMA_MOMENTUM) * self.ewma
        self.ewma = ewma
        if epoch >= self.config.warmup_epochs and self.a_start is None:
            self.a_start = ewma / self.config.init_factor
            self.ramp_epoch = epoch
        self.a = self.a_for(epoch)

    def a_for(self, epoch: int) -> float | None:
        """``a`` for the batches of ``epoch``, or ``None`` (cross-entropy) during warm-up
        and before the ramp is fixed. Pure: written as ``(1 - f) * a0 + f * a_final``
        with ``f = (epoch - e0) / (T - 1 - e0)``, which is ``a0 + (epoch - e0) * step``
        and gives ``a_final`` exactly at the last epoch."""
        if epoch < self.config.warmup_epochs or self.a_start is None or self.ramp_epoch is None:
            return None
        span = self.config.total_epochs - 1 - self.ramp_epoch
        if span <= 0:
            return self.a_start
        f = (epoch - self.ramp_epoch) / span
        return (1.0 - f) * self.a_start + f * self.config.a_final

    def loss(
        self, logits: torch.Tensor, target: torch.Tensor, epoch: int, reduction: Reduction = "mean"
    ) -> torch.Tensor:
        """:meth:`observe` the batch, then the training loss for ``epoch`` (0-based) at
        :meth:`a_for` ``(epoch)``, reduced over the batch's rows by ``reduction``."""
        self.observe(logits, target, epoch)
        return moon_loss(logits, target, self.a_for(epoch), reduction)

    def end_epoch(self, epoch: int) -> None:
        """Nothing to do: ``a`` moves at the first batch of the next epoch (kept so that a
        loop may call it at every epoch's end)."""
        del epoch

    def state_dict(self) -> dict[str, Any]:
        return {
            "ewma": self.ewma,
            "a": self.a,
            "a_step": self.a_step,
            "a_start": self.a_start,
            "ramp_epoch": self.ramp_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "a_start" not in state:
            raise CheckpointError(
                "this MOON schedule state was written by an older moonprune, whose ramp of "
                "a ended one epoch short; start the run again instead of resuming it"
            )
        self.ewma = state["ewma"]
        self.a = state["a"]
        self.a_start = state["a_start"]
        self.ramp_epoch = None if state["ramp_epoch"] is None else int(state["ramp_epoch"])
