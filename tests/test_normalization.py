"""``--normalize`` (issue 15): the dense model is measured and fine-tuned on the inputs
it was trained on. Tiny CNNs are trained here under each convention; ``auto`` must find
it, and the checkpoint, its ONNX file and ``verify`` must agree on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from moonprune.cli.app import app
from typer.testing import CliRunner

from moonprune.checkpoints import ArchSpec, DenseModel, load_checkpoint
from moonprune.config import CompressConfig, build_config
from moonprune.data import Preprocessing, Splits, load_splits, read_split_images
from moonprune.demo import train_dense
from moonprune.errors import CheckpointError, ConfigError
from moonprune.normalization import CandidateScore, best_candidate, convention, parse_custom
from moonprune.pipeline import compress, prepare_inputs
from moonprune.run_record import parse_preprocessing

runner = CliRunner()
DATA = "digits:0-2"
ARCH = ArchSpec("moonprune.models:demo_cnn", {"num_classes": 3, "width": 8})
#: convention -> (mean, std) on pixels in [0, 1], written out independently of moonprune
FIXED = {"none": (0.0, 1.0), "symmetric": (0.5, 0.5)}


def _independent(convention_name: str) -> Preprocessing:
    """The convention's preprocessing, computed here from the raw training pixels."""
    parts = read_split_images(DATA, seed=0)
    if convention_name == "dataset":
        train = parts["train"].images
        mean, std = float(train.mean()), float(max(train.std(), 1e-3))
    else:
        mean, std = FIXED[convention_name]
    _, c, h, w = parts["train"].images.shape
    return Preprocessing(c, h, w, 1 / 16, (mean,), (std,))


def _splits(convention_name: str) -> Splits:
    return load_splits(DATA, seed=0, preprocessing=_independent(convention_name))


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x)[:, :3].argmax(1) == y).double().mean())


@pytest.fixture(scope="module")
def trained() -> dict[str, torch.nn.Module]:
    """A small CNN trained for a few epochs on digits 0-2 under each convention."""
    models = {}
    for name in ("none", "dataset", "symmetric"):
        torch.manual_seed(0)
        models[name] = train_dense(ARCH.build(), _splits(name), epochs=8)
    return models


def _config(out: Path, **values: object) -> CompressConfig:
    base = {"checkpoint": "dense.pt", "data": DATA, "ood": ["digits:3-5"], "out": str(out),
            "arch": ARCH.factory, "arch_kwargs": ARCH.kwargs, "train": {"epochs": 1},
            "moon": {"warmup_epochs": 0}}  # fmt: skip
    return build_config({**base, **values})


@pytest.mark.parametrize("name", ["none", "dataset", "symmetric"])
def test_auto_finds_the_convention_the_model_was_trained_on(trained, tmp_path, name) -> None:
    model = trained[name]
    inputs = prepare_inputs(_config(tmp_path / "o"), DenseModel(model, ARCH))
    choice = inputs.normalization
    assert choice.how == "auto" and choice.label == name
    assert inputs.splits.preprocessing.normalize == name
    assert set(choice.scores) == {"none", "dataset", "symmetric", "0-255"}  # 1 channel
    independent = _splits(name)
    np.testing.assert_allclose(inputs.splits.preprocessing.mean, independent.preprocessing.mean,
                               rtol=1e-6)  # fmt: skip
    assert torch.equal(inputs.splits.test.x, independent.test.x)
    assert choice.scores[name].accuracy == _accuracy(model, independent.val.x, independent.val.y)
    assert f"using {name}" in choice.summary()
    assert "with dataset" in choice.summary() and "(validation split)" in choice.summary()


def test_report_checkpoint_onnx_and_verify_agree(trained, tmp_path) -> None:
    """A model trained on [0, 1] inputs: the report's dense accuracy is the model's own,
    and model.pt, model.onnx (onnxruntime) and verify all use [0, 1] inputs."""
    import onnx
    import onnxruntime as ort

    model = trained["none"]
    result = compress(_config(tmp_path / "run"), dense=DenseModel(model, ARCH))
    pre = result.report.preprocessing
    assert pre["normalize"] == "none" and pre["choice"] == "auto"
    assert pre["mean"] == [0.0] and pre["std"] == [1.0]
    independent = _splits("none")
    dense_acc = _accuracy(model, independent.test.x, independent.test.y)
    assert result.report.models["dense"]["accuracy"] == dense_acc
    assert pre["candidates"]["none"]["accuracy"] > pre["candidates"]["dataset"]["accuracy"]

    ckpt = load_checkpoint(tmp_path / "run" / "model.pt")
    assert ckpt.preprocessing == independent.preprocessing.__class__(
        **{**vars(independent.preprocessing), "normalize": "none"}
    )
    proto = onnx.load(str(tmp_path / "run" / "model.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["moonprune.preprocessing"])["normalize"] == "none"
    session = ort.InferenceSession(str(tmp_path / "run" / "model.onnx"))
    logits = session.run(["logits"], {"input": independent.test.x.numpy()})[0]
    with torch.no_grad():
        torch_logits = ckpt.model.eval()(independent.test.x).numpy()
    np.testing.assert_allclose(logits, torch_logits, atol=1e-4)
    onnx_acc = float((logits[:, :3].argmax(1) == independent.test.y.numpy()).mean())
    assert onnx_acc == result.report.models["compressed"]["accuracy"]

    json_path = tmp_path / "verify.json"
    verified = runner.invoke(app, ["verify", str(tmp_path / "run" / "model.pt"), "--data", DATA,
                                   "--ood", "digits:3-5", "--json", str(json_path)])  # fmt: skip
    assert verified.exit_code == 0, verified.output
    verify = json.loads(json_path.read_text())
    assert verify["models"]["compressed"]["accuracy"] == onnx_acc

    inspected = runner.invoke(app, ["inspect", str(tmp_path / "run" / "model.pt")])
    assert inspected.exit_code == 0 and "'normalize': 'none'" in inspected.output

    # a moonprune checkpoint as the starting model keeps its own preprocessing
    again = prepare_inputs(_config(tmp_path / "o2", checkpoint=str(tmp_path / "run" / "model.pt")))
    assert again.normalization.how == "checkpoint"
    assert again.splits.preprocessing == ckpt.preprocessing
    with pytest.raises(ConfigError, match="keeps the preprocessing it records"):
        prepare_inputs(_config(tmp_path / "o3", checkpoint=str(tmp_path / "run" / "model.pt"),
                               normalize="dataset"))  # fmt: skip


def test_baked_export_takes_raw_pixels(trained, tmp_path) -> None:
    """--bake-preprocessing: the graph takes raw pixels (digits: 0-16) and applies the
    recorded convention inside."""
    import onnxruntime as ort
    from moonprune.exporters.checkpoint_export import export_checkpoint

    result = compress(_config(tmp_path / "run", export=False, normalize="symmetric"),
                      dense=DenseModel(trained["symmetric"], ARCH))  # fmt: skip
    out = tmp_path / "baked.onnx"
    report = export_checkpoint(
        tmp_path / "run" / "model.pt", out, bake_preprocessing=True
    ).to_json()
    assert report["metrics"]["accuracy"] == result.report.models["compressed"]["accuracy"]
    raw = read_split_images(DATA, seed=0)["test"].images * 16  # the digits' raw values
    labels = ort.InferenceSession(str(out)).run(["label"], {"input": raw})[0]
    with torch.no_grad():
        expected = result.checkpoint.model.eval()(torch.from_numpy((raw / 16 - 0.5) / 0.5))
    accepted = labels >= 0
    assert (labels[accepted] == expected[:, :3].argmax(1).numpy()[accepted]).all()


def test_an_explicit_choice_far_below_the_best_is_kept_with_a_warning(trained, tmp_path) -> None:
    inputs = prepare_inputs(_config(tmp_path / "o", normalize="dataset"),
                            DenseModel(trained["none"], ARCH))  # fmt: skip
    choice = inputs.normalization
    assert choice.how == "given" and inputs.splits.preprocessing.normalize == "dataset"
    assert choice.warning is not None and "try --normalize none" in choice.warning
    fine = prepare_inputs(_config(tmp_path / "o", normalize="none"),
                          DenseModel(trained["none"], ARCH))  # fmt: skip
    assert fine.normalization.warning is None


def test_custom_mean_std(trained, tmp_path) -> None:
    inputs = prepare_inputs(_config(tmp_path / "o", normalize="mean=0.5;std=0.5"),
                            DenseModel(trained["symmetric"], ARCH))  # fmt: skip
    pre = inputs.splits.preprocessing
    assert (pre.mean, pre.std, pre.normalize) == ((0.5,), (0.5,), "custom")
    assert inputs.normalization.warning is None
    assert "mean=0.5;std=0.5" in inputs.normalization.scores


def test_ties_prefer_lower_nll_then_the_fixed_order() -> None:
    tie = {"none": CandidateScore(1.0, 0.3), "dataset": CandidateScore(1.0, 0.1),
           "symmetric": CandidateScore(0.9, 0.05)}  # fmt: skip
    assert best_candidate(tie) == ("dataset", True)
    same = {"none": CandidateScore(1.0, 0.1), "dataset": CandidateScore(1.0, 0.1)}
    assert best_candidate(same) == ("none", False)
    assert best_candidate({"none": CandidateScore(0.5, 0.1),
                           "dataset": CandidateScore(0.9, 2.0)}) == ("dataset", False)  # fmt: skip


@pytest.mark.parametrize(
    ("text", "match"),
    [("mean=1;std=0", "std must be > 0"), ("mean=0.5", "needs both mean and std"),
     ("mean=a;std=1", "mean must be numbers"), ("std=1;std=1", "not one of auto"),
     ("mean=nan;std=1", "mean must be finite"), ("imagenett", "not one of auto")],
)  # fmt: skip
def test_bad_specs_are_config_errors(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_custom(text)
    with pytest.raises(ConfigError, match=match):
        build_config({"checkpoint": "d.pt", "data": DATA, "out": "o", "normalize": text})


def test_conventions_that_do_not_fit_the_channels() -> None:
    gray = Preprocessing(1, 8, 8, 1 / 16, (0.3,), (0.4,), "dataset")
    with pytest.raises(ConfigError, match="imagenet needs 3-channel images"):
        convention("imagenet", gray)
    with pytest.raises(ConfigError, match="gives 2 values but the images have 1 channel"):
        convention("mean=0.1,0.2;std=0.5", gray)
    rgb = Preprocessing(3, 8, 8, 1 / 255, (0.3,) * 3, (0.4,) * 3, "dataset")
    assert convention("mean=0.5;std=0.25", rgb).std == (0.25, 0.25, 0.25)
    assert convention("imagenet", rgb).mean == (0.485, 0.456, 0.406)
    assert convention("0-255", rgb).normalise(np.ones((1, 3, 8, 8))).max() == pytest.approx(255)


@pytest.mark.parametrize(
    ("flag", "message"),
    [("mean=1;std=0", "std must be > 0"), ("imagenet", "imagenet needs 3-channel images"),
     ("mean=0.1,0.2;std=0.5", "gives 2 values")],
)  # fmt: skip
def test_cli_refuses_bad_normalize_and_writes_nothing(tmp_path, flag: str, message: str) -> None:
    dense = tmp_path / "dense.pt"
    torch.save(ARCH.build().state_dict(), dense)
    out = tmp_path / "out"
    result = runner.invoke(app, ["compress", str(dense), "--arch", ARCH.factory,
                                 "--arch-kwargs", json.dumps(ARCH.kwargs), "--data", DATA,
                                 "--out", str(out), "--normalize", flag])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["dense.pt"]


def test_the_recorded_convention_is_checked_on_load() -> None:
    record = Preprocessing(1, 8, 8, 1 / 16, (0.0,), (1.0,), "none").as_dict()
    assert parse_preprocessing(record, "m.pt").normalize == "none"
    old = {k: v for k, v in record.items() if k != "normalize"}  # before --normalize
    assert parse_preprocessing(old, "m.pt").normalize is None
    with pytest.raises(CheckpointError, match="normalize one of"):
        parse_preprocessing({**record, "normalize": "os.system"}, "m.pt")


def test_the_demo_records_its_dataset_normalisation(demo_run) -> None:
    pre = json.loads((demo_run.out / "report.json").read_text())["preprocessing"]
    assert pre["normalize"] == "dataset" and pre["choice"] == "auto"
    assert pre["candidates"]["dataset"]["accuracy"] > pre["candidates"]["none"]["accuracy"]
