"""The MOON objective: the unknown-aware loss (pure) and the auto-tuned schedule of ``a``.

Notation (MOON_METHOD.md, parts 2-3), for logits ``z`` of shape ``(N, K + 1)`` with
the unknown class at column ``K`` and labels ``y`` in ``[0, K)``:

    h_i    = CE(softmax(z_i), y_i)                         per-sample cross-entropy
    p_u,i  = min(softmax(z_i)[K], 1 - 1e-7)
    w_i    = 1                           if argmax_j z_ij == y_i  (over all K+1)
           = 1 + a / (1 + a * p_u,i)     otherwise
    loss   = mean_i(h_i * w_i)

    t      = mean_i((1 - p_u,i) * h_i)   (no gradient), tracked every batch
    ewma  <- 0.05 * t + 0.95 * ewma      (first value: t)

The weights ``w`` are treated as constants (no gradient flows through ``p_u`` in
``w``), as in the reference, which computes them from detached probabilities.

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

from moonprune.errors import ConfigError

P_UNKNOWN_MAX = 1.0 - 1e-7
EWMA_MOMENTUM = 0.05

Reduction = Literal["mean", "sum"]
"""How per-sample values become one: ``mean`` over the rows, or their ``sum``."""


def unknown_probability(logits: torch.Tensor) -> torch.Tensor:
    """``(N,)`` softmax probability of the unknown column (the last), clamped below 1."""
    return torch.softmax(logits, dim=-1)[:, -1].clamp(max=P_UNKNOWN_MAX)


def unknown_aware_loss(
    logits: torch.Tensor, target: torch.Tensor, a: float, reduction: Reduction = "mean"
) -> torch.Tensor:
    """MOON's loss ``mean(h * w)`` (or ``sum(h * w)``) for ``(N, K+1)`` logits and
    ``(N,)`` labels < K. The sum over ``N = 0`` rows is 0 (the mean would be NaN).

    Example::

        >>> import torch
        >>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])   # K = 2, unknown last
        >>> target = torch.tensor([0, 0])                              # row 2 is misclassified
        >>> weighted = unknown_aware_loss(logits, target, a=1.0)
        >>> bool(weighted > unknown_aware_loss(logits, target, a=0.0))
        True
    """
    h = F.cross_entropy(logits, target, reduction="none")
    with torch.no_grad():
        p_u = unknown_probability(logits)
        correct = logits.argmax(dim=-1) == target
        weight = torch.where(correct, torch.ones_like(p_u), 1.0 + a / (1.0 + a * p_u))
    weighted = h * weight
    return weighted.sum() if reduction == "sum" else weighted.mean()


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
    """The auto-tuned weight ``a``: the loop calls :meth:`loss` per batch, :meth:`end_epoch`.

    - Epochs ``0 .. warmup_epochs - 1``: plain mean cross-entropy; ``ewma`` is tracked.
    - First step after warm-up (epoch ``e0``): ``a = ewma / init_factor`` and
      ``step = (a_final - a) / (total_epochs - e0)``.
    - At the end of every epoch from ``e0`` on, ``a += step``; so ``a`` equals
      ``a_final`` when the last epoch ends (the last epoch trains with
      ``a_final - step``), as in the reference. ``total_epochs - e0 >= 1`` whenever a
      post-warm-up step exists, so there is no division by zero; when
      ``total_epochs <= warmup_epochs`` the loss simply stays cross-entropy.

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
        self.a: float | None = None
        self.a_step = 0.0

    def observe(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Update the EWMA threshold statistic with one batch.

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
        self.ewma = t if self.ewma is None else EWMA_MOMENTUM * t + (1 - EWMA_MOMENTUM) * self.ewma

    def loss(
        self, logits: torch.Tensor, target: torch.Tensor, epoch: int, reduction: Reduction = "mean"
    ) -> torch.Tensor:
        """Observe the batch, then return the training loss for ``epoch`` (0-based),
        reduced over the batch's rows by ``reduction``."""
        self.observe(logits, target)
        if epoch < self.config.warmup_epochs:
            return F.cross_entropy(logits, target, reduction=reduction)
        if self.a is None:
            assert self.ewma is not None  # observe() above set it
            self.a = self.ewma / self.config.init_factor
            self.a_step = (self.config.a_final - self.a) / (self.config.total_epochs - epoch)
        return unknown_aware_loss(logits, target, self.a, reduction)

    def end_epoch(self, epoch: int) -> None:
        """Advance ``a`` by one step (only once the ramp has started)."""
        del epoch
        if self.a is not None:
            self.a += self.a_step

    def state_dict(self) -> dict[str, Any]:
        return {"ewma": self.ewma, "a": self.a, "a_step": self.a_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ewma = state["ewma"]
        self.a = state["a"]
        self.a_step = float(state["a_step"])
