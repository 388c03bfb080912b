"""Built-in data, class subsets, deterministic splits, noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moonprune.data import load_ood, load_splits, parse_spec, stratified_split
from moonprune.errors import DataError


def test_parse_spec() -> None:
    assert parse_spec("digits") == ("digits", None)
    assert parse_spec("digits:0-5") == ("digits", [0, 1, 2, 3, 4, 5])
    assert parse_spec("digits:7,2,3-4") == ("digits", [2, 3, 4, 7])
    with pytest.raises(DataError, match="digits:0-5"):
        parse_spec("digits:a-b")


def test_subset_relabels_and_splits_are_disjoint(digits06) -> None:
    assert digits06.classes == ("0", "1", "2", "3", "4", "5")
    ys = torch.cat([digits06.train.y, digits06.val.y, digits06.test.y])
    assert set(ys.tolist()) == set(range(6))
    n = len(digits06.train) + len(digits06.val) + len(digits06.test)
    assert n == 1083  # digits 0-5 in scikit-learn's set
    # normalised with the training split's statistics
    assert abs(float(digits06.train.x.mean())) < 1e-4
    assert float(digits06.train.x.std()) == pytest.approx(1.0, abs=1e-2)


def test_split_is_deterministic_in_seed() -> None:
    labels = np.repeat(np.arange(3), 20)
    a = stratified_split(labels, seed=1)
    b = stratified_split(labels, seed=1)
    c = stratified_split(labels, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])
    all_idx = np.concatenate(a)
    assert len(np.unique(all_idx)) == len(labels)
    # stratified: each class appears 12/4/4 times
    assert np.bincount(labels[a[0]]).tolist() == [12, 12, 12]


def test_ood_sets_follow_id_preprocessing(digits06) -> None:
    noise = load_ood("noise", digits06.preprocessing, seed=0)
    assert noise.x.shape[1:] == digits06.train.x.shape[1:]
    assert torch.equal(noise.x, load_ood("noise", digits06.preprocessing, seed=0).x)
    held_out = load_ood("digits:6-9", digits06.preprocessing)
    assert len(held_out) == 1797 - 1083
    assert torch.all(held_out.y == -1)


@pytest.mark.parametrize("spec", ["nosuchset", "digits:11-12"])
def test_bad_specs_name_the_problem(spec: str) -> None:
    with pytest.raises(DataError):
        load_splits(spec)
