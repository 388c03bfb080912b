"""The masker lifecycle: one small base class for every sparse-training method.

A masker owns one boolean mask per prunable weight (conv and linear, see
:func:`moonprune.conventions.prunable_weights`), keyed by parameter name
(``"features.0.weight"``). The training loop drives it::

    masker.prepare(model, TopologySchedule(total_steps, end_step, steps_per_epoch), optimizer)
    for each batch:
        optimizer.zero_grad()
        loss.backward()          # weight.grad is the *dense* gradient: masks are applied to the
        optimizer.step()         # weights, not as a parametrization, so backward sees every entry
        masker.step()            # before the next zero_grad: RigL reads .grad here
    masks = masker.finalize()    # bake the masks into the weights, detach from the model

Masks live in the masker (not in the model), so copies of the model (weight
averaging, export) carry only plain weights with exact zeros. When an optimizer is
given, its per-weight state (momentum, Adam moments: every state tensor with the
weight's shape) is zeroed where the mask is off, so a weight that is grown later
starts from zero value *and* zero momentum.

The unknown row of a K+1 head is never pruned, and counts in the global budget
(:mod:`moonprune.sparsity.budget`): the base class enforces it for every masker,
plug-ins included.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch

from moonprune.conventions import prunable_weights
from moonprune.errors import ConfigError
from moonprune.sparsity.budget import keep_pinned_, pinned_entries, target_counts
from moonprune.sparsity.budget import top_k_mask as top_k_mask
from moonprune.sparsity.config import MaskerConfig as MaskerConfig
from moonprune.sparsity.config import TopologySchedule as TopologySchedule


class Masker(abc.ABC):
    """Base class of every sparse-training method.

    Subclasses set ``name`` and ``description`` (one line, shown by the registry),
    implement :meth:`initial_masks`, and, when the topology changes during training,
    :meth:`update_due` and :meth:`update`. The base class does everything else:
    applying masks to weights and optimizer state, counting steps and updates,
    stopping updates at ``end_step``, ``stats``, ``state_dict`` and ``finalize``.

    Example::

        >>> import torch
        >>> from moonprune import MASKERS, MaskerConfig, TopologySchedule
        >>> model = torch.nn.Sequential(torch.nn.Linear(20, 20), torch.nn.Linear(20, 4))
        >>> masker = MASKERS.create("magnitude", MaskerConfig(sparsity=0.5, distribution="uniform"))
        >>> masker.prepare(model, TopologySchedule(total_steps=10, end_step=7, steps_per_epoch=5))
        >>> masker.stats()["density"]
        0.5
        >>> int((model[0].weight == 0).sum())
        200
    """

    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, config: MaskerConfig) -> None:
        if not isinstance(config, MaskerConfig):
            raise ConfigError(
                f"{type(self).__name__} needs a MaskerConfig, got {type(config).__name__}; "
                "build one with MaskerConfig(sparsity=...)"
            )
        self.config = config
        self.masks: dict[str, torch.Tensor] = {}
        self.step_count = 0
        self.updates = 0
        self._params: dict[str, torch.Tensor] = {}
        self._pinned: dict[str, torch.Tensor] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._schedule: TopologySchedule | None = None

    # -- what subclasses provide --------------------------------------------------
    @abc.abstractmethod
    def initial_masks(self) -> dict[str, torch.Tensor]:
        """Masks at the start of training, from the dense weights (called by prepare)."""

    def update_due(self, step: int) -> bool:
        """Whether the topology changes after optimizer step ``step`` (1-based).

        Only asked for ``step < schedule.end_step``.
        """
        del step
        return False

    def update(self) -> None:
        """Change ``self.masks`` in place of the old ones (called when :meth:`update_due`).

        When it runs, every weight outside the old masks is already exactly 0 with zero
        optimizer state, so a newly grown weight needs no reset.
        """
        raise NotImplementedError(f"{type(self).__name__} has a fixed topology")

    def extra_state(self) -> dict[str, Any]:
        """Method-specific state to save (e.g. an RNG)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""
        del state

    # -- lifecycle ----------------------------------------------------------------
    @property
    def schedule(self) -> TopologySchedule:
        if self._schedule is None:
            raise RuntimeError(f"{type(self).__name__}.prepare(model, ...) was not called")
        return self._schedule

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """The masked weights by parameter name."""
        return self._params

    def pinned(self, name: str) -> torch.Tensor:
        """Bool mask (the weight's shape) of the entries of ``name`` that always stay
        active: the unknown row of a K+1 head, else nothing."""
        found = self._pinned.get(name)
        if found is None:
            return torch.zeros_like(self._params[name], dtype=torch.bool)
        return found

    def target_counts(self) -> dict[str, int]:
        """Kept weights per layer at the target density (ERK or uniform), pinned entries
        included and counted in the budget (:mod:`moonprune.sparsity.budget`)."""
        return target_counts(self._params, self._pinned, self.config)

    def magnitude_masks(self, counts: dict[str, int]) -> dict[str, torch.Tensor]:
        """Per layer, keep the ``counts[name]`` weights of largest ``|w|``."""
        return {n: top_k_mask(p.detach().abs(), counts[n]) for n, p in self._params.items()}

    def prepare(
        self,
        model: torch.nn.Module,
        schedule: TopologySchedule,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """Attach to ``model``: compute the initial masks and zero the pruned weights.

        ``optimizer`` (optional) is the one that steps ``model``: its per-weight state is
        zeroed at pruned positions after every step.
        """
        self._params = dict(prunable_weights(model))
        if not self._params:
            raise ConfigError(
                f"{type(model).__name__} has no conv or linear layer to prune; "
                "sparse methods need nn.Conv*d or nn.Linear weights"
            )
        self._pinned = pinned_entries(model, self._params)
        self._schedule = schedule
        self._optimizer = optimizer
        self.step_count = 0
        self.updates = 0
        with torch.no_grad():
            self.masks = self.initial_masks()
            self._keep_pinned_()
        self.apply_masks_()

    def step(self) -> None:
        """Call after every ``optimizer.step()`` (and before the next ``zero_grad``).

        Zeroes what the optimizer step moved outside the masks; then, if an update is
        due at this step and ``step < end_step``, changes the topology and applies the
        new masks.
        """
        self.step_count += 1
        self.apply_masks_()
        if self.step_count < self.schedule.end_step and self.update_due(self.step_count):
            with torch.no_grad():
                self.update()
                self._keep_pinned_()
            self.updates += 1
            self.apply_masks_()

    def _keep_pinned_(self) -> None:
        """Switch on every inactive pinned entry, each in place of the active unpinned
        entry of smallest ``|w|`` in its layer (the layer's count is kept)."""
        keep_pinned_(self.masks, self._pinned, self._params)

    def apply_masks_(self) -> None:
        """Set pruned weights (and their optimizer state) to exactly ``+0.0``."""
        with torch.no_grad():
            for name, param in self._params.items():
                pruned = ~self.masks[name]
                param.masked_fill_(pruned, 0.0)
                if self._optimizer is None:
                    continue
                for value in self._optimizer.state.get(param, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        value.masked_fill_(pruned, 0.0)

    def finalize(self) -> dict[str, torch.Tensor]:
        """Apply the masks one last time, let go of the optimizer, return the masks.

        Returns name -> bool tensor on the CPU (copies: later changes do not leak).
        """
        self.apply_masks_()
        self._optimizer = None
        return {n: m.detach().cpu().clone() for n, m in self.masks.items()}

    # -- introspection ------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """``density`` (kept / total over the masked weights), ``updates`` and ``step``."""
        kept = sum(int(m.sum()) for m in self.masks.values())
        total = sum(m.numel() for m in self.masks.values())
        return {
            "density": kept / total if total else 1.0,
            "updates": float(self.updates),
            "step": float(self.step_count),
        }

    # -- resume -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: masks, counters, method state.

        Only tensors, numbers, strings and dicts, so ``torch.load(weights_only=True)``
        reads it.
        """
        return {
            "masks": {n: m.detach().cpu().clone() for n, m in self.masks.items()},
            "step_count": self.step_count,
            "updates": self.updates,
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` after :meth:`prepare` on the same architecture."""
        masks = state["masks"]
        if set(masks) != set(self._params):
            raise ConfigError(
                "masker state does not match the model's prunable layers: "
                f"saved {sorted(masks)}, model {sorted(self._params)}; "
                "resume with the same model and method"
            )
        for name, mask in masks.items():
            if mask.shape != self._params[name].shape:
                raise ConfigError(
                    f"saved mask for {name!r} has shape {tuple(mask.shape)}, the weight "
                    f"{tuple(self._params[name].shape)}; resume with the same model"
                )
        self.masks = {n: m.to(self._params[n].device).bool() for n, m in masks.items()}
        self.step_count = int(state["step_count"])
        self.updates = int(state["updates"])
        self.load_extra_state(state["extra"])
        with torch.no_grad():
            self._keep_pinned_()
        self.apply_masks_()
