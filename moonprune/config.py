"""Typed, frozen configuration for a compress run, and the recipe file parser.

One fact, one field: the number of known classes K comes from the data and the
model, never from a setting, and the K+1 head follows from ``moon.enabled``.
The recipe (``--config recipe.toml``) is parsed here and nowhere else; command-line
flags override it. A saved run records :meth:`CompressConfig.as_dict`.

The ``[sparsity]`` section, :class:`~moonprune.sparsity.config.SparsityConfig`, lives
with the sparse methods it configures (and is importable from here); the range checks
every ``__post_init__`` runs are :mod:`moonprune.config_checks`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from moonprune.config_checks import check_compress, check_gates, check_moon, check_train
from moonprune.errors import ConfigError
from moonprune.recipe import check_types
from moonprune.sparsity.config import CHANNEL_OPTIONS as CHANNEL_OPTIONS
from moonprune.sparsity.config import DEFAULT_CHANNEL_SPEEDUP, SparsityConfig
from moonprune.sparsity.config import UNSTRUCTURED_OPTIONS as UNSTRUCTURED_OPTIONS


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule for sparse fine-tuning.

    The schedule has the reference's shape (SGD, Nesterov 0.9, weight decay 5e-4,
    lr = base * cosine factor from ``lr_peak_factor`` 1.2 down to ``lr_floor_factor``
    0.08, then held at the floor while averaging). Deviation: the base lr defaults to
    0.05, not 0.1, and the epoch count to 30, not 100, because moonprune fine-tunes a
    *pretrained* dense model instead of training from scratch.

    Additions for fine-tuning (not in the reference, which trains from scratch): the lr
    ramps linearly from ~0 to its schedule over the first ``lr_warmup_epochs`` (a
    pretrained model's first steps under a fresh optimizer and a new head are where
    fine-tuning spikes), and a divergence guard: an epoch whose loss is non-finite, or
    more than ``divergence_factor`` times the first epoch's *and* above chance level
    (ln of the output count), is undone (the last good
    epoch's state restored), the lr halved and the epoch rerun, at most
    ``max_rollbacks`` times; each rollback is recorded in the report. ``augment``
    (training rows only; :mod:`moonprune.augment`): ``none`` (default, by evidence: on
    mnist5k crop augmentation cost 0.5-2.3 points of held-out-class AUROC and gained no
    accuracy, `benchmarks/RESULTS.md` ablation-full), ``crop`` or ``crop+flip``.

    Example::

        >>> TrainConfig(epochs=10).lr
        0.05
        >>> TrainConfig(epochs=0)
        Traceback (most recent call last):
        moonprune.errors.ConfigError: epochs must be >= 1, got 0; e.g. --epochs 30
    """

    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_peak_factor: float = 1.2
    lr_floor_factor: float = 0.08
    update_end: float = 0.75
    seed: int = 0
    lr_warmup_epochs: float = 1.0
    augment: str = "none"
    max_rollbacks: int = 3
    divergence_factor: float = 3.0

    def __post_init__(self) -> None:
        check_train(self)


@dataclass(frozen=True)
class MoonConfig:
    """MOON's parts (reference values). ``enabled=False`` is the plain baseline:
    K-way head, cross-entropy, no averaging, the same sparse method.

    ``average_epochs=None`` averages over the last 20% of epochs (reference: 20 of
    100); the average is updated during the first ``average_fraction`` of each epoch's
    steps (reference: 10%).

    Example::

        >>> MoonConfig().resolved_average_epochs(30)
        6
        >>> MoonConfig(enabled=False).resolved_average_epochs(30)
        0
    """

    enabled: bool = True
    warmup_epochs: int = 5
    init_factor: float = 64.0
    a_final: float = 1.0
    average_epochs: int | None = None
    average_fraction: float = 0.1
    #: synthesized unknowns (beyond the paper; :mod:`moonprune.unknowns`): ``none`` (MOON
    #: as published), ``synth``, or generator names joined by ``+``; a fraction of each
    #: batch, labelled K, their cross-entropy weighted and added to MOON's loss; the
    #: fraction 0.125 keeps an epoch within issue 18's 1.3x of plain's time (blur, lowfreq,
    #: mixup, synth: 1.17-1.22x), where 0.25 cost 1.23-1.56x (RESULTS unknowns-timing*); the
    #: weight 0.1 (0.5 until session 20, the issue's untuned prototype): at 0.5 the
    #: synthesized rows take the few weights a 95%-sparse network has from the ID classes
    #: (accuracy on its own training rows falls 10-15 points; RESULTS unknowns-fit), and
    #: on mnist5k 0.1 keeps more accuracy and more MSP AUROC in every (architecture,
    #: sparsity) of the grid, while 0.05 gains nothing consistent over 0.1 (RESULTS "What
    #: the weight grids say")
    unknowns: str = "none"
    unknowns_fraction: float = 0.125
    unknowns_weight: float = 0.1
    #: the K+1 head (:mod:`moonprune.heads`): ``mean`` (MOON as published) or
    #: ``separate`` (unknown logit = logsumexp(known) + its own row on detached features):
    #: with ``--unknowns`` it keeps more accuracy at 95% sparsity on mnist5k but loses
    #: near-OOD MSP AUROC elsewhere, so it is not the default (README, "Synthesized
    #: unknowns")
    unknown_head: str = "mean"

    def __post_init__(self) -> None:
        check_moon(self)

    def resolved_average_epochs(self, epochs: int) -> int:
        """Averaging epochs for a run of ``epochs``: 0 when MOON is off."""
        if not self.enabled:
            return 0
        n = round(0.2 * epochs) if self.average_epochs is None else self.average_epochs
        if n >= epochs:
            raise ConfigError(
                f"average_epochs={n} leaves no epoch for sparse training out of {epochs}; "
                "lower average_epochs or raise epochs"
            )
        return n


@dataclass(frozen=True)
class Gates:
    """Bounds a model must meet; ``None`` = not checked. Fractions, not percent.

    Example::

        >>> gates = Gates(min_auroc=0.9, max_accuracy_drop=0.01)
        >>> gates.needs_baseline
        True
    """

    min_auroc: float | None = None
    max_fpr95: float | None = None
    min_accuracy: float | None = None
    max_accuracy_drop: float | None = None
    max_ece: float | None = None
    max_auroc_drop: float | None = None

    def __post_init__(self) -> None:
        check_gates(self)

    @property
    def needs_baseline(self) -> bool:
        return self.max_accuracy_drop is not None or self.max_auroc_drop is not None

    @property
    def any(self) -> bool:
        return any(v is not None for v in asdict(self).values())


@dataclass(frozen=True)
class CompressConfig:
    """Everything ``moonprune compress`` needs; :func:`load_recipe` builds it.

    ``normalize`` (``--normalize``): how the dense model's inputs were normalised,
    ``auto`` (default), ``none``, ``dataset``, ``symmetric``, ``imagenet``, ``0-255`` or
    ``mean=...;std=...`` (:mod:`moonprune.normalization`).

    Example::

        >>> cfg = CompressConfig(checkpoint="dense.pt", data="digits:0-5", out="run")
        >>> cfg.sparsity.method, cfg.train.epochs, cfg.moon.enabled
        ('rigl', 30, True)
    """

    checkpoint: str
    data: str
    out: str
    ood: tuple[str, ...] = ()
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    head_layer: str | None = None
    trust_checkpoint: bool = False
    image_size: tuple[int, int] | None = None
    channels: int | None = None
    on_bad_image: str = "skip"
    #: processes reading a folder's batches; None: one per CPU beyond the first, <= 4
    workers: int | None = None
    device: str = "auto"
    export: bool = True
    #: the deployed OOD score; mahalanobis++ by evidence (README "OOD scores"): the logit
    #: scores fall below chance on far-OOD inputs in benchmarks/RESULTS.md, and plain
    #: mahalanobis loses 1-3 points after sparse fine-tuning where normalising keeps them
    score: str = "mahalanobis++"
    tpr: float = 0.95
    ece_bins: int = 15
    temperature: str | float = "auto"
    #: KNN score: at most this many training features in the graph, k-th nearest.
    feature_bank: int = 2000
    knn_k: int = 10
    normalize: str = "auto"
    train: TrainConfig = field(default_factory=TrainConfig)
    moon: MoonConfig = field(default_factory=MoonConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    gates: Gates = field(default_factory=Gates)

    def __post_init__(self) -> None:
        check_compress(self)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready resolved recipe (what a saved run records)."""
        d = dataclasses.asdict(self)
        d["ood"] = list(self.ood)
        return d


_SECTIONS: dict[str, type] = {
    "train": TrainConfig,
    "moon": MoonConfig,
    "sparsity": SparsityConfig,
    "gates": Gates,
}


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {where}; valid keys are: {', '.join(sorted(names))}"
        )
    check_types(cls, values, where)
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"bad value in {where}: {exc}") from None


def build_config(values: dict[str, Any]) -> CompressConfig:
    """A :class:`CompressConfig` from a nested dict (recipe shape), validated.

    Example::

        >>> cfg = build_config({"checkpoint": "d.pt", "data": "digits", "out": "o",
        ...                     "sparsity": {"method": "gmp", "sparsity": 0.8}})
        >>> cfg.sparsity.method, cfg.sparsity.sparsity
        ('gmp', 0.8)
    """
    for name in _SECTIONS:
        if not isinstance(values.get(name, {}), dict):
            raise ConfigError(
                f"[{name}] in the recipe must be a table (e.g. [{name}] on its own line, "
                f"then key = value lines), got {values[name]!r}"
            )
    top = {k: v for k, v in values.items() if k not in _SECTIONS}
    if "ood" in top:
        top["ood"] = tuple(top["ood"])
    if top.get("image_size") is not None:
        top["image_size"] = tuple(top["image_size"])
    sections = {
        name: _build(cls, dict(values.get(name, {})), f"[{name}]")
        for name, cls in _SECTIONS.items()
    }
    chosen = values.get("sparsity", {})
    if chosen.get("method") == "channel" and not {"sparsity", "macs_target", "speedup"} & {
        k for k, v in chosen.items() if v is not None
    }:  # channel pruning with no target aims at speed
        sections["sparsity"] = dataclasses.replace(
            sections["sparsity"], speedup=DEFAULT_CHANNEL_SPEEDUP
        )
    return _build(CompressConfig, {**top, **sections}, "the recipe")
