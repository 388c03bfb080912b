"""``--method channel``'s settings as a run uses them: target, steps, epochs per stage.

Read from :class:`~moonprune.config.SparsityConfig` and checked before anything is
trained (:func:`check_channel_config`); ``moonprune methods`` lists the method from
its registry entry (:data:`moonprune.sparsity.METHODS`).
"""

from __future__ import annotations

from moonprune.config import DEFAULT_CHANNEL_SPEEDUP, CompressConfig, SparsityConfig
from moonprune.errors import ConfigError
from moonprune.sparsity.channel.structure import require_torch_pruning

DEFAULT_STEPS = 4


def resolved_steps(steps: int | None, epochs: int) -> int:
    """The pruning steps: as configured, or ``min(DEFAULT_STEPS, epochs)``."""
    return steps if steps is not None else max(1, min(DEFAULT_STEPS, epochs))


def channel_target(sp: SparsityConfig) -> tuple[float | None, str]:
    """(kept fraction, measure): ``auto`` (no fraction), 1 / speed-up of latency, a MAC
    or a parameter fraction."""
    if sp.speedup == DEFAULT_CHANNEL_SPEEDUP:
        return None, "auto"
    if isinstance(sp.speedup, int | float):
        return 1 / sp.speedup, "latency"
    if sp.macs_target is not None:
        return sp.macs_target, "macs"
    return 1 - sp.sparsity, "params"


def stage_epochs(epochs: int, steps: int) -> list[int]:
    """Epochs per stage: as equal as possible, at least one each."""
    if epochs < steps:
        raise ConfigError(
            f"--method channel prunes in {steps} steps and fine-tunes after each: it needs "
            f"at least {steps} epochs, got {epochs}"
        )
    base, extra = divmod(epochs, steps)
    return [base + (1 if i >= steps - extra else 0) for i in range(steps)]


def check_channel_config(cfg: CompressConfig) -> None:
    """Fail early on options that cannot work with channel pruning."""
    stage_epochs(cfg.train.epochs, resolved_steps(cfg.sparsity.steps, cfg.train.epochs))
    require_torch_pruning()
