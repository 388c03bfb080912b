"""The divergence guard: a diverged epoch is rolled back and rerun at half the lr.

An epoch diverged when its loss is non-finite, or both far above the first epoch's and
above chance level. The trainer then restores the last good state (kept in memory),
halves the lr and reruns the epoch, at most ``max_rollbacks`` times.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

from moonprune.errors import ConfigError
from moonprune.train_records import Rollback, _Diverged
from moonprune.training_state import TrainerState

logger = logging.getLogger(__name__)


class DivergenceGuard(TrainerState):
    """The check after each epoch and the rollback to the last good state."""

    def _check_divergence(self, epoch: int) -> None:
        """Raise :class:`_Diverged` when this epoch's loss is non-finite, or both far
        above the first epoch's and above chance level, ``ln(outputs)`` (the loss of a
        uniform prediction). Both conditions: a pretrained model's loss can grow several
        times from a tiny start (0.02 -> 0.07 as sparsity ramps up) and stay healthy."""
        loss = self.history[-1].loss
        first = self.history[0].loss
        if not math.isfinite(loss):
            raise _Diverged(f"the epoch loss became {loss}")
        chance = math.log(max(self._outputs, 2))
        if epoch > 0 and loss > self.cfg.divergence_factor * first and loss > chance:
            raise _Diverged(
                f"the epoch loss {loss:.4g} is over {self.cfg.divergence_factor:g}x the first "
                f"epoch's ({first:.4g}) and above chance level ({chance:.3g})"
            )

    def _roll_back(self, good: dict[str, Any], epoch: int, reason: str) -> None:
        """Restore ``good``, halve the lr, record it; stop after ``max_rollbacks``."""
        loss = self.history[-1].loss if len(self.history) > len(good["history"]) else math.nan
        before = self.lr_scale
        rollbacks = list(self.rollbacks)
        if len(rollbacks) >= self.cfg.max_rollbacks:
            lr = self.cfg.lr * before
            raise ConfigError(
                f"training diverged at epoch {epoch + 1} ({reason}) even at lr {lr:.3g}, after "
                f"{len(rollbacks)} rollback(s); rerun with a lower --lr (e.g. --lr {lr / 4:.2g}) "
                "or check the data for NaN or mislabelled rows"
            )
        self._load(copy.deepcopy(good))
        self.lr_scale = before / 2
        self.rollbacks = [*rollbacks, Rollback(epoch, loss, reason, before, self.lr_scale)]
        logger.warning(
            "epoch %d diverged (%s): restored the last good state, rerunning at lr x%g",
            epoch + 1, reason, self.lr_scale,
        )  # fmt: skip
