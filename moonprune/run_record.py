"""The run record a checkpoint keeps: what ``compress`` was asked, and what it chose.

:class:`RunRecord` is one frozen, typed record with a schema version
(:data:`RECORD_VERSION`): the resolved :class:`~moonprune.config.CompressConfig` (the
data spec, the OOD sets, the seed, the method, the temperature *setting*: ``"auto"``
or a number, the read options, ...), the preprocessing the model takes, and the
deployed rejector: its OOD score, the TPR its threshold was set for, the threshold and
the temperature actually used (fitted, when the setting is ``"auto"``).

:meth:`RunRecord.to_dict` gives plain data (it loads with ``torch.load(...,
weights_only=True)``); :meth:`RunRecord.from_dict` checks every field again on load,
rebuilding the config with its own builder (:func:`~moonprune.config.build_config`),
so a damaged or edited file stops with one :class:`~moonprune.errors.CheckpointError`
naming the field and the fix. A checkpoint written before the record existed (a
``config`` dict beside separate threshold, temperature, TPR, score and preprocessing
fields) is read by :meth:`RunRecord.from_legacy` through the same checks.

Example::

    >>> from moonprune.preprocessing import Preprocessing
    >>> record = RunRecord(Preprocessing(1, 8, 8, 1.0, (0.0,), (1.0,)), threshold=0.4)
    >>> RunRecord.from_dict(record.to_dict(), "m.pt") == record
    True
    >>> RunRecord.from_dict({**record.to_dict(), "tpr": 1.5}, "m.pt")
    Traceback (most recent call last):
    ...
    moonprune.errors.CheckpointError: m.pt: tpr 1.5 must lie in (0, 1); ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moonprune.config import CompressConfig, build_config
from moonprune.errors import CheckpointError, ConfigError
from moonprune.normalization import RECORDED_NORMALIZE
from moonprune.preprocessing import Preprocessing
from moonprune.sparsity import METHODS
from moonprune.specs import ReadOptions
from moonprune.trust import finite_number, json_like, short_repr

#: The schema of :meth:`RunRecord.to_dict`; a file with a higher one needs a newer moonprune.
RECORD_VERSION = 1
FIX = "recreate it with `moonprune compress`"
#: The fields :meth:`RunRecord.to_dict` writes (the version included).
FIELDS = ("record_version", "preprocessing", "score", "tpr", "threshold", "temperature",
          "config")  # fmt: skip
#: Where each score's values lie; a threshold outside can accept all or nothing.
SCORE_RANGE = {"msp": (0.0, 1.0), "unknown": (0.0, 1.0), "mahalanobis": (-math.inf, 0.0),
               "mahalanobis++": (-math.inf, 0.0)}  # fmt: skip


@dataclass(frozen=True)
class RunRecord:
    """What a compress run was asked (``config``) and what it deployed.

    ``config`` is None for a checkpoint built outside ``compress`` (by hand, from
    Python): it then records no data, OOD sets or read options, seed 0 and the
    temperature setting ``"auto"``. ``score`` and ``tpr`` are those the ``threshold``
    was set for (the config's, when there is one); ``temperature`` is the T used.
    """

    preprocessing: Preprocessing
    score: str = "msp"
    tpr: float = 0.95
    threshold: float | None = None
    temperature: float = 1.0
    config: CompressConfig | None = None

    def __post_init__(self) -> None:
        check_deployment(self.score, self.tpr, self.threshold, self.temperature, "the run record")
        if self.config is not None:
            _check_agrees(self.config, self.score, self.tpr, "the run record")

    @property
    def data(self) -> str | None:
        """The ID data spec the run was compressed on (None: not recorded)."""
        return self.config.data if self.config is not None else None

    @property
    def ood(self) -> tuple[str, ...]:
        """The OOD set specs the run was measured on."""
        return self.config.ood if self.config is not None else ()

    @property
    def seed(self) -> int:
        """The run's seed: it fixes the train/val/test split of :attr:`data`."""
        return self.config.train.seed if self.config is not None else 0

    @property
    def method(self) -> str | None:
        """The sparse method (``rigl``, ``channel``, ...)."""
        return self.config.sparsity.method if self.config is not None else None

    @property
    def target_sparsity(self) -> float | None:
        """The sparsity asked for (None for ``channel``, whose target is a speed or size)."""
        if self.config is None:
            return None
        method = self.config.sparsity.method  # a plug-in's name may not be installed here
        if method in METHODS and METHODS.is_structured(method):
            return None
        return self.config.sparsity.sparsity

    @property
    def temperature_setting(self) -> str | float:
        """The user's temperature choice: ``"auto"`` (fitted on validation) or a number."""
        return self.config.temperature if self.config is not None else "auto"

    def read_options(self, workers: int | None = None) -> ReadOptions:
        """How the run read its data (size, channels, bad images), with ``workers``."""
        cfg = self.config
        if cfg is None:
            return ReadOptions(workers=workers)
        return ReadOptions(cfg.image_size, cfg.channels, cfg.on_bad_image, workers)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (str, numbers, lists, dicts): what the checkpoint stores."""
        return {
            "record_version": RECORD_VERSION,
            "preprocessing": self.preprocessing.as_dict(),
            "score": self.score,
            "tpr": self.tpr,
            "threshold": self.threshold,
            "temperature": self.temperature,
            "config": None if self.config is None else self.config.as_dict(),
        }

    @classmethod
    def from_dict(cls, obj: Any, source: str) -> RunRecord:
        """The record :meth:`to_dict` wrote, every field checked again (type, range,
        agreement with the config); :class:`CheckpointError` names the first bad one."""
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{source}: the run record is not a mapping; {FIX}")
        _check_version(obj.get("record_version"), source)
        unknown = sorted(str(k) for k in obj if k not in FIELDS)
        missing = [k for k in FIELDS if k not in obj]
        if unknown or missing:
            what = f"unknown field(s) {unknown}" if unknown else f"no {missing[0]!r}"
            raise CheckpointError(f"{source}: the run record has {what}; {FIX}")
        score, tpr, threshold, temperature = (
            obj["score"], obj["tpr"], obj["threshold"], obj["temperature"]
        )  # fmt: skip
        check_deployment(score, tpr, threshold, temperature, source)
        config = _config(obj["config"], source)
        if config is not None:
            _check_agrees(config, score, tpr, source)
        return cls(
            preprocessing=parse_preprocessing(obj["preprocessing"], source),
            score=score,
            tpr=float(tpr),
            threshold=None if threshold is None else float(threshold),
            temperature=float(temperature),
            config=config,
        )

    @classmethod
    def from_legacy(cls, obj: Mapping[str, Any], source: str) -> RunRecord:
        """The record of a checkpoint written before records existed: its ``config``
        dict (empty: none) and its separate fields, through :meth:`from_dict`'s checks."""
        config = obj.get("config")
        if not isinstance(config, Mapping):
            raise CheckpointError(f"{source}: 'config' must be a mapping; {FIX}")
        return cls.from_dict(
            {
                "record_version": RECORD_VERSION,
                "preprocessing": obj.get("preprocessing"),
                "score": obj.get("score"),
                "tpr": obj.get("tpr"),
                "threshold": obj.get("threshold"),
                "temperature": obj.get("temperature", 1.0),  # absent before calibration
                "config": dict(config) or None,
            },
            source,
        )


def _check_version(version: Any, source: str) -> None:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(
            f"{source}: the run record's record_version {short_repr(version)} is not a "
            f"version number; {FIX}"
        )
    if version > RECORD_VERSION:
        raise CheckpointError(
            f"{source} has run record version {version}; this moonprune reads up to "
            f"{RECORD_VERSION}: upgrade moonprune, or {FIX}"
        )


def check_deployment(score: Any, tpr: Any, threshold: Any, temperature: Any, source: str) -> None:
    """The deployed rejector's fields: a known score, a TPR in (0, 1), a finite
    threshold within the score's range (or None: not set), a temperature > 0."""
    from moonprune.reliability.scores import score_names

    if not isinstance(score, str) or score not in score_names():
        raise CheckpointError(
            f"{source}: unknown OOD score {short_repr(score)} (one of "
            f"{', '.join(score_names())}); {FIX}"
        )
    if not (finite_number(tpr) and 0 < tpr < 1):
        raise CheckpointError(f"{source}: tpr {short_repr(tpr)} must lie in (0, 1); {FIX}")
    if threshold is not None:
        lo, hi = SCORE_RANGE.get(score, (-math.inf, math.inf))
        if not finite_number(threshold) or not lo <= threshold <= hi:
            raise CheckpointError(
                f"{source}: threshold {short_repr(threshold)} is not a finite value of the "
                f"{score!r} score (range [{lo}, {hi}]); {FIX}"
            )
    if not finite_number(temperature) or temperature <= 0:
        raise CheckpointError(
            f"{source}: temperature {short_repr(temperature)} must be a finite number > 0; {FIX}"
        )


def _check_agrees(config: CompressConfig, score: str, tpr: float, source: str) -> None:
    """One fact, one value: the threshold was set for the config's score and TPR."""
    for name, value, asked in (("score", score, config.score), ("tpr", tpr, config.tpr)):
        if value != asked:
            raise CheckpointError(
                f"{source}: the run record's {name} {short_repr(value)} differs from its "
                f"config's {short_repr(asked)}; {FIX}"
            )


def _config(values: Any, source: str) -> CompressConfig | None:
    """The recorded config rebuilt by :func:`~moonprune.config.build_config` (plain
    data only: nothing named in it is imported), or None when none is recorded."""
    if values is None:
        return None
    if not isinstance(values, Mapping) or not json_like(values):
        raise CheckpointError(
            f"{source}: the run record's config must be a mapping of plain values, got "
            f"{short_repr(values)}; {FIX}"
        )
    try:
        return build_config(dict(values))
    except ConfigError as exc:
        raise CheckpointError(
            f"{source}: the run record's config is damaged ({exc}); {FIX}"
        ) from None


def parse_preprocessing(pre: Any, source: str) -> Preprocessing:
    """A recorded preprocessing, checked (sizes, finite mean, std > 0, a known
    ``normalize`` convention), as a :class:`~moonprune.preprocessing.Preprocessing`."""
    if not (isinstance(pre, Mapping) and _preprocessing_ok(pre)):
        raise CheckpointError(
            f"{source}: the preprocessing record is damaged (channels, height, width > 0; "
            f"finite mean; std > 0, one per channel; normalize one of "
            f"{', '.join(RECORDED_NORMALIZE)}), got {short_repr(pre)}; {FIX}"
        )
    return Preprocessing.from_dict(dict(pre))


def _preprocessing_ok(pre: Mapping[str, Any]) -> bool:
    dims = [pre.get(k) for k in ("channels", "height", "width")]
    mean, std = pre.get("mean"), pre.get("std")
    return (
        all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)
        and finite_number(pre.get("scale"))
        and pre.get("scale", 0) > 0
        and isinstance(mean, list | tuple)
        and isinstance(std, list | tuple)
        and len(mean) == len(std) == dims[0]
        and all(finite_number(m) for m in mean)
        and all(finite_number(s) and s > 0 for s in std)
        # absent in checkpoints written before --normalize (they used "dataset")
        and pre.get("normalize") in (None, *RECORDED_NORMALIZE)
    )
