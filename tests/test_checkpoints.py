"""Checkpoint loading is safe by default, and moonprune checkpoints round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moonprune.checkpoints import (
    ArchSpec,
    MoonpruneCheckpoint,
    load_checkpoint,
    load_dense,
    save_checkpoint,
)
from moonprune.data import Preprocessing
from moonprune.errors import CheckpointError
from moonprune.heads import add_unknown_output_
from moonprune.models import demo_cnn

ARCH = ArchSpec("moonprune.models:demo_cnn", {"num_classes": 3, "width": 4})


def _dense(tmp_path: Path, wrap: str | None = None) -> Path:
    torch.manual_seed(0)
    state = demo_cnn(num_classes=3, width=4).state_dict()
    path = tmp_path / "dense.pt"
    torch.save({wrap: state, "epoch": 7} if wrap else state, path)
    return path


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_state_dict_forms_load(tmp_path: Path, wrap: str | None) -> None:
    loaded = load_dense(_dense(tmp_path, wrap), ARCH)
    torch.manual_seed(0)
    ref = demo_cnn(num_classes=3, width=4)
    for (k, a), (_, b) in zip(
        loaded.model.state_dict().items(), ref.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k


def test_pickled_module_needs_trust(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(demo_cnn(num_classes=3, width=4), path)
    with pytest.raises(CheckpointError, match=r"--trust-checkpoint"):
        load_dense(path, ARCH)
    assert isinstance(load_dense(path, ARCH, trust=True).model, torch.nn.Module)


def test_missing_corrupt_and_mismatched(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dense(tmp_path / "nope.pt", ARCH)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_dense(bad, ARCH)
    with pytest.raises(CheckpointError, match=r"classifier\.weight"):
        load_dense(_dense(tmp_path), ArchSpec(ARCH.factory, {"num_classes": 5, "width": 4}))
    with pytest.raises(CheckpointError, match="--arch"):
        load_dense(_dense(tmp_path), None)
    with pytest.raises(CheckpointError, match="cannot import module"):
        load_dense(_dense(tmp_path), ArchSpec("no_such_pkg.models:net"))


def test_non_finite_weights_are_rejected(tmp_path: Path) -> None:
    state = demo_cnn(num_classes=3, width=4).state_dict()
    state["classifier.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"classifier\.weight"):
        load_dense(path, ARCH)


def test_moonprune_checkpoint_round_trip(tmp_path: Path) -> None:
    model = demo_cnn(num_classes=3, width=4).eval()
    layer = add_unknown_output_(model, torch.randn(2, 1, 8, 8))
    masks = {"classifier.weight": torch.rand(4, 16) > 0.5}
    ckpt = MoonpruneCheckpoint(
        model=model,
        arch=ARCH,
        classes=("a", "b", "c"),
        preprocessing=Preprocessing(1, 8, 8, 1 / 16, (0.3,), (0.4,)),
        head_layer=layer,
        masks=masks,
        threshold=0.7,
        config={"x": 1},
    )
    path = save_checkpoint(ckpt, tmp_path / "model.pt")
    assert not list(tmp_path.glob(".*.tmp"))
    back = load_checkpoint(path)
    assert back.num_known == 3 and back.has_unknown and back.threshold == 0.7
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(back.model(x), model(x))
    assert torch.equal(back.masks["classifier.weight"], masks["classifier.weight"])
    assert back.version
    # a moonprune checkpoint also serves as a dense starting point
    assert load_dense(path).arch == ARCH
