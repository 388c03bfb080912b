"""Shared fixtures: tiny CPU models and the digits split, nothing downloaded."""

from __future__ import annotations

import pytest
import torch

from moonprune.data import Splits, load_splits


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits06() -> Splits:
    """Digits 0-5, split with seed 0 (about 650 / 216 / 217 images)."""
    return load_splits("digits:0-5", seed=0)
