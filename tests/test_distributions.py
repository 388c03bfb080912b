"""Layer densities (ERK, uniform) and their whole-number keep counts."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping

import pytest

from moonprune.errors import ConfigError
from moonprune.sparsity import keep_counts, layer_densities

# a small CNN: 1-channel first conv, a big middle conv, the classifier
CNN = {"conv1": (16, 1, 3, 3), "conv2": (64, 16, 3, 3), "conv3": (128, 64, 3, 3), "fc": (10, 128)}


def _total(shapes: Mapping[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


def _kept(shapes: Mapping[str, tuple[int, ...]], densities: Mapping[str, float]) -> float:
    return sum(densities[n] * math.prod(s) for n, s in shapes.items())


@pytest.mark.parametrize("density", [0.05, 0.1, 0.2, 0.5, 0.9])
def test_erk_keeps_density_times_total(density: float) -> None:
    d = layer_densities(CNN, density, "erk")
    assert _kept(CNN, d) == pytest.approx(density * _total(CNN), rel=1e-9)
    assert all(0.0 < v <= 1.0 for v in d.values())


def test_erk_is_proportional_to_sum_over_prod_of_the_shape() -> None:
    d = layer_densities(CNN, 0.02, "erk")
    assert all(v < 1.0 for v in d.values())  # no capping at this density
    eps = [d[n] * math.prod(s) / sum(s) for n, s in CNN.items()]  # the same for every layer
    assert max(eps) == pytest.approx(min(eps), rel=1e-9)


def test_erk_first_conv_denser_than_a_big_middle_conv() -> None:
    d = layer_densities(CNN, 0.1, "erk")
    assert d["conv1"] > 0.1 > d["conv3"]
    assert d["conv1"] > d["conv2"] > d["conv3"]


def test_erk_caps_dense_layers_and_resolves_the_rest_repeatedly() -> None:
    # the first solve puts only "a" above 1; after capping it, "b" is above 1 too
    shapes = {"a": (4, 1, 3, 3), "b": (8, 4, 3, 3), "c": (16, 8, 3, 3)}
    d = layer_densities(shapes, 0.6, "erk")
    assert d["a"] == 1.0 and d["b"] == 1.0
    assert d["c"] == pytest.approx((0.6 * _total(shapes) - 36 - 288) / 1152)
    assert _kept(shapes, d) == pytest.approx(0.6 * _total(shapes))


def test_uniform_gives_every_layer_the_same_density() -> None:
    assert layer_densities(CNN, 0.3, "uniform") == {n: 0.3 for n in CNN}


def test_density_one_is_dense_everywhere() -> None:
    assert layer_densities(CNN, 1.0, "erk") == pytest.approx({n: 1.0 for n in CNN})


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_out_of_range(density: float) -> None:
    with pytest.raises(ConfigError, match="density"):
        layer_densities(CNN, density, "erk")


def test_unknown_distribution_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="'erk' or 'uniform'"):
        layer_densities(CNN, 0.1, "gaussian")


def test_empty_layer_is_refused() -> None:
    with pytest.raises(ConfigError, match="no weights"):
        layer_densities({"a": (0, 3)}, 0.1, "erk")


@pytest.mark.parametrize("kind", ["erk", "uniform"])
def test_keep_counts_hit_the_global_target_exactly(kind: str) -> None:
    rng = random.Random(0)
    for _ in range(200):
        shapes = {
            f"l{i}": tuple(rng.randint(1, 9) for _ in range(rng.choice([2, 4])))
            for i in range(rng.randint(1, 6))
        }
        density = rng.uniform(0.05, 0.95)
        d = layer_densities(shapes, density, kind)
        counts = keep_counts(shapes, d)
        target = round(_kept(shapes, d))
        assert abs(target - density * _total(shapes)) <= 0.5 + 1e-6
        if target >= len(shapes):  # the one-weight-per-layer minimum does not bind
            assert sum(counts.values()) == target, (shapes, density)
        for n, s in shapes.items():
            size = math.prod(s)
            assert 1 <= counts[n] <= size
            # largest remainder: within one weight of the exact share (two if the minimum binds)
            binds = any(d[m] * math.prod(t) < 1 for m, t in shapes.items())
            assert abs(counts[n] - d[n] * size) < (2.0 if binds else 1.0)
            if d[n] == 1.0:
                assert counts[n] == size


def test_keep_counts_beat_per_layer_rounding_on_a_tiny_model() -> None:
    # ten layers of 10 weights at 14%: rounding each 1.4 -> 1 would keep 10, not 14
    shapes = {f"l{i}": (2, 5) for i in range(10)}
    counts = keep_counts(shapes, layer_densities(shapes, 0.14, "uniform"))
    assert sum(counts.values()) == 14
    assert sorted(counts.values()) == [1] * 6 + [2] * 4


def test_keep_counts_measured_sparsity_within_half_a_percent_on_a_tiny_cnn() -> None:
    shapes = {"conv1": (4, 1, 3, 3), "conv2": (8, 4, 3, 3), "fc": (3, 8)}
    for density in (0.05, 0.1, 0.2, 0.33):
        counts = keep_counts(shapes, layer_densities(shapes, density, "erk"))
        assert abs(1 - sum(counts.values()) / _total(shapes) - (1 - density)) < 0.005


def test_keep_counts_keeps_one_weight_per_layer_at_least() -> None:
    shapes = {"a": (10, 10), "b": (10, 10)}
    assert keep_counts(shapes, {"a": 0.001, "b": 0.001}) == {"a": 1, "b": 1}


def test_keep_counts_needs_every_density() -> None:
    with pytest.raises(ConfigError, match="no density"):
        keep_counts({"a": (2, 2), "b": (2, 2)}, {"a": 0.5})
