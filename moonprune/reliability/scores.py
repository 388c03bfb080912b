"""OOD scores: pure functions of logits, every one "higher = more in-distribution".

All are plain tensor operations so the same code runs in PyTorch and inside the
exported ONNX graph. ``logits`` is ``(N, K)`` for a plain model or ``(N, K + 1)``
with the unknown column at index ``K`` (see :mod:`moonprune.conventions`).

=========  ===============================================================
``msp``    max over the K known classes of softmax(logits / T) taken over all
           columns (the MOON reference score)
``energy`` ``T * logsumexp(known logits / T)`` (negative free energy)
``max_logit`` max known logit
``unknown``  ``1 - p_unknown`` (needs the K + 1 head; equals 1 on a plain model)
=========  ===============================================================

The scores of the classifier's input features (``mahalanobis``, ``knn``) need
statistics fitted on training data; they live in :mod:`.features` and are named
in the same registry (:mod:`.registry`), so every score name is validated in one place.
"""

from __future__ import annotations

import torch

import moonprune.reliability.features  # noqa: F401  (registers the feature scores)
from moonprune.errors import ConfigError
from moonprune.reliability.registry import SCORES, Score, ScoreFn


def known_probabilities(
    logits: torch.Tensor, num_known: int, temperature: float = 1.0
) -> torch.Tensor:
    """``(N, K)``: the known-class part of the softmax over *all* columns of logits / T."""
    return torch.softmax(logits / temperature, dim=-1)[..., :num_known]


def msp(logits: torch.Tensor, num_known: int, temperature: float = 1.0) -> torch.Tensor:
    """Maximum softmax probability over the known classes."""
    return known_probabilities(logits, num_known, temperature).amax(dim=-1)


def energy(logits: torch.Tensor, num_known: int, temperature: float = 1.0) -> torch.Tensor:
    """``T * logsumexp(logits[:, :K] / T)``: high for confident in-distribution inputs."""
    return temperature * torch.logsumexp(logits[..., :num_known] / temperature, dim=-1)


def max_logit(logits: torch.Tensor, num_known: int, temperature: float = 1.0) -> torch.Tensor:
    """Largest known-class logit (temperature does not change the ranking; ignored)."""
    del temperature
    return logits[..., :num_known].amax(dim=-1)


def not_unknown(logits: torch.Tensor, num_known: int, temperature: float = 1.0) -> torch.Tensor:
    """``1 - p_unknown``: the mass the model puts on the known classes together."""
    return known_probabilities(logits, num_known, temperature).sum(dim=-1)


for _score in (
    Score("msp", "max softmax probability over the K known classes (MOON reference)", "logits",
          msp),
    Score("energy", "negative free energy T*logsumexp(known logits / T)", "logits", energy),
    Score("max_logit", "largest known-class logit", "logits", max_logit),
    Score("unknown", "1 - p(unknown); needs the K+1 head", "logits", not_unknown,
          needs_unknown_head=True),
):  # fmt: skip
    SCORES.register(_score)


def score_names() -> list[str]:
    """Every OOD score: the logit scores, then the feature scores."""
    return SCORES.names()


def is_feature_score(name: str) -> bool:
    """True for a score of the classifier's input (:mod:`.features`)."""
    return SCORES.get(name).reads == "features"


def check_score(name: str) -> str:
    """``name`` if it is a registered score; else a ConfigError listing all."""
    return SCORES.get(name).name


def get_score(name: str) -> ScoreFn:
    """The logit score function called ``name``; unknown names list the valid ones."""
    fn = SCORES.get(name).fn
    if fn is None:
        raise ConfigError(
            f"the {name!r} score reads the classifier's input features, not the logits; "
            "evaluate it with moonprune.assessment (it fits the statistics)"
        )
    return fn


def compute_score(
    logits: torch.Tensor, num_known: int, name: str = "msp", temperature: float = 1.0
) -> torch.Tensor:
    """``(N,)`` score ``name`` of ``logits``; higher = more in-distribution."""
    return get_score(name)(logits, num_known, temperature)
