"""Reopening a compressed run: the settings its checkpoint records (or the caller
overrides) and the data they name, for ``verify``, ``export`` and ``inspect``.

:func:`reopen_run` is the one place that reads a run's settings back: the data spec,
OOD sets, seed (it fixes the split), score, TPR, temperature and read options come
from the checkpoint's :class:`~moonprune.run_record.RunRecord` unless the caller gives
their own (:class:`RunOverrides`). The data is read in the checkpoint's preprocessing:
the seed's test split of the data compressed on, or every row of another (held-out)
set, so anyone can reproduce the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moonprune.checkpoint_record import MoonpruneCheckpoint
from moonprune.data import ImageSet, ReadOptions, Splits, load_ood, load_splits
from moonprune.errors import ConfigError, MoonpruneError
from moonprune.streaming import concat_images

SPLITS = ("test", "all")


@dataclass(frozen=True)
class RunOverrides:
    """What a caller asks for instead of what the run recorded (None or empty: the
    record's). ``workers`` is how many processes read a folder (None: the default)."""

    data: str | None = None
    ood: tuple[str, ...] = ()
    split: str | None = None
    seed: int | None = None
    score: str | None = None
    tpr: float | None = None
    temperature: str | float | None = None
    workers: int | None = None


@dataclass(frozen=True)
class RunSettings:
    """The resolved settings of a reopened run: the caller's, else the record's.

    ``temperature`` is the compressed model's (given, else the one it deployed);
    ``baseline_temperature`` a dense baseline's (given, else the run's setting, so the
    baseline is calibrated the way the compressed model was).
    """

    data: str | None
    ood: tuple[str, ...]
    split: str
    seed: int
    score: str
    tpr: float
    temperature: str | float
    baseline_temperature: str | float
    options: ReadOptions
    method: str | None
    target_sparsity: float | None


@dataclass(frozen=True)
class RunData:
    """The rows evaluated, and the training split feature statistics are fitted on."""

    splits: Splits
    ood: dict[str, ImageSet]
    fit_on: ImageSet
    fitted_on: str


@dataclass(frozen=True)
class ReopenedRun:
    """A run's settings and, unless reopened without it, its data."""

    settings: RunSettings
    data: RunData | None


def reopen_run(
    ckpt: MoonpruneCheckpoint,
    overrides: RunOverrides | None = None,
    *,
    load_data: bool = True,
    require_ood: bool = False,
    has_baseline: bool = False,
) -> ReopenedRun:
    """The settings of ``ckpt``'s run with ``overrides`` applied, checked, and (with
    ``load_data``) the ID splits and OOD sets they name.

    ``require_ood`` refuses a run with no OOD set (``verify`` measures detection);
    ``has_baseline`` says a dense baseline is evaluated too, so on a held-out set the
    feature statistics are fitted on the recorded data's training split.

    Example::

        >>> import moonprune
        >>> from moonprune.reopen import RunOverrides, reopen_run
        >>> _ = moonprune.compress(moonprune.build_config({
        ...     "checkpoint": "", "data": "digits:0-2", "ood": ["noise"], "out": "reopen-run",
        ...     "export": False, "train": {"epochs": 1, "seed": 3},
        ...     "moon": {"warmup_epochs": 0}}),
        ...     dense=moonprune.checkpoints.DenseModel(
        ...         moonprune.models.demo_cnn(num_classes=3, width=4),
        ...         moonprune.ArchSpec("moonprune.models:demo_cnn",
        ...                            {"num_classes": 3, "width": 4})))
        >>> run = reopen_run(moonprune.load_checkpoint("reopen-run/model.pt"),
        ...                  RunOverrides(tpr=0.9))
        >>> run.settings.data, run.settings.ood, run.settings.seed, run.settings.tpr
        ('digits:0-2', ('noise',), 3, 0.9)
        >>> len(run.data.splits.test) > 0
        True
    """
    settings = _settings(ckpt, overrides or RunOverrides(), load_data, require_ood)
    if not load_data:
        return ReopenedRun(settings, None)
    return ReopenedRun(settings, _load(ckpt, settings, has_baseline))


def _settings(
    ckpt: MoonpruneCheckpoint, given: RunOverrides, load_data: bool, require_ood: bool
) -> RunSettings:
    """Each setting ``given``, else the one the record holds; checked."""
    record = ckpt.run
    split = _choose_split(given.split, given.data, record.data, given.temperature)
    data = given.data or record.data
    ood = given.ood or record.ood
    if load_data and not data:
        raise ConfigError("pass --data: the checkpoint does not record its data")
    if require_ood and not ood:
        raise ConfigError("pass at least one --ood set (e.g. --ood noise)")
    tpr = record.tpr if given.tpr is None else given.tpr
    if not 0 < tpr < 1:
        raise ConfigError(f"--tpr must be in (0, 1), got {tpr}")
    return RunSettings(
        data=data,
        ood=tuple(ood),
        split=split,
        seed=record.seed if given.seed is None else given.seed,
        score=given.score or record.score,
        tpr=tpr,
        temperature=record.temperature if given.temperature is None else given.temperature,
        baseline_temperature=(
            record.temperature_setting if given.temperature is None else given.temperature
        ),
        options=record.read_options(given.workers),
        method=record.method,
        target_sparsity=record.target_sparsity,
    )


def _load(ckpt: MoonpruneCheckpoint, settings: RunSettings, has_baseline: bool) -> RunData:
    """The ID splits (all rows as the test set for ``split="all"``) and OOD sets of
    ``settings`` in the checkpoint's input, and the split feature scores are fitted on."""
    data, seed, options = settings.data, settings.seed, settings.options
    assert data is not None  # _settings requires it when the data is loaded
    splits = load_splits(data, seed=seed, options=options, preprocessing=ckpt.preprocessing)
    if splits.num_classes != ckpt.num_known:
        raise ConfigError(
            f"the model knows {ckpt.num_known} classes but {data!r} has {splits.num_classes}; "
            "use the class subset the model was compressed on"
        )
    fit_on, fitted_on = splits.train, f"{data} (training split)"
    if settings.split == "all":
        if ckpt.feature_stats is None or has_baseline:
            fit_on, fitted_on = _training_split(ckpt, seed, options, fit_on, data)
        splits = whole(splits)
    ood_sets: dict[str, ImageSet] = {
        spec: load_ood(spec, ckpt.preprocessing, seed=seed, options=options)
        for spec in settings.ood
    }
    return RunData(splits, ood_sets, fit_on, fitted_on)


def _training_split(
    ckpt: MoonpruneCheckpoint, seed: int, options: ReadOptions, fallback: ImageSet, data: str
) -> tuple[ImageSet, str]:
    """The training split of the data the run records (feature statistics are fitted on
    it when a held-out set is evaluated whole), and what it is; when that data cannot be
    read, ``fallback`` (the held-out set's own training split, which is also evaluated)."""
    recorded = ckpt.run.data
    if recorded:
        try:
            train = load_splits(recorded, seed=seed, options=options,
                                preprocessing=ckpt.preprocessing).train  # fmt: skip
            return train, f"{recorded} (training split)"
        except MoonpruneError:
            pass  # the recorded data moved: fall back, and say so in the report
    return fallback, f"{data} (training split, also evaluated: the recorded data is unreadable)"


def _choose_split(
    split: str | None, data: str | None, recorded: str | None, temperature: str | float | None
) -> str:
    """``test`` (the seed's test split) for the data compressed on, ``all`` for another
    set: a held-out file is evaluated whole, so anyone can reproduce the numbers."""
    if split is None:
        split = "test" if data is None or data == recorded else "all"
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "all" and temperature == "auto":
        raise ConfigError(
            "--temperature auto fits T on a validation split, and --split all leaves none; "
            "use the checkpoint's temperature (drop --temperature) or give a number"
        )
    return split


def whole(splits: Splits) -> Splits:
    """Every row of ``splits`` as the test (and validation) set: a held-out data set."""
    parts = (splits.train, splits.val, splits.test)
    everything = ImageSet(
        splits.test.name,
        concat_images([p.x for p in parts]),
        torch.cat([p.y for p in parts]),
        splits.test.classes,
    )
    return Splits(everything, everything, everything, splits.preprocessing)
