"""``--normalize``: which input convention the dense model was trained on.

Every convention maps a pixel ``p`` in [0, 1] (the raw value times its pixel scale,
:mod:`moonprune.user_data`) to ``(p - mean[c]) / std[c]``:

=============  ==========================  =========================================
name           mean / std                  model input
=============  ==========================  =========================================
``none``       0 / 1                       [0, 1], the pixels as read
``dataset``    the training split's own    zero mean, unit variance per channel
``symmetric``  0.5 / 0.5                   [-1, 1]
``imagenet``   (0.485, 0.456, 0.406) /     torchvision's ImageNet statistics
               (0.229, 0.224, 0.225)       (3-channel images only)
``0-255``      0 / 1/255                   [0, 255]
``mean=..;std=..``  as given (1 value, or one per channel), on pixels in [0, 1]
=============  ==========================  =========================================

``auto`` evaluates the dense model on the validation split under each of these named
conventions that applies and takes the most accurate one. An accuracy tie (common on a
small, easy validation split) goes to the lower validation NLL, the loss the model was
trained to minimise, which still tells conventions apart when both classify every row;
a tie on both goes to the first in the order of the table. An explicit choice that is
more than :data:`MUCH_WORSE` below the best candidate is kept, with a warning. A
moonprune checkpoint given as the starting model keeps the preprocessing it records.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moonprune.data import Preprocessing
from moonprune.errors import ConfigError
from moonprune.reliability.evaluation import collect_logits
from moonprune.sources import RawImages

logger = logging.getLogger(__name__)

#: The named conventions, in the order that breaks a tie (see the module docstring).
NAMED = ("none", "dataset", "symmetric", "imagenet", "0-255")
CHOICES = ("auto", *NAMED)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: An explicit choice this far (validation accuracy, absolute) below the best is flagged.
MUCH_WORSE = 0.05
CUSTOM = "custom"
#: What a checkpoint may record as its ``normalize`` (``custom``: explicit mean/std).
RECORDED_NORMALIZE = (*NAMED, CUSTOM)
EXAMPLE = "e.g. --normalize 'mean=0.5;std=0.5' (on pixels in [0, 1])"


def parse_custom(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``"mean=0.5;std=0.25"`` or ``"mean=0.4,0.5,0.6;std=0.2,0.2,0.2"`` -> (mean, std).

    Example::

        >>> parse_custom("mean=0.5; std=0.5")
        ((0.5,), (0.5,))
        >>> parse_custom("mean=1;std=0")
        Traceback (most recent call last):
        moonprune.errors.ConfigError: --normalize 'mean=1;std=0': std must be > 0 (got 0.0); \
e.g. --normalize 'mean=0.5;std=0.5' (on pixels in [0, 1])
    """
    where = f"--normalize {text!r}"
    values: dict[str, tuple[float, ...]] = {}
    for part in text.split(";"):
        key, sep, numbers = part.partition("=")
        key = key.strip()
        if not sep or key not in ("mean", "std") or key in values:
            raise ConfigError(
                f"{where} is not one of {', '.join(CHOICES)} nor 'mean=...;std=...'; {EXAMPLE}"
            )
        try:
            values[key] = tuple(float(v) for v in numbers.split(","))
        except ValueError:
            raise ConfigError(
                f"{where}: {key} must be numbers separated by commas; {EXAMPLE}"
            ) from None
    if set(values) != {"mean", "std"}:
        raise ConfigError(f"{where} needs both mean and std; {EXAMPLE}")
    mean, std = values["mean"], values["std"]
    if not all(math.isfinite(m) for m in mean):
        raise ConfigError(f"{where}: mean must be finite numbers; {EXAMPLE}")
    bad = [s for s in std if not (math.isfinite(s) and s > 0)]
    if bad:
        raise ConfigError(f"{where}: std must be > 0 (got {bad[0]}); {EXAMPLE}")
    return mean, std


def check_normalize(value: Any) -> None:
    """Refuse a ``normalize`` setting that no data could make valid."""
    if not isinstance(value, str):
        raise ConfigError(
            f"normalize must be a string ({', '.join(CHOICES)} or 'mean=...;std=...'), "
            f"got {value!r}"
        )
    if value not in CHOICES:
        parse_custom(value)


def _per_channel(values: tuple[float, ...], channels: int, text: str) -> tuple[float, ...]:
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ConfigError(
            f"--normalize {text!r} gives {len(values)} values but the images have {channels} "
            f"channel{'s' if channels > 1 else ''}; give 1 value (every channel) or {channels}"
        )
    return values


def convention(normalize: str, dataset: Preprocessing) -> Preprocessing:
    """``dataset`` (the training split's statistics) with ``normalize``'s mean/std.

    Example::

        >>> pre = Preprocessing(1, 8, 8, 1 / 16, (0.3,), (0.4,), "dataset")
        >>> convention("symmetric", pre).mean, convention("symmetric", pre).std
        ((0.5,), (0.5,))
    """
    c = dataset.channels
    if normalize == "dataset":
        return replace(dataset, normalize="dataset")
    if normalize == "imagenet" and c != 3:
        raise ConfigError(
            f"--normalize imagenet needs 3-channel images but the data has {c}; use none, "
            "dataset, symmetric or 'mean=...;std=...', or read the images with --channels 3"
        )
    fixed = {
        "none": ((0.0,), (1.0,)),
        "symmetric": ((0.5,), (0.5,)),
        "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
        "0-255": ((0.0,), (1 / 255,)),
    }
    name = normalize if normalize in fixed else CUSTOM
    mean, std = fixed[normalize] if normalize in fixed else parse_custom(normalize)
    return replace(
        dataset,
        mean=_per_channel(mean, c, normalize),
        std=_per_channel(std, c, normalize),
        normalize=name,
    )


@dataclass(frozen=True)
class CandidateScore:
    """The dense model's validation accuracy and NLL under one convention."""

    accuracy: float
    nll: float


@dataclass(frozen=True)
class NormalizationChoice:
    """The preprocessing a run uses and why: ``how`` is ``auto``, ``given`` (an explicit
    ``--normalize``) or ``checkpoint`` (recorded in the moonprune checkpoint started from)."""

    preprocessing: Preprocessing
    how: str
    label: str
    scores: dict[str, CandidateScore] = field(default_factory=dict)
    tie_broken_by_nll: bool = False
    warning: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The report's ``preprocessing`` record: the choice, then every candidate."""
        return {
            **self.preprocessing.as_dict(),
            "choice": self.how,
            "candidates": {n: vars(s) for n, s in self.scores.items()},
            "summary": self.summary(),
        }

    def warnings(self) -> list[str]:
        """The report's warnings: an explicit choice far below the best candidate."""
        return [self.warning] if self.warning else []

    def summary(self) -> str:
        """One console line, e.g. ``dense accuracy 93.9% with none, 85.4% with dataset
        (validation split): using none``."""
        if self.how == "checkpoint":
            return f"inputs normalised as the starting checkpoint records ({self.label})"
        cells = ", ".join(f"{100 * s.accuracy:.1f}% with {n}" for n, s in self.scores.items())
        if self.how == "given":
            return f"dense accuracy {cells} (validation split): using {self.label} (given)"
        tie = " (tied on accuracy: lower NLL)" if self.tie_broken_by_nll else ""
        return f"dense accuracy {cells} (validation split): using {self.label}{tie}"


def score_candidates(
    model: nn.Module, val: RawImages, candidates: dict[str, Preprocessing], num_classes: int
) -> dict[str, CandidateScore]:
    """Accuracy and NLL of ``model`` (its first ``num_classes`` outputs) on ``val``
    under each candidate preprocessing."""
    assert val.labels is not None  # an ID split is labelled
    y = torch.from_numpy(val.labels)
    scores = {}
    for name, pre in candidates.items():
        logits = collect_logits(model, pre.normalise(val.images))[:, :num_classes].double()
        nll = float(F.cross_entropy(logits, y))
        scores[name] = CandidateScore(
            accuracy=float((logits.argmax(1) == y).double().mean()),
            nll=nll if math.isfinite(nll) else math.inf,
        )
    return scores


def best_candidate(scores: dict[str, CandidateScore]) -> tuple[str, bool]:
    """The most accurate candidate (ties: lower NLL, then the order of :data:`NAMED`),
    and whether NLL decided it.

    Example::

        >>> best_candidate({"none": CandidateScore(1.0, 0.3), "dataset": CandidateScore(1.0, 0.1)})
        ('dataset', True)
    """
    order = {n: i for i, n in enumerate(scores)}
    ranked = sorted(scores, key=lambda n: (-scores[n].accuracy, scores[n].nll, order[n]))
    ties = [n for n in ranked if scores[n].accuracy == scores[ranked[0]].accuracy]
    return ranked[0], len(ties) > 1 and scores[ties[1]].nll > scores[ties[0]].nll


def choose_normalization(
    model: nn.Module,
    val: RawImages,
    dataset: Preprocessing,
    normalize: str,
    num_classes: int,
    recorded: Preprocessing | None = None,
) -> NormalizationChoice:
    """The preprocessing for ``model``: see the module docstring.

    ``val`` is the validation split in [0, 1] (not normalised), ``dataset`` the training
    split's statistics, ``recorded`` the preprocessing of a moonprune checkpoint the run
    starts from.
    """
    if recorded is not None:
        if normalize not in ("auto", recorded.normalize or "dataset"):
            raise ConfigError(
                f"--normalize {normalize!r}: the starting model is a moonprune checkpoint, "
                f"which keeps the preprocessing it records ({recorded.normalize or 'dataset'}); "
                "drop --normalize"
            )
        return NormalizationChoice(recorded, "checkpoint", recorded.normalize or "dataset")
    given = None if normalize == "auto" else convention(normalize, dataset)
    candidates = {
        name: convention(name, dataset)
        for name in NAMED
        if name != "imagenet" or dataset.channels == 3
    }
    if given is not None and given.normalize == CUSTOM:
        candidates[normalize] = given
    scores = score_candidates(model, val, candidates, num_classes)
    best, by_nll = best_candidate(scores)
    if given is None:
        choice = NormalizationChoice(candidates[best], "auto", best, scores, by_nll)
        logger.info("--normalize auto: %s", choice.summary())
        return choice
    own = scores[normalize]
    warning = None
    if scores[best].accuracy - own.accuracy > MUCH_WORSE:
        warning = (
            f"the dense model's validation accuracy is {100 * own.accuracy:.1f}% with "
            f"--normalize {normalize} but {100 * scores[best].accuracy:.1f}% with {best}: it "
            f"was probably trained on other inputs; try --normalize {best} (or auto)"
        )
        logger.warning(warning)
    return NormalizationChoice(given, "given", normalize, scores, warning=warning)
