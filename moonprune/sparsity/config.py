"""The settings of a sparse method: what a run asks for, and what a masker runs under.

- :class:`SparsityConfig`, the ``[sparsity]`` section of a recipe (``--method``,
  ``--sparsity`` and the options of each method), validated here with the tables of
  which options each method takes (:data:`CHANNEL_OPTIONS`,
  :data:`UNSTRUCTURED_OPTIONS`);
- :class:`MaskerConfig`, the part every masker reads, and :class:`TopologySchedule`,
  when a masker may change its masks (:mod:`moonprune.sparsity.base`).
"""

from __future__ import annotations

from dataclasses import dataclass

from moonprune.errors import ConfigError


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TopologySchedule:
    """When a masker may change its masks, in optimizer steps.

    Steps are counted from 1 (the first ``masker.step()`` is step 1). Updates happen
    only at steps ``t < end_step``: ``end_step`` is the first step at which the
    topology is frozen. The trainer sets it to
    ``min(update_end * total_steps, first averaging step)`` so that weight averaging
    always sees a fixed set of zeros.

    Example::

        >>> TopologySchedule(total_steps=100, end_step=75, steps_per_epoch=10).end_step
        75
    """

    total_steps: int
    end_step: int
    steps_per_epoch: int

    def __post_init__(self) -> None:
        for field in ("total_steps", "end_step", "steps_per_epoch"):
            if not _is_int(getattr(self, field)):
                raise ConfigError(
                    f"{field} must be an integer number of steps, got {getattr(self, field)!r}"
                )
        if self.total_steps < 1 or self.steps_per_epoch < 1:
            raise ConfigError(
                f"a training run needs at least one step (total_steps={self.total_steps}, "
                f"steps_per_epoch={self.steps_per_epoch}); use more data or a smaller batch"
            )
        if not 0 <= self.end_step <= self.total_steps:
            raise ConfigError(
                f"end_step={self.end_step} must lie in [0, total_steps={self.total_steps}]"
            )


@dataclass(frozen=True)
class MaskerConfig:
    """Settings shared by all maskers; a method ignores what it does not use.

    ``update_interval`` (steps between topology updates) and ``drop_fraction`` (``r_0``
    of SET/RigL) are ``None`` for the method's default.

    Example::

        >>> MaskerConfig(sparsity=0.9).density
        0.09999...
    """

    sparsity: float = 0.9
    distribution: str = "erk"
    update_interval: int | None = None
    drop_fraction: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, bool) or not (
            isinstance(self.sparsity, float | int) and 0.0 < self.sparsity < 1.0
        ):
            raise ConfigError(
                f"sparsity must be in (0, 1), got {self.sparsity!r}; e.g. --sparsity 0.9 "
                "keeps 10% of the weights"
            )
        if self.distribution not in ("erk", "uniform"):
            raise ConfigError(
                f"unknown layer-density distribution {self.distribution!r}; use 'erk' or 'uniform'"
            )
        if self.update_interval is not None and not (
            _is_int(self.update_interval) and self.update_interval >= 1
        ):
            raise ConfigError(
                f"update_interval must be a whole number of steps >= 1, got "
                f"{self.update_interval!r}; leave it unset for the method's default"
            )
        if self.drop_fraction is not None and (
            isinstance(self.drop_fraction, bool)
            or not isinstance(self.drop_fraction, float | int)
            or not 0.0 < self.drop_fraction < 1.0
        ):
            raise ConfigError(
                f"drop_fraction must be in (0, 1), got {self.drop_fraction!r}; "
                "e.g. 0.3 (RigL) or 0.5 (SET)"
            )
        if not _is_int(self.seed):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")

    @property
    def density(self) -> float:
        """Global fraction of prunable weights kept: ``1 - sparsity``."""
        return 1.0 - self.sparsity


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


#: The options of each structured method (every masker takes UNSTRUCTURED_OPTIONS);
#: :mod:`moonprune.sparsity.methods` lists the methods with them.
STRUCTURED_OPTIONS: dict[str, dict[str, tuple[object, str]]] = {"channel": CHANNEL_OPTIONS}


def options_of(method: str) -> dict[str, tuple[object, str]]:
    """The method-specific options ``method`` takes: field -> (default, CLI flag)."""
    return STRUCTURED_OPTIONS.get(method, UNSTRUCTURED_OPTIONS)


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
        own = options_of(self.method)
        every = {"an unstructured method (rigl, set, ...)": UNSTRUCTURED_OPTIONS}
        every |= {f"--method {name}": table for name, table in STRUCTURED_OPTIONS.items()}
        for needs, table in every.items():
            for field_name, (default, flag) in table.items():
                if field_name in own or getattr(self, field_name) == default:
                    continue
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
