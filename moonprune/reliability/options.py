"""What an evaluation measures, decided once: :class:`EvalOptions`.

The one evaluation path is logits -> temperature -> score -> metrics ->
:class:`~moonprune.assessment.Assessment`; every step takes this record instead of
repeating ``score``, ``tpr``, ``ece_bins``, ``n_boot`` and ``seed`` keywords, and the
record checks them when it is made, so a bad value fails before any model runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moonprune.errors import ConfigError
from moonprune.reliability.scores import check_score


@dataclass(frozen=True)
class EvalOptions:
    """``score``: the OOD score the threshold is set on (a name in
    :data:`~moonprune.reliability.SCORES`); ``tpr``: the share of ID validation rows
    the threshold accepts, also FPR95's TPR; ``ece_bins``: equal-width ECE bins;
    ``n_boot``: bootstrap resamples of the AUROC/FPR95 intervals; ``seed``: their seed.

    Example::

        >>> EvalOptions(score="energy", tpr=0.9).ece_bins
        15
        >>> EvalOptions(tpr=1.5)
        Traceback (most recent call last):
        ...
        moonprune.errors.ConfigError: tpr must be in (0, 1), got 1.5; e.g. 0.95
    """

    score: str = "msp"
    tpr: float = 0.95
    ece_bins: int = 15
    n_boot: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        check_score(self.score)
        if isinstance(self.tpr, bool) or not isinstance(self.tpr, (int, float)):
            raise ConfigError(f"tpr must be a number in (0, 1), got {self.tpr!r}; e.g. 0.95")
        if not (math.isfinite(self.tpr) and 0.0 < self.tpr < 1.0):
            raise ConfigError(f"tpr must be in (0, 1), got {self.tpr}; e.g. 0.95")
        for name in ("ece_bins", "n_boot"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
