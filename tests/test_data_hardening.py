"""Issue 14, the data side: every bad data input is one DataError line, never a traceback.

Each case goes through the library boundary every command uses (``load_splits`` for
the ID data, ``load_ood`` for an OOD set), and a few through the CLI (exit 2, one line
on stderr, ``--out`` never created).
"""

from __future__ import annotations

import io
import logging
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from moonprune.cli.app import app
from PIL import Image
from typer.testing import CliRunner, Result

from moonprune.data import ReadOptions, load_ood, load_raw, load_splits
from moonprune.errors import DataError

runner = CliRunner()
ARCH = "moonprune.models:demo_cnn"
RNG = np.random.default_rng(0)
X = RNG.random((20, 1, 8, 8), dtype=np.float32)
Y = np.arange(20) % 2


def _npz(path: Path, **arrays: Any) -> str:
    np.savez(path, **arrays)
    return str(path)


# -- .npz files ---------------------------------------------------------------------------

NPZ_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "empty": ({"x": np.zeros((0, 1, 8, 8), np.float32), "y": np.zeros(0, int)}, "no images"),
    "no pixels": ({"x": np.zeros((20, 1, 0, 8), np.float32), "y": Y}, "no images"),
    "no x": ({"y": Y}, "no array 'x' (found: ['y']); save it with numpy.savez("),
    "x and y lengths": ({"x": X, "y": Y[:5]}, "20 images but y has 5 labels; labels must"),
    "negative label": ({"x": X, "y": Y - 1}, "negative label"),
    "NaN label": ({"x": X, "y": np.where(Y == 0, np.nan, 1.0)}, "is nan, not a whole number"),
    "fractional label": ({"x": X, "y": Y + 0.5}, "is 0.5, not a whole number"),
    "2-D y": ({"x": X, "y": np.eye(2)[Y]}, "y.argmax(1)"),
    "0-D y": ({"x": X, "y": np.int64(1)}, "y must have shape (20,)"),
    "string labels": ({"x": X, "y": np.array(["a", "b"] * 10)}, "names go in 'classes'"),
    "label as an id": ({"x": X, "y": Y * 10**6}, "renumber them"),
    "classes too few": ({"x": X, "y": Y, "classes": np.array(["a"])}, "only 1 names"),
    "string pixels": ({"x": np.full((20, 1, 8, 8), "a"), "y": Y}, "got dtype <U1"),
    "complex pixels": ({"x": X.astype(np.complex64), "y": Y}, "got complex numbers"),
    "NaN pixels": ({"x": np.where(X > 0.5, np.nan, X), "y": Y}, "NaN or infinite pixel values"),
    "inf pixels": ({"x": np.where(X > 0.5, np.inf, X), "y": Y}, "NaN or infinite pixel values"),
    "normalised pixels": ({"x": X - 0.5, "y": Y}, "not normalised ones"),
    "4 channels": ({"x": np.zeros((20, 8, 8, 4), np.uint8), "y": Y}, "1 or 3 channels"),
}


@pytest.mark.parametrize("case", NPZ_CASES)
def test_bad_npz_is_one_data_error_naming_the_file(tmp_path: Path, case: str) -> None:
    arrays, needle = NPZ_CASES[case]
    path = _npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError) as info:
        load_splits(path, seed=0)
    message = str(info.value)
    assert needle in message and path in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"hello", "is not an .npz archive"), (b"\x93NUMPY\x01\x00", "single .npy array")],
)
def test_a_file_that_is_no_npz_archive(tmp_path: Path, content: bytes, needle: str) -> None:
    (tmp_path / "d.npz").write_bytes(content)
    with pytest.raises(DataError) as info:
        load_raw(str(tmp_path / "d.npz"))
    assert needle in str(info.value)


def test_a_npy_array_named_npz_and_a_truncated_npz(tmp_path: Path) -> None:
    np.save(tmp_path / "arr.npy", X)
    (tmp_path / "arr.npy").rename(tmp_path / "arr.npz")
    with pytest.raises(DataError, match=r"single \.npy array"):
        load_raw(str(tmp_path / "arr.npz"))
    whole = Path(_npz(tmp_path / "ok.npz", x=X, y=Y)).read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cannot read .*cut\.npz.* as \.npz"):
        load_raw(str(tmp_path / "cut.npz"))


def test_npz_declaring_a_huge_array(tmp_path: Path) -> None:
    """An .npz header may declare any shape: 3e12 bytes here, with 100 bytes of data."""
    header = io.BytesIO()
    shape = (10**6, 3, 1000, 1000)
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": shape}
    )
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as archive:
        archive.writestr("x.npy", header.getvalue() + bytes(100))
    with pytest.raises(DataError, match=r"huge\.npz"):
        load_raw(str(tmp_path / "huge.npz"))


def test_float_labels_only_when_whole_numbers(tmp_path: Path) -> None:
    """1.0 is class 1 (labels saved from a float tensor); 1.5 is refused, not truncated."""
    whole = load_raw(_npz(tmp_path / "whole.npz", x=X, y=Y.astype(np.float32)))
    assert whole.labels is not None and whole.labels.tolist() == Y.tolist()
    assert whole.labels.dtype == np.int64
    y = Y.astype(np.float64)
    y[7] = 1.5
    with pytest.raises(DataError, match=r"y\[7\] is 1.5, not a whole number"):
        load_raw(_npz(tmp_path / "half.npz", x=X, y=y))


def test_labels_of_only_minus_one_mean_unlabelled(tmp_path: Path, digits06) -> None:
    """-1 is moonprune's own "no label": an OOD file saved with it reads as unlabelled;
    a -1 among class indices is a bad label."""
    x = RNG.random((6, 1, 8, 8), dtype=np.float32)
    ood = load_ood(_npz(tmp_path / "ood.npz", x=x, y=np.full(6, -1)), digits06.preprocessing)
    assert len(ood) == 6
    with pytest.raises(DataError, match=r"the ID data .* has no labels"):
        load_splits(str(tmp_path / "ood.npz"))
    with pytest.raises(DataError, match=r"y\[2\] is -1, a negative label"):
        load_raw(_npz(tmp_path / "mixed.npz", x=x, y=np.array([0, 1, -1, 0, 1, 0])))


def test_uint16_npz_is_scaled_by_65535(tmp_path: Path) -> None:
    x = np.full((20, 1, 8, 8), 65535, dtype=np.uint16)
    x[:, :, :4] = 32768
    raw = load_raw(_npz(tmp_path / "d.npz", x=x, y=Y))
    assert raw.images.max() == pytest.approx(1.0)
    assert raw.images.min() == pytest.approx(32768 / 65535)
    assert raw.pixel_scale == pytest.approx(1 / 65535)


# -- image folders ------------------------------------------------------------------------


def _folder(root: Path, classes: tuple[str, ...] = ("a", "b"), n: int = 5) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


def _png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb to Pillow)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    """A real 16-bit PNG written by Pillow (mode I;16): pixel v reads as v / 65535."""
    for c, value in (("a", 1000), ("b", 40000)):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(3):
            pixels = np.full((8, 8), value + i, dtype=np.uint16)
            Image.fromarray(pixels).save(tmp_path / "d" / c / f"{i}.png")
    with Image.open(tmp_path / "d" / "a" / "0.png") as check:
        assert check.mode in ("I;16", "I")
    raw = load_raw(str(tmp_path / "d"))
    assert raw.labels is not None
    assert raw.images[raw.labels == 0].min() == pytest.approx(1000 / 65535)
    assert raw.images.max() == pytest.approx(40002 / 65535)
    assert raw.pixel_scale == pytest.approx(1 / 65535)
    # a folder mixing bit depths has no one raw pixel range for the exported model
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "d" / "a" / "8bit.png")
    with pytest.raises(DataError, match="mixes 16-bit and 8-bit images"):
        load_raw(str(tmp_path / "d"))


def test_decompression_bomb_is_a_bad_image(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _folder(tmp_path / "d")
    _png_header(root / "a" / "bomb.png", 30000, 30000)  # 9e8 pixels: Pillow's error
    with caplog.at_level(logging.WARNING):
        raw = load_raw(str(root))
    assert len(raw.images) == 10
    assert "bomb.png" in caplog.text and "decompression bomb" in caplog.text
    with pytest.raises(DataError, match=r"cannot decode image .*bomb\.png.*decompression bomb"):
        load_raw(str(root), ReadOptions(on_bad_image="fail"))


def test_image_over_the_warning_limit_is_a_bad_image_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between Pillow's limit and twice it, Pillow only warns (a second line on stderr)
    and decodes the image anyway: moonprune refuses it like any other bad image."""
    root = _folder(tmp_path / "d")
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(root / "a" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 8x8 passes, 12x12 only warns
    assert len(load_raw(str(root)).images) == 10
    with pytest.raises(DataError, match=r"big\.png"):
        load_raw(str(root), ReadOptions(on_bad_image="fail"))


# -- specs and class counts ---------------------------------------------------------------


@pytest.mark.parametrize("spec", ["", "  ", ":0-1"])
def test_empty_spec_is_refused_not_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits06, spec: str
) -> None:
    _folder(tmp_path)  # the current folder would be a readable ImageFolder
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="empty data spec"):
        load_ood(spec, digits06.preprocessing)
    with pytest.raises(DataError, match="empty data spec"):
        load_splits(spec)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("digits:9-3", "runs backwards; write digits:3-9"),
        ("digits:0-99", "asks for class 10, 11, 12, 13, 14, ..., but its classes are 0-9"),
        ("digits:0-99999999999", "out of range"),
    ],
)
def test_bad_class_subsets(spec: str, needle: str) -> None:
    with pytest.raises(DataError) as info:
        load_raw(spec)
    assert needle in str(info.value)


def test_single_class_data_is_refused(tmp_path: Path, digits06) -> None:
    needle = "at least 2 classes"
    with pytest.raises(DataError, match=needle):
        load_splits("digits:3")
    with pytest.raises(DataError, match=needle):
        load_splits(_npz(tmp_path / "one.npz", x=X, y=np.zeros(20, int)))
    with pytest.raises(DataError, match=needle):
        load_splits(str(_folder(tmp_path / "one", classes=("a",))))
    (tmp_path / "one" / "b").mkdir()  # a second class folder without images
    with pytest.raises(DataError, match=r"no training images for 'b'"):
        load_splits(str(tmp_path / "one"))
    assert len(load_ood("digits:3", digits06.preprocessing)) > 0  # one class is a fine OOD set


# -- through the CLI ----------------------------------------------------------------------


def _refused(result: Result, out: Path | None, needle: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    if out is not None:
        assert not out.exists()
    return lines[0]


def _compress(dense: Path, out: Path, data: str, ood: str, *extra: str) -> Result:
    recipe = out.parent / "recipe.toml"
    recipe.write_text("arch_kwargs = { num_classes = 6, width = 8 }\n")
    return runner.invoke(
        app,
        ["compress", str(dense), "--arch", ARCH, "--config", str(recipe), "--data", data,
         "--ood", ood, "--out", str(out), "--epochs", "1", "--no-export", *extra],
    )  # fmt: skip


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("empty npz", "holds no images"),
        ("negative labels", "a negative label"),
        ("string pixels", "got dtype <U1"),
        ("single class", "at least 2 classes"),
        ("empty --ood", "empty data spec ''"),
        ("bomb, --on-bad-image fail", "decompression bomb"),
    ],
)
def test_compress_refuses_bad_data_with_one_line(
    dense_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, needle: str
) -> None:
    data, ood, extra = "digits:0-5", "digits:6-9", []
    if case == "empty npz":
        data = _npz(tmp_path / "d.npz", x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros(0))
    elif case == "negative labels":
        data = _npz(tmp_path / "d.npz", x=X, y=Y - 1)
    elif case == "string pixels":
        ood = _npz(tmp_path / "o.npz", x=np.full((4, 1, 8, 8), "a"))
    elif case == "single class":
        data = "digits:3"
    elif case == "empty --ood":
        _folder(tmp_path / "cwd")
        monkeypatch.chdir(tmp_path / "cwd")
        ood = ""
    else:
        root = _folder(tmp_path / "images", classes=("a", "b", "c", "d", "e", "f"), n=6)
        _png_header(root / "a" / "bomb.png", 30000, 30000)
        data, extra = str(root), ["--on-bad-image", "fail"]
    out = tmp_path / "out"
    _refused(_compress(dense_path, out, data, ood, *extra), out, needle)


@pytest.fixture(scope="module")
def compressed(small_run: Path) -> Path:
    """``model.pt`` of a 1-epoch compress of a 3-class width-4 demo CNN (conftest)."""
    return small_run / "run" / "model.pt"


@pytest.mark.parametrize(
    ("case", "needle"),
    [("empty --ood", "empty data spec ''"), ("fractional labels", "is 0.5, not a whole number")],
)
def test_verify_refuses_bad_data_with_one_line(
    compressed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, needle: str
) -> None:
    _folder(tmp_path / "cwd", classes=("a", "b", "c"))
    monkeypatch.chdir(tmp_path / "cwd")
    data, ood = "digits:0-2", "noise"
    if case == "empty --ood":
        ood = ""
    else:
        y = (np.arange(30) % 3).astype(np.float64)
        y[0] = 0.5
        data = _npz(tmp_path / "held.npz", x=RNG.random((30, 1, 8, 8), dtype=np.float32), y=y)
    result = runner.invoke(app, ["verify", str(compressed), "--data", data, "--ood", ood])
    _refused(result, None, needle)
