"""Checkpoint loading is safe by default, and moonprune checkpoints round-trip."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from moonprune.checkpoints import (
    ArchSpec,
    MoonpruneCheckpoint,
    RunRecord,
    load_checkpoint,
    load_dense,
    save_checkpoint,
)
from moonprune.data import Preprocessing
from moonprune.errors import CheckpointError
from moonprune.heads import add_unknown_output_
from moonprune.models import demo_cnn
from moonprune.weights import ClassCountMismatch

ARCH = ArchSpec("moonprune.models:demo_cnn", {"num_classes": 3, "width": 4})


def _dense(tmp_path: Path, wrap: str | None = None, prefix: str = "") -> Path:
    torch.manual_seed(0)
    state = {prefix + k: v for k, v in demo_cnn(num_classes=3, width=4).state_dict().items()}
    path = tmp_path / "dense.pt"
    torch.save({wrap: state, "epoch": 7} if wrap else state, path)
    return path


@pytest.mark.parametrize(
    ("wrap", "prefix"),
    [
        (None, ""),
        ("state_dict", ""),
        ("model", ""),
        (None, "module."),  # DataParallel / DDP
        ("state_dict", "model."),  # Lightning
        (None, "_orig_mod."),  # torch.compile
        ("state_dict", "model.module."),  # DDP inside Lightning
    ],
)
def test_state_dict_forms_load(tmp_path: Path, wrap: str | None, prefix: str) -> None:
    loaded = load_dense(_dense(tmp_path, wrap, prefix), ARCH)
    torch.manual_seed(0)
    ref = demo_cnn(num_classes=3, width=4)
    for (k, a), (_, b) in zip(
        loaded.model.state_dict().items(), ref.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("prefix", ["", "module."])
def test_safetensors_state_dict_loads(tmp_path: Path, prefix: str) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    ref = demo_cnn(num_classes=3, width=4)
    path = tmp_path / "dense.safetensors"
    safetensors_torch.save_file({prefix + k: v for k, v in ref.state_dict().items()}, path)
    loaded = load_dense(path, ARCH)
    for (k, a), (_, b) in zip(
        loaded.model.state_dict().items(), ref.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    with pytest.raises(CheckpointError, match="--arch"):
        load_dense(path, None)


def test_safetensors_corrupt_missing_or_package_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a valid safetensors file") as info:
        load_dense(bad, ARCH)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dense(tmp_path / "nope.safetensors", ARCH)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(CheckpointError, match="pip install safetensors"):
        load_dense(bad, ARCH)


def test_pickled_module_needs_trust(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(demo_cnn(num_classes=3, width=4), path)
    with pytest.raises(CheckpointError, match=r"--trust-checkpoint"):
        load_dense(path, ARCH)
    assert isinstance(load_dense(path, ARCH, trust=True).model, torch.nn.Module)


def test_trusted_pickled_module_must_fit_arch(tmp_path: Path) -> None:
    """The saved model is rebuilt from ``arch``: a module it cannot hold is refused now."""
    path = tmp_path / "whole.pt"
    torch.save(demo_cnn(num_classes=3, width=4), path)
    wider = ArchSpec(ARCH.factory, {"num_classes": 3, "width": 8})
    with pytest.raises(CheckpointError, match=r"'features\.0\.0\.weight' has shape"):
        load_dense(path, wider, trust=True)


def test_class_count_mismatch_is_named_as_such(tmp_path: Path) -> None:
    five = ArchSpec(ARCH.factory, {"num_classes": 5, "width": 4})
    with pytest.raises(ClassCountMismatch, match=r"has 3 classes .* built for 5") as info:
        load_dense(_dense(tmp_path, prefix="module."), five, example_input=torch.randn(2, 1, 8, 8))
    assert (info.value.checkpoint_classes, info.value.model_classes) == (3, 5)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b"\x00garbage", b"PK\x03\x04"])
@pytest.mark.parametrize("trust", [False, True])
def test_garbage_is_corrupt_not_pickled(tmp_path: Path, content: bytes, trust: bool) -> None:
    """torch's message for garbage mentions weights_only too; it must not read as a module."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as info:
        load_dense(bad, ARCH, trust=trust)
    assert "--trust-checkpoint" not in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_corrupt_and_mismatched(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dense(tmp_path / "nope.pt", ARCH)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as info:
        load_dense(bad, ARCH)
    assert "--trust-checkpoint" not in str(info.value)
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
        run=RunRecord(Preprocessing(1, 8, 8, 1 / 16, (0.3,), (0.4,)), threshold=0.7),
        head_layer=layer,
        masks=masks,
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
