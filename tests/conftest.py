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


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``dense.pt`` (3-class width-4 demo CNN) and ``run/model.pt``, the
    result of a 1-epoch compress of it (no ONNX): bad-input tests load it in seconds."""
    from moonprune.config import build_config
    from moonprune.models import demo_cnn
    from moonprune.pipeline import compress

    root = tmp_path_factory.mktemp("small-run")
    torch.manual_seed(0)
    torch.save(demo_cnn(num_classes=3, width=4).state_dict(), root / "dense.pt")
    compress(build_config({
        "checkpoint": str(root / "dense.pt"), "arch": "moonprune.models:demo_cnn",
        "arch_kwargs": {"width": 4}, "data": "digits:0-2", "ood": ["noise"],
        "out": str(root / "run"), "export": False, "train": {"epochs": 1},
        "moon": {"warmup_epochs": 0},
    }))  # fmt: skip
    return root


@pytest.fixture
def own_factory_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``run/model.pt`` of a network built by a factory of the user's own
    (``mynets:net``, importable from the current directory ``tmp_path``)."""
    from moonprune.config import build_config
    from moonprune.models import demo_cnn
    from moonprune.pipeline import compress

    (tmp_path / "mynets.py").write_text(
        "from moonprune.models import demo_cnn\n"
        "def net(num_classes=3, in_channels=1):\n"
        "    return demo_cnn(num_classes=num_classes, in_channels=in_channels, width=4)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    torch.save(demo_cnn(num_classes=3, width=4).state_dict(), "dense.pt")
    compress(build_config({
        "checkpoint": "dense.pt", "arch": "mynets:net", "data": "digits:0-2",
        "out": "run", "export": False, "train": {"epochs": 1}, "moon": {"warmup_epochs": 0},
    }))  # fmt: skip
    return tmp_path / "run" / "model.pt"


@pytest.fixture(scope="session")
def dense_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 6-class width-8 demo CNN state_dict: input errors come before training."""
    from moonprune.models import demo_cnn

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "dense.pt"
    torch.save(demo_cnn(num_classes=6, width=8).state_dict(), path)
    return path


@pytest.fixture
def real_timer() -> None:
    """Request it to time ONNX files in onnxruntime for real (no speed is asserted)."""


@pytest.fixture(autouse=True)
def _modelled_timer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Channel pruning's timing of candidate networks and of the exported model comes from
    a deterministic cost model (``tests/fake_timer.py``), unless the test asks for
    ``real_timer``."""
    if "real_timer" in request.fixturenames:
        return
    from fake_timer import modelled_speedups

    monkeypatch.setattr("moonprune.speed.time_speedups", modelled_speedups)
