"""Shared fixtures: tiny CPU models and the digits split, nothing downloaded.

Before collection, the third-party masker in ``tests/plugins/random-masker`` is
installed (``pip install --target``, offline) into a temporary directory put on
``sys.path``, so ``MASKERS.names()`` -- and with it every parametrized masker
contract test -- includes a plug-in found through its entry point.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from moonprune.data import Splits, load_splits

PLUGIN_SOURCE = Path(__file__).parent / "plugins" / "random-masker"
PLUGIN_SITE = Path(tempfile.mkdtemp(prefix="moonprune-plugins-"))


def pytest_configure(config: pytest.Config) -> None:
    del config
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
         "--no-build-isolation", "--target", str(PLUGIN_SITE), str(PLUGIN_SOURCE)],
        check=True, capture_output=True,
    )  # fmt: skip
    sys.path.insert(0, str(PLUGIN_SITE))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(PLUGIN_SITE), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    from moonprune.sparsity import MASKERS

    MASKERS.refresh()


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
