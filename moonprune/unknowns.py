"""Synthesized unknowns (``--unknowns``): rows labelled "unknown" (column K), made from
the batch itself, so the K+1 output gets direct evidence without any OOD data.

MOON never shows the network an example of "unknown"; cross-entropy lowers the unknown
logit on every correctly classified row and p(unknown) ends near 1e-7
(benchmarks/RESULTS.md). This module adds, to each training batch of ``n`` ID rows,
``m = round(fraction * n)`` synthesized rows labelled K, and to the loss

    L = L_MOON(ID rows) + weight * mean_j CE(z_j, K)        (j over synthesized rows)

Generators (a registry, like the maskers'; the built-in ones and what each makes are
:mod:`moonprune.unknown_generators`) make rows in the input space, forwarded with the
ID rows (so BatchNorm sees them), or in the feature space (``vos``), where they go
through the final classifier only.

``synth`` is the evidence-chosen set (:data:`SYNTH_SET`, blur+mixup; see
``benchmarks/unknowns_targets.py`` and RESULTS.md), not the default of ``compress``;
``none``, the default, is MOON as published, and
leaves the training path untouched. Names can be joined with ``+`` (``patch4+vos``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moonprune.conventions import UNKNOWN_ROW_ATTR
from moonprune.errors import ConfigError, did_you_mean
from moonprune.unknown_generators import BUILT_IN
from moonprune.unknown_generators import GeneratorFn as GeneratorFn

NONE = "none"
SYNTH = "synth"
#: What ``synth`` means, by the grids at the default weight 0.1 (RESULTS.md
#: unknowns-targets, "Each generator at loss weight 0.1": digits and mnist5k 0-5, cnn and
#: resnet8, RigL/SET/GMP at 90/95%, 3 seeds; ``python benchmarks/unknowns_targets.py``).
#: Averaged over the two ID sets, blur+mixup (the rows split between the two) removes
#: more of plain's MSP shortfall than blur (83% against 72%), loses less accuracy
#: (-0.73 against -1.03 points) and less near-OOD AUROC (-0.86 against -0.97); on
#: mnist5k its worst cell loses 3.4 accuracy points where blur's loses 11.8. mixup alone
#: is as good on average, but keeps near-OOD within 0.5 point of plain in 1 mnist5k cell
#: of 12 (blur+mixup 4). blur alone (``synth`` until session 21) is slightly ahead on
#: digits (near-OOD -0.39 against -0.61). Patch shuffling and pixel permutation teach a
#: detector of their own artifacts (textures and photos rated *more* ID than ID), and
#: ``vos`` leaves MSP below plain's on mnist5k. ``synth`` is not the default of
#: ``compress``: the deployed feature score (``mahalanobis++``) does not improve.
SYNTH_SET: tuple[str, ...] = ("blur", "mixup")


@dataclass(frozen=True)
class UnknownGenerator:
    """One way to make unknowns: ``space`` is ``input`` (images) or ``feature``."""

    name: str
    description: str
    space: str
    fn: GeneratorFn


class UnknownsRegistry:
    """Generators by name; ``resolve("synth")`` gives the default set.

    Example::

        >>> UNKNOWNS.resolve("patch4+vos")
        ('patch4', 'vos')
        >>> UNKNOWNS.resolve("none")
        ()
    """

    def __init__(self) -> None:
        self._generators: dict[str, UnknownGenerator] = {}

    def register(
        self, name: str, description: str, space: str
    ) -> Callable[[GeneratorFn], GeneratorFn]:
        def add(fn: GeneratorFn) -> GeneratorFn:
            self._generators[name] = UnknownGenerator(name, description, space, fn)
            return fn

        return add

    def names(self) -> list[str]:
        return sorted(self._generators)

    def describe(self) -> dict[str, str]:
        return {n: self._generators[n].description for n in self.names()}

    def get(self, name: str) -> UnknownGenerator:
        if name not in self._generators:
            hint = did_you_mean(name, self.names())
            raise ConfigError(
                f"--unknowns: no generator {name!r}{hint}; use synth, none, or "
                f"names joined by '+' from: {', '.join(self.names())}"
            )
        return self._generators[name]

    def resolve(self, spec: str) -> tuple[str, ...]:
        """The generator names of ``spec`` (``none`` -> ``()``), validated."""
        if spec == NONE:
            return ()
        names = SYNTH_SET if spec == SYNTH else tuple(spec.split("+"))
        for name in names:
            self.get(name)
        return names


UNKNOWNS = UnknownsRegistry()
for _name, _description, _space, _fn in BUILT_IN:
    UNKNOWNS.register(_name, _description, _space)(_fn)


def check_unknowns(spec: str, fraction: float, weight: float) -> None:
    """Validate the three settings (ConfigError naming the bad value)."""
    if not isinstance(spec, str):
        raise ConfigError(f"unknowns must be a string such as 'synth' or 'none', got {spec!r}")
    UNKNOWNS.resolve(spec)
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise ConfigError(f"unknowns_fraction must be in (0, 1], got {fraction}; e.g. 0.125")
    if not (math.isfinite(weight) and weight > 0):
        raise ConfigError(f"unknowns_weight must be > 0, got {weight}; e.g. 0.1")


def shares(m: int, parts: int) -> list[int]:
    """``m`` rows split over ``parts`` generators as evenly as possible, first ones first."""
    return [m // parts + (1 if i < m % parts else 0) for i in range(parts)]


def rows_for(n: int, fraction: float) -> int:
    """Synthesized rows for ``n`` ID rows: ``round(fraction * n)`` (half up)."""
    return int(fraction * n + 0.5)


def synthesize(
    names: tuple[str, ...], x: torch.Tensor, y: torch.Tensor, m: int, g: torch.Generator, space: str
) -> torch.Tensor:
    """The ``space`` generators' rows of a batch: the ``m`` rows are shared out over
    *all* of ``names`` (see :func:`shares`), and those of ``space`` are made here."""
    parts = [
        UNKNOWNS.get(name).fn(x, y, k, g)
        for name, k in zip(names, shares(m, len(names)), strict=True)
        if UNKNOWNS.get(name).space == space and k > 0 and len(x) > 0
    ]
    if not parts:
        return x.new_zeros((0, *x.shape[1:]))
    return torch.cat(parts)


def epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The seeded source of one epoch's draws on one rank (a resumed run redraws them)."""
    return torch.Generator().manual_seed((seed * 100_003 + epoch) * 1_009 + rank + 524_287)


def unknown_loss_sum(logits: torch.Tensor, unknown: int) -> torch.Tensor:
    """Sum over rows of ``CE(logits, unknown)`` (0 for no rows)."""
    target = torch.full((len(logits),), unknown, dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target, reduction="sum")


def unknown_head(model: torch.nn.Module) -> torch.nn.Module:
    """The layer carrying the unknown output (marked by the K+1 surgery)."""
    for module in model.modules():
        if isinstance(getattr(module, UNKNOWN_ROW_ATTR, None), int):
            return module
    raise ConfigError(
        "--unknowns needs the K+1 head (the unknown output); none was found in the model"
    )


def probe(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, names: tuple[str, ...], seed: int
) -> dict[str, torch.Tensor]:
    """p(unknown) of ``model`` (eval mode, no gradient) on rows each generator of
    ``names`` makes from ``(x, y)`` (as many rows as ``x``): what the report shows for
    the synthesized rows. Feature generators draw from the model's features of ``x``."""
    head = unknown_head(model)
    k = int(getattr(head, UNKNOWN_ROW_ATTR))
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    was_training = model.training
    model.eval()
    out: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            seen: list[torch.Tensor] = []
            hook = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
            try:
                model(x)
            finally:
                hook.remove()
            features = seen[0].flatten(1)
            for name in names:
                gen = UNKNOWNS.get(name)
                g = torch.Generator().manual_seed(seed)
                if gen.space == "input":
                    logits = model(gen.fn(x, y, len(x), g))
                else:
                    logits = head(gen.fn(features, y, len(x), g))
                out[name] = torch.softmax(logits.double(), dim=-1)[:, k].cpu()
    finally:
        model.train(was_training)
    return out
