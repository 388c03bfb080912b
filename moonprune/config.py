"""Typed, frozen configuration for a compress run, and the recipe file parser.

One fact, one field: the number of known classes K comes from the data and the
model, never from a setting, and the K+1 head follows from ``moon.enabled``.
The recipe (``--config recipe.toml``) is parsed here and nowhere else; command-line
flags override it. A saved run records :meth:`CompressConfig.as_dict`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from moonprune.augment import check_augment
from moonprune.errors import ConfigError
from moonprune.normalization import check_normalize
from moonprune.recipe import check_types
from moonprune.sparsity.base import MaskerConfig
from moonprune.unknowns import check_unknowns


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
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}; e.g. --epochs 30")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be an integer in [0, 2**32), got {self.seed}")
        for name in ("lr", "lr_peak_factor", "lr_floor_factor"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.update_end <= 1:
            raise ConfigError(f"update_end must be in (0, 1], got {self.update_end}")
        if not (math.isfinite(self.lr_warmup_epochs) and self.lr_warmup_epochs >= 0):
            raise ConfigError(f"lr_warmup_epochs must be >= 0, got {self.lr_warmup_epochs}")
        check_augment(self.augment)
        if self.max_rollbacks < 0:
            raise ConfigError(f"max_rollbacks must be >= 0, got {self.max_rollbacks}")
        if not (math.isfinite(self.divergence_factor) and self.divergence_factor > 1):
            raise ConfigError(f"divergence_factor must be > 1, got {self.divergence_factor}")


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
    #: batch, labelled K, their cross-entropy weighted and added to MOON's loss
    unknowns: str = "none"
    unknowns_fraction: float = 0.25
    unknowns_weight: float = 0.5

    def __post_init__(self) -> None:
        check_unknowns(self.unknowns, self.unknowns_fraction, self.unknowns_weight)
        if self.warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not (math.isfinite(self.init_factor) and self.init_factor > 0):
            raise ConfigError(f"init_factor must be > 0, got {self.init_factor}")
        if not (math.isfinite(self.a_final) and self.a_final >= 0):
            raise ConfigError(f"a_final must be >= 0, got {self.a_final}")
        if self.average_epochs is not None and self.average_epochs < 0:
            raise ConfigError(f"average_epochs must be >= 0, got {self.average_epochs}")
        if not 0 < self.average_fraction <= 1:
            raise ConfigError(f"average_fraction must be in (0, 1], got {self.average_fraction}")

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


DEFAULT_CHANNEL_SPEEDUP = "auto"  # --method channel with no target (sparsity.channel.search)
#: SparsityConfig fields only ``--method channel`` takes: field -> (default, CLI flag)
CHANNEL_OPTIONS: dict[str, tuple[object, str]] = {
    "speedup": (None, "--speedup"),
    "macs_target": (None, "--macs-target"),
    "allocation": ("latency", "--allocation"),
    "round_to": (None, "--round-to"),
    "importance": ("magnitude", "--importance"),
    "steps": (None, "--prune-steps"),
    "latency_batch": (64, "--latency-batch"),
    "threads": (None, "--latency-threads"),
}
#: ... and those only the unstructured maskers take (no flag: recipe only)
UNSTRUCTURED_OPTIONS: dict[str, tuple[object, str]] = {
    "distribution": ("erk", "--distribution"),
    "update_interval": (None, ""),
    "drop_fraction": (None, ""),
}


def method_options(method: str) -> list[str]:
    """The sparsity options ``method`` takes (CLI flags; recipe-only fields as
    ``sparsity.<field>``), for ``moonprune methods``."""
    own = CHANNEL_OPTIONS if method == "channel" else UNSTRUCTURED_OPTIONS
    return ["--sparsity", *(flag or f"sparsity.{name}" for name, (_, flag) in own.items())]


@dataclass(frozen=True)
class SparsityConfig:
    """Which sparse method, how sparse, and how layer densities are distributed.

    For ``method = "channel"``, ``sparsity`` is the fraction of parameters removed
    (or ``macs_target`` the fraction of dense MACs kept), in ``steps`` pruning steps
    ranked by ``importance`` (``magnitude`` or ``taylor``); ``round_to`` keeps every
    pruned layer's channel count a multiple of it (onnxruntime's CPU convolutions are
    blocked by 8 or 16 channels: odd counts can make a slimmer model slower);
    ``allocation`` shares the removed channels out between layers: ``latency`` (the
    default: widths chosen by timing whole candidate networks in onnxruntime on this
    machine), ``uniform`` (the same fraction everywhere) or ``global``
    (a MAC-aware ranking across layers; with ``round_to`` it leaves layers of
    ``round_to`` channels or fewer whole; see :mod:`moonprune.sparsity.channel`).
    ``speedup`` is a speed target instead: the dense latency / the pruned one at
    batch ``latency_batch`` with ``threads`` onnxruntime threads (default: the CPUs
    this process may use), measured on candidate networks before training; with no
    target at all it is ``"auto"``: the least-pruned candidate clearly faster than
    dense at batch 1 and at ``latency_batch`` (:mod:`moonprune.sparsity.channel.search`).
    ``steps`` defaults to ``min(4, epochs)``.

    Example::

        >>> SparsityConfig(method="set", sparsity=0.95).masker_config(seed=1).density
        0.05...
    """

    method: str = "rigl"
    sparsity: float = 0.9
    distribution: str = "erk"
    update_interval: int | None = None
    drop_fraction: float | None = None
    macs_target: float | None = None
    steps: int | None = None
    importance: str = "magnitude"
    round_to: int | None = None
    allocation: str = "latency"
    speedup: float | str | None = None
    latency_batch: int = 64
    threads: int | None = None

    def __post_init__(self) -> None:
        self.masker_config(seed=0)  # validates the shared fields in one place
        if self.round_to is not None and (
            isinstance(self.round_to, bool) or not isinstance(self.round_to, int)
            or self.round_to < 1
        ):  # fmt: skip
            raise ConfigError(
                f"round_to must be a whole number of channels >= 1, got {self.round_to!r}; e.g. 8"
            )
        if self.macs_target is not None and not 0 < self.macs_target < 1:
            raise ConfigError(
                f"macs_target must be in (0, 1), got {self.macs_target}; e.g. 0.5 keeps half"
            )
        if self.importance not in ("magnitude", "taylor"):
            raise ConfigError(f"importance must be magnitude or taylor, got {self.importance!r}")
        if self.allocation not in ("uniform", "global", "latency"):
            raise ConfigError(
                f"allocation must be latency, global or uniform, got {self.allocation!r}"
            )
        if self.speedup not in (None, DEFAULT_CHANNEL_SPEEDUP) and (
            isinstance(self.speedup, bool) or not isinstance(self.speedup, int | float)
            or not self.speedup > 1
        ):  # fmt: skip
            raise ConfigError(
                f"speedup must be > 1 or 'auto', got {self.speedup!r}; e.g. 2 (twice as fast)"
            )
        if self.speedup is not None and self.macs_target is not None:
            raise ConfigError("give one channel target: --speedup or --macs-target, not both")
        for name in ("latency_batch", "threads", "steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):  # fmt: skip
                raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
        self._check_method_options()

    def _check_method_options(self) -> None:
        """An option the chosen method ignores is a mistake worth one line, not silence."""
        if self.method == "channel":
            ignored, needs = UNSTRUCTURED_OPTIONS, "an unstructured method (rigl, set, ...)"
        else:
            ignored, needs = CHANNEL_OPTIONS, "--method channel"
        for field_name, (default, flag) in ignored.items():
            if getattr(self, field_name) != default:
                label = f"{flag} (sparsity.{field_name})" if flag else f"sparsity.{field_name}"
                raise ConfigError(
                    f"{label} applies to {needs} only, not to --method {self.method}; drop it"
                )

    def masker_config(self, seed: int) -> MaskerConfig:
        """The masker's settings for a run seeded with ``seed``."""
        return MaskerConfig(
            sparsity=self.sparsity,
            distribution=self.distribution,
            update_interval=self.update_interval,
            drop_fraction=self.drop_fraction,
            seed=seed,
        )


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
        for name, value in asdict(self).items():
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"--{name.replace('_', '-')} must be a number, got {value}")
            if value is not None and not 0 <= value <= 1:
                hint = f"; did you mean {value / 100:.2f}?" if 1.5 < value <= 100 else ""
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be a fraction in [0, 1] (e.g. 0.9), "
                    f"got {value}{hint}"
                )

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
        if not 0 < self.tpr < 1:
            raise ConfigError(f"tpr must be in (0, 1), got {self.tpr}; e.g. --tpr 0.95")
        if self.temperature != "auto" and not (
            isinstance(self.temperature, int | float)
            and math.isfinite(self.temperature)
            and self.temperature > 0
        ):
            raise ConfigError(
                f"temperature must be 'auto' or a number > 0, got {self.temperature!r}; "
                "1 turns temperature scaling off"
            )
        if self.ece_bins < 1:
            raise ConfigError(f"ece_bins must be >= 1, got {self.ece_bins}")
        check_normalize(self.normalize)
        if not 1 <= self.knn_k <= self.feature_bank:
            raise ConfigError(
                f"knn_k ({self.knn_k}) must be >= 1 and at most feature_bank "
                f"({self.feature_bank}); e.g. knn_k = 10, feature_bank = 2000"
            )
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ConfigError(f"image_size must be [height, width], got {self.image_size}")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels}")
        if self.on_bad_image not in ("skip", "fail"):
            raise ConfigError(f"on_bad_image must be 'skip' or 'fail', got {self.on_bad_image!r}")
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 0):
            raise ConfigError(f"workers must be 0 or more, got {self.workers}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")

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
