"""How a global density is spread over layers: Erdos-Renyi-Kernel (ERK) or uniform.

ERK (Evci et al., RigL, 2020) gives layer ``l`` with weight shape ``(d_1, ..., d_k)``
a density proportional to ``sum(d_i) / prod(d_i)``: small layers (the first conv, the
classifier) stay denser, large middle convs get sparser. The scale ``eps`` is solved
so that the kept weights add up to ``density * total``; a layer whose density would
exceed 1 is made dense and ``eps`` is solved again over the rest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from moonprune.errors import ConfigError


def layer_densities(
    shapes: Mapping[str, torch.Size | tuple[int, ...]], density: float, kind: str = "erk"
) -> dict[str, float]:
    """Per-layer densities whose weighted mean (by layer size) is ``density``."""
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    if kind == "uniform":
        return {name: density for name in shapes}
    if kind != "erk":
        raise ConfigError(f"unknown layer-density distribution {kind!r}; use 'erk' or 'uniform'")
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: sum(shape) / sizes[name] for name, shape in shapes.items()}
    total = sum(sizes.values())
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        budget = density * total - sum(sizes[n] for n in dense)
        divisor = sum(raw[n] * sizes[n] for n in free)
        if not free or divisor <= 0:
            break
        eps = budget / divisor
        too_dense = [n for n in free if eps * raw[n] > 1.0]
        if not too_dense:
            return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}
        dense.update(too_dense)
    return {n: 1.0 for n in shapes}


def keep_counts(
    shapes: Mapping[str, torch.Size | tuple[int, ...]],
    densities: Mapping[str, float],
    density: float,
) -> dict[str, int]:
    """Integer numbers of kept weights per layer, summing to ``round(density * total)``.

    Rounding each layer on its own can miss the global target by up to half a weight
    per layer; the difference goes to the non-dense layers with the largest
    fractional remainders, so the measured global sparsity is exact.
    """
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    exact = {n: densities[n] * sizes[n] for n in shapes}
    counts = {n: min(sizes[n], max(1, math.floor(exact[n]))) for n in shapes}
    target = round(density * sum(sizes.values()))
    order = sorted(shapes, key=lambda n: exact[n] - math.floor(exact[n]), reverse=True)
    delta = target - sum(counts.values())
    step = 1 if delta > 0 else -1
    while delta != 0:
        moved = False
        for n in order:
            if delta == 0:
                break
            new = counts[n] + step
            if 1 <= new <= sizes[n] and (densities[n] < 1.0 or step < 0):
                counts[n] = new
                delta -= step
                moved = True
        if not moved:
            break
    return counts
