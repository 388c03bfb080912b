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


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory):
    """The demo pipeline once per session (short: 8 epochs), with its ONNX export."""
    from moonprune.demo import run_demo

    out = tmp_path_factory.mktemp("demo") / "out"
    return run_demo(out, epochs=8)
