"""The score registry: every OOD score moonprune offers, by name, like the maskers.

An entry says what the score reads (``"logits"``: a pure function of the model's
outputs, :mod:`.scores`; ``"features"``: the classifier's input, with statistics fitted
on training data, :mod:`.features`) and whether it needs the K+1 head. Validation
(:meth:`ScoreRegistry.get`), the CLI's ``--score`` help, the report's table of every
score and the exporters all read this one list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from moonprune.errors import ConfigError, did_you_mean

#: ``(logits, num_known, temperature) -> (N,)`` scores, higher = more in-distribution.
ScoreFn = Callable[[torch.Tensor, int, float], torch.Tensor]
Reads = Literal["logits", "features"]


@dataclass(frozen=True)
class Score:
    """One registered score. ``fn`` computes a logit score (None for a feature score,
    whose statistics are fitted per model)."""

    name: str
    description: str
    reads: Reads
    fn: ScoreFn | None = None
    needs_unknown_head: bool = False

    def available(self, has_unknown_head: bool, has_features: bool) -> bool:
        """Whether a model with (or without) the K+1 head and a final linear layer
        whose input can be tapped offers this score."""
        if self.reads == "features":
            return has_features
        return has_unknown_head or not self.needs_unknown_head


class ScoreRegistry:
    """Scores by name: the logit scores, then the feature ones, each in registration order.

    Example::

        >>> from moonprune import SCORES
        >>> SCORES.names("logits")
        ['msp', 'energy', 'max_logit', 'unknown']
        >>> SCORES.get("knn").reads, SCORES.get("unknown").needs_unknown_head
        ('features', True)
    """

    def __init__(self) -> None:
        self._scores: dict[str, Score] = {}

    def register(self, score: Score) -> Score:
        """Add ``score``; a second, different score with the same name is an error."""
        if score.reads not in ("logits", "features"):
            raise ConfigError(f"score {score.name!r}: reads must be 'logits' or 'features'")
        if (score.reads == "logits") != (score.fn is not None):
            raise ConfigError(f"score {score.name!r}: a logit score needs fn, a feature one none")
        old = self._scores.get(score.name)
        if old is not None and old != score:
            raise ConfigError(f"a score named {score.name!r} is already registered")
        self._scores[score.name] = score
        return score

    def names(self, reads: Reads | None = None) -> list[str]:
        """Every registered name (the logit scores first), or those that read ``reads``."""
        if reads is None:
            return self.names("logits") + self.names("features")
        return [n for n, s in self._scores.items() if s.reads == reads]

    def describe(self) -> dict[str, str]:
        """Name -> one-line description."""
        return {n: self._scores[n].description for n in self.names()}

    def get(self, name: str) -> Score:
        """The score called ``name``; an unknown name is a ConfigError listing them all."""
        try:
            return self._scores[name]
        except (KeyError, TypeError):
            hint = did_you_mean(name, self.names())
            raise ConfigError(
                f"unknown OOD score {name!r}{hint}; choose one of: {', '.join(self.names())}"
            ) from None

    def available(self, has_unknown_head: bool, has_features: bool) -> list[str]:
        """The names a model offers (see :meth:`Score.available`)."""
        names = self.names()
        return [n for n in names if self._scores[n].available(has_unknown_head, has_features)]

    def __contains__(self, name: object) -> bool:
        return name in self._scores


#: The one registry; :mod:`.scores` and :mod:`.features` register their scores in it.
SCORES = ScoreRegistry()
