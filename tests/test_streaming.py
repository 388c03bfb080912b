"""The streaming input path: image folders read lazily, in batches, by worker processes.

The contract: a lazily read set gives the same tensors as decoding everything up front,
the same batches with any number of workers, the same trained weights as the same data
held in memory, resumes bit-identically, and trains identically under torchrun.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from moonprune.cli.app import app
from PIL import Image
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from moonprune.augment import augment_batch
from moonprune.config import MoonConfig, TrainConfig
from moonprune.data import ImageSet, load_splits
from moonprune.errors import DataError
from moonprune.heads import add_unknown_output_
from moonprune.models import demo_cnn
from moonprune.sources import conform_one
from moonprune.sparsity import MASKERS, MaskerConfig
from moonprune.specs import ReadOptions
from moonprune.streaming import LazyImages, check_workers
from moonprune.training import StopTraining, Trainer
from moonprune.user_data import read_image

ROOT = Path(__file__).parents[1]
WORKER = Path(__file__).with_name("ddp_worker.py")


def digits_folder(root: Path, classes: int = 6) -> Path:
    """scikit-learn's digits 0..classes-1 as 8-bit gray PNGs in an ImageFolder."""
    digits = load_digits()
    for c in range(classes):
        (root / str(c)).mkdir(parents=True)
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        if label < classes:
            pixels = (image * 15).astype(np.uint8)
            Image.fromarray(pixels).save(root / str(label) / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_folder(tmp_path_factory.mktemp("stream") / "digits")


def test_a_folder_is_read_lazily_and_row_for_row_as_decoded(folder: Path) -> None:
    splits = load_splits(str(folder), seed=0, options=ReadOptions(workers=2))
    x = splits.train.x
    assert isinstance(x, LazyImages)
    pre = splits.preprocessing
    files = x.rows.source.files  # type: ignore[attr-defined]
    rows = x.rows.index[[0, 5, len(x) - 1]]
    expected = np.stack([conform_one(read_image(files[i])[0], 1, (8, 8)) for i in rows])
    assert torch.equal(x[np.array([0, 5, len(x) - 1])], pre.normalise(expected))
    # every batch, streamed by 2 workers, equals the rows read one by one in the main process
    streamed = torch.cat(list(x.split(100)))
    assert streamed.shape == (len(x), 1, 8, 8)
    assert torch.equal(streamed, x[np.arange(len(x))])


def test_batches_do_not_depend_on_the_number_of_workers(folder: Path) -> None:
    a = load_splits(str(folder), seed=3, options=ReadOptions(workers=0)).train
    b = load_splits(str(folder), seed=3, options=ReadOptions(workers=2)).train
    order = [np.array([5, 1, 300]), np.array([7]), np.arange(40, 90)]
    assert isinstance(a.x, LazyImages) and isinstance(b.x, LazyImages)
    for left, right in zip(a.x.batches(order), b.x.batches(order), strict=True):
        assert torch.equal(left, right)


def _train(data: ImageSet, state: Path | None = None, stop: int | None = None, resume=False):
    torch.manual_seed(0)
    model = demo_cnn(num_classes=6, width=4)
    add_unknown_output_(model, data.x[:2])
    masker = MASKERS.create("rigl", MaskerConfig(sparsity=0.8, update_interval=4, seed=1))
    trainer = Trainer(model, masker, data, TrainConfig(epochs=3, batch_size=64, augment="crop"),
                      MoonConfig(warmup_epochs=1, average_epochs=1), state_path=state)  # fmt: skip
    if resume:
        assert state is not None
        trainer.load_state(state)
    return trainer.run(stop_after_epoch=stop)


def test_streamed_training_equals_training_on_the_same_data_in_memory(folder: Path) -> None:
    streamed = load_splits(str(folder), seed=0, options=ReadOptions(workers=2)).train
    assert isinstance(streamed.x, LazyImages)
    in_memory = ImageSet(streamed.name, streamed.x.materialize(), streamed.y, streamed.classes)
    a, b = _train(streamed).model.state_dict(), _train(in_memory).model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_streamed_run_resumes_bit_identically(folder: Path, tmp_path: Path) -> None:
    data = load_splits(str(folder), seed=0, options=ReadOptions(workers=1)).train
    whole = _train(data).model.state_dict()
    with pytest.raises(StopTraining):
        _train(data, tmp_path / "state.pt", stop=1)
    resumed = _train(data, tmp_path / "state.pt", resume=True).model.state_dict()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


def test_a_file_that_breaks_after_the_check_is_one_data_error(tmp_path: Path) -> None:
    root = digits_folder(tmp_path / "d", classes=2)
    splits = load_splits(str(root), seed=0, options=ReadOptions(workers=2))
    victim = splits.train.x.rows.source.files[0]  # type: ignore[union-attr]
    victim.write_bytes(b"not a png any more")
    with pytest.raises(DataError, match=r"cannot decode image .* changed after the data was"):
        list(splits.train.x.split(16))


def test_the_sharded_augmentation_equals_the_global_one() -> None:
    x = torch.randn(9, 1, 8, 8)
    whole = augment_batch(x, "crop+flip", torch.Generator().manual_seed(4))
    for rank in range(2):
        rows = slice(rank, None, 2)
        part = augment_batch(x[rows], "crop+flip", torch.Generator().manual_seed(4),
                             n_total=9, rows=rows)  # fmt: skip
        assert torch.equal(part, whole[rows])


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_workers_must_be_a_count(bad: object) -> None:
    with pytest.raises(DataError, match="--workers must be 0 or a positive whole number"):
        check_workers(bad)  # type: ignore[arg-type]


def test_cli_refuses_negative_workers(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["compress", "x.pt", "--data", "digits", "--ood", "noise",
                                      "--out", str(tmp_path / "o"), "--workers", "-1"])  # fmt: skip
    assert result.exit_code == 2
    assert "workers must be 0 or more" in result.output
    assert "Traceback" not in result.output


def test_ddp_on_a_streamed_folder_matches_one_process(folder: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDP_DATA": str(folder), "DDP_AUGMENT": "crop"}
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    ddp.mkdir(), one.mkdir()
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(WORKER), str(ddp), "full"], check=True, env=env, cwd=ROOT, timeout=300,
        capture_output=True,
    )  # fmt: skip
    subprocess.run([sys.executable, str(WORKER), str(one), "full"], check=True, env=env,
                   cwd=ROOT, timeout=300, capture_output=True)  # fmt: skip
    r0 = torch.load(ddp / "full-rank0.pt", weights_only=True)
    r1 = torch.load(ddp / "full-rank1.pt", weights_only=True)
    single = torch.load(one / "full-rank0.pt", weights_only=True)
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name])
        assert torch.equal(r0["masks"][name], single["masks"][name])
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
        # as in test_distributed: float sums in another order, about one ulp
        assert torch.allclose(value, single["state"][key], rtol=0, atol=1e-6), key
    assert r0["epoch_loss"] == pytest.approx(single["epoch_loss"], rel=1e-6)


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nhw"])
def test_an_uncompressed_npz_is_memory_mapped_and_reads_as_the_compressed_one(
    tmp_path: Path, layout: str
) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 3, 6, 6), dtype=np.uint8)
    x = {"nchw": x, "nhwc": x.transpose(0, 2, 3, 1), "nhw": x[:, 0]}[layout]
    y = np.arange(40) % 4
    np.savez(tmp_path / "plain.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "packed.npz", x=x, y=y)
    plain, packed = (load_splits(str(tmp_path / f"{n}.npz"), seed=1) for n in ("plain", "packed"))
    assert isinstance(plain.train.x, LazyImages)  # mapped: read on demand
    assert isinstance(packed.train.x, torch.Tensor)  # compressed: decompressed into memory
    # the mapped set's mean/std is one float64 pass, the in-memory one numpy's float32
    assert plain.preprocessing.mean == pytest.approx(packed.preprocessing.mean, rel=1e-6)
    assert plain.preprocessing.std == pytest.approx(packed.preprocessing.std, rel=1e-6)
    for part in ("train", "val", "test"):
        a, b = getattr(plain, part), getattr(packed, part)
        assert torch.allclose(a.x[np.arange(len(a))], b.x, rtol=0, atol=1e-5)
        assert torch.equal(a.y, b.y)
    # the same normalisation on both: the mapped rows are the same pixels, bit for bit
    assert isinstance(plain.train.x, LazyImages)
    same = packed.preprocessing.normalise(plain.train.x.rows.read())
    assert torch.equal(same, packed.train.x)


def test_a_memory_mapped_npz_with_nan_is_refused(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((3000, 1, 4, 4)).astype(np.float32)
    x[2500, 0, 1, 1] = np.nan
    np.savez(tmp_path / "bad.npz", x=x, y=np.arange(3000) % 2)
    with pytest.raises(DataError, match="NaN or infinite pixel values \\(first in image 2500\\)"):
        load_splits(str(tmp_path / "bad.npz"))


def test_the_progress_bar_shows_images_per_second() -> None:
    import io

    from moonprune.cli.render import RichProgress
    from rich.console import Console

    from moonprune.training import StepInfo

    out = io.StringIO()
    with RichProgress(Console(file=out, width=200, force_terminal=False), 1) as bar:
        for step in range(3):
            bar.on_step(StepInfo(0, step, 3, 0.5, 0.01, None, 0.2, 64))
    assert "img/s" in out.getvalue()


def test_a_streamed_folder_compresses_exports_and_verifies(folder: Path, tmp_path: Path) -> None:
    """The whole CLI on a lazily read folder: compress (with its ONNX file), export
    (int8, evaluated batch by batch in onnxruntime) and verify agree with each other."""
    import json

    torch.manual_seed(0)
    torch.save(demo_cnn(num_classes=6, width=8).state_dict(), tmp_path / "dense.pt")
    runner, out = CliRunner(), tmp_path / "run"
    result = runner.invoke(app, [
        "compress", str(tmp_path / "dense.pt"), "--arch", "moonprune.models:demo_cnn",
        "--arch-kwargs", '{"width": 8}', "--data", str(folder), "--ood", "noise",
        "--out", str(out), "--epochs", "2", "--sparsity", "0.5", "--workers", "1",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    accuracy = report["models"]["compressed"]["accuracy"]
    result = runner.invoke(app, ["export", str(out / "model.pt"), "--out",
                                 str(tmp_path / "int8.onnx"), "--quantize", "int8"])  # fmt: skip
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["verify", str(out / "model.pt"), "--workers", "0",
                                 "--json", str(tmp_path / "verify.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    verified = json.loads((tmp_path / "verify.json").read_text())
    assert verified["models"]["compressed"]["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert (tmp_path / "int8.onnx").stat().st_size > 0


def test_limit_heap_growth_sets_glibcs_threshold_unless_the_environment_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from moonprune.streaming import limit_heap_growth

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert limit_heap_growth() is False  # the user's own setting wins
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    expected = sys.platform.startswith("linux") and os.path.exists(
        "/lib/x86_64-linux-gnu/libc.so.6"
    )
    if expected:
        assert limit_heap_growth() is True


def test_workers_are_forked_only_after_ending_threads_have_ended() -> None:
    """settle_threads (called before every DataLoader forks) waits for a thread that is
    ending, and gives up on one blocked in a wait after its timeout."""
    import threading
    import time

    from moonprune.streaming import FEEDER_THREAD, settle_threads

    ending = threading.Thread(target=time.sleep, args=(0.1,), name=FEEDER_THREAD)
    release = threading.Event()
    blocked = threading.Thread(target=release.wait, name=FEEDER_THREAD)
    ending.start(), blocked.start()
    start = time.monotonic()
    settle_threads(timeout=1.0)
    waited = time.monotonic() - start
    assert not ending.is_alive() and blocked.is_alive()
    assert 0.9 <= waited < 1.5  # the blocked thread used up the rest of the timeout, no more
    release.set()
    blocked.join()
