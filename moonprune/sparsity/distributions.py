"""How a global density is spread over layers: Erdos-Renyi-Kernel (ERK) or uniform.

ERK (Evci et al., RigL, 2020) gives layer ``l`` with weight shape
``(d_1, ..., d_k)`` (``n_l = prod d_i`` weights) the density

    p_l = eps * sum(d_i) / prod(d_i)

so small layers (the first conv, the classifier) stay denser and large middle convs
get sparser. ``eps`` solves ``sum_l p_l * n_l = density * sum_l n_l``. A layer with
``p_l > 1`` is made dense (``p_l = 1``), and ``eps`` is solved again over the others
with the dense layers' weights taken off the budget, until no layer exceeds 1.

Uniform gives every layer ``p_l = density``.

:func:`keep_counts` turns densities into whole numbers of kept weights whose sum is
``round(sum_l p_l * n_l)``, so the measured global sparsity is the target.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from moonprune.errors import ConfigError

Shapes = Mapping[str, torch.Size | tuple[int, ...]]


def _sizes(shapes: Shapes) -> dict[str, int]:
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    empty = [name for name, size in sizes.items() if size <= 0]
    if empty:
        raise ConfigError(f"layers {empty} have no weights; a masked layer needs at least one")
    return sizes


def layer_densities(shapes: Shapes, density: float, kind: str = "erk") -> dict[str, float]:
    """Per-layer densities whose mean weighted by layer size is ``density``.

    ``kind`` is ``"erk"`` or ``"uniform"``; see the module docstring for the maths.

    Example::

        >>> d = layer_densities({"conv1": (16, 1, 3, 3), "conv2": (64, 16, 3, 3)}, 0.1)
        >>> d["conv1"] > 0.1 > d["conv2"]
        True
    """
    if isinstance(density, bool) or not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density!r}; it is 1 - sparsity")
    if kind == "uniform":
        _sizes(shapes)
        return {name: float(density) for name in shapes}
    if kind != "erk":
        raise ConfigError(f"unknown layer-density distribution {kind!r}; use 'erk' or 'uniform'")
    sizes = _sizes(shapes)
    raw = {name: sum(shape) / sizes[name] for name, shape in shapes.items()}
    budget = density * sum(sizes.values())
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        if not free:  # only reachable at density 1 (float rounding)
            return {n: 1.0 for n in shapes}
        eps = (budget - sum(sizes[n] for n in dense)) / sum(raw[n] * sizes[n] for n in free)
        too_dense = [n for n in free if eps * raw[n] > 1.0]
        if not too_dense:
            return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}
        dense.update(too_dense)


def keep_counts(shapes: Shapes, densities: Mapping[str, float]) -> dict[str, int]:
    """Whole numbers of kept weights per layer, summing to ``round(sum_l p_l * n_l)``.

    Rounding each layer on its own can miss the global target by up to half a weight
    per layer. Instead every layer gets ``max(1, floor(p_l * n_l))`` (a layer is never
    cut off entirely), and the difference to the target is made up one weight at a
    time, each going to the non-dense layer whose count is furthest below its exact
    share ``p_l * n_l`` (largest-remainder rounding); dense layers stay dense. The sum
    is exact unless the one-weight minimum forces more (a target below one weight per
    layer).

    Example::

        >>> keep_counts({"a": (3, 3), "b": (3, 3)}, {"a": 0.5, "b": 0.5})
        {'a': 5, 'b': 4}
    """
    sizes = _sizes(shapes)
    missing = set(shapes) - set(densities)
    if missing:
        raise ConfigError(f"no density given for layers {sorted(missing)}")
    exact = {n: densities[n] * sizes[n] for n in shapes}
    counts = {n: min(sizes[n], max(1, math.floor(exact[n]))) for n in shapes}
    target = min(sum(sizes.values()), round(sum(exact.values())))
    adjustable = [n for n in shapes if densities[n] < 1.0]
    delta = target - sum(counts.values())
    step = 1 if delta > 0 else -1
    while delta != 0:
        open_ = [n for n in adjustable if 1 <= counts[n] + step <= sizes[n]]
        if not open_:
            break
        # add where the count is furthest below its exact share; take where furthest above
        n = max(open_, key=lambda n: step * (exact[n] - counts[n]))
        counts[n] += step
        delta -= step
    return counts
