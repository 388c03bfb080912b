"""Every pruning method in one registry: the maskers and channel pruning.

Both kinds follow one lifecycle, **prepare → step → finalize**, with ``stats`` and
``state_dict`` / ``load_state_dict`` for ``--resume``:

- a *masker* (unstructured: zeroes weights, :class:`~moonprune.sparsity.base.Masker`)
  is prepared on the model (``prepare(model, schedule, optimizer)``), steps after
  every optimizer step and finalizes to its masks;
- *channel pruning* (structured: removes whole channels, a smaller network,
  :class:`~moonprune.sparsity.channel.pruner.ChannelPruner`) is prepared when it is
  built on the model (it measures the dense sizes and, with the latency allocation,
  times candidate widths), steps between fine-tuning stages (one pruning step each)
  and finalizes to the pruned network's structure.

:data:`METHODS` lists both with the options each takes (``moonprune methods``,
``--method``). Maskers, plug-ins included, come from
:data:`~moonprune.sparsity.MASKERS`; a structured method's entry is defined in its
own package (:mod:`moonprune.sparsity.channel.entry`) and listed here. This
module imports no training code and nothing of Torch-Pruning: channel pruning's
modules load only when a structured method is created.

Example::

    >>> from moonprune.sparsity import METHODS
    >>> [n for n in METHODS.names() if METHODS.info(n).origin == "moonprune"]
    ['channel', 'gmp', 'magnitude', 'rigl', 'set', 'torch-ao']
    >>> METHODS.info("channel").structured, METHODS.info("rigl").steps
    (True, 'after every optimizer step')
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from moonprune.errors import ConfigError, did_you_mean
from moonprune.sparsity.base import Masker
from moonprune.sparsity.channel.entry import CHANNEL_METHOD
from moonprune.sparsity.config import SparsityConfig, options_of
from moonprune.sparsity.method_info import MethodInfo
from moonprune.sparsity.registry import MaskerRegistry

if TYPE_CHECKING:
    from moonprune.sparsity.channel.pruner import ChannelPruner

#: The structured methods moonprune ships, each entry defined in its own package.
STRUCTURED: dict[str, MethodInfo] = {CHANNEL_METHOD.name: CHANNEL_METHOD}


class MethodRegistry:
    """The maskers of a :class:`~moonprune.sparsity.registry.MaskerRegistry` and the
    structured methods, listed and looked up together."""

    def __init__(self, maskers: MaskerRegistry) -> None:
        self.maskers = maskers

    def names(self) -> list[str]:
        """Every method name, sorted."""
        return sorted({*self.maskers.names(), *STRUCTURED})

    def info(self, name: str) -> MethodInfo:
        """The entry of ``name``; an unknown name is a ConfigError with the closest."""
        if name in STRUCTURED:
            return STRUCTURED[name]
        if name in self.maskers:
            cls = self.maskers.get(name)
            return MethodInfo(name, cls.description, self.maskers.origin(name), False,
                              tuple(options_of(name)))  # fmt: skip
        hint = did_you_mean(name, self.names())
        raise ConfigError(
            f"unknown sparse method {name!r}{hint}; choose one of: {', '.join(self.names())}"
        )

    def is_structured(self, name: str) -> bool:
        """True for a method that removes channels instead of zeroing weights."""
        return self.info(name).structured

    def describe(self) -> dict[str, str]:
        """Name -> one-line description."""
        return {n: self.info(n).description for n in self.names()}

    def create(
        self, name: str, config: SparsityConfig, seed: int = 0, *, model: nn.Module | None = None,
        example: torch.Tensor | None = None, head_layer: str | None = None, steps: int = 1,
    ) -> Masker | ChannelPruner:  # fmt: skip
        """The method's lifecycle object: a masker (``prepare`` it on the model next), or
        a channel pruner built, and so prepared, on ``model`` (``example``: an input
        batch, ``head_layer``: the classifier it never prunes) to prune in ``steps``."""
        if not self.is_structured(name):
            return self.maskers.create(name, config.masker_config(seed))
        if model is None or example is None or head_layer is None:
            raise ConfigError(f"--method {name} is built on the model: pass model, example, head")
        from moonprune.sparsity.channel.pruner import ChannelPruner

        return ChannelPruner.from_config(model, example, head_layer, config, steps)

    def __contains__(self, name: object) -> bool:
        return name in STRUCTURED or name in self.maskers
