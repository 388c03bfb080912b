"""Feature scores end to end: compress -> checkpoint -> ONNX (float and int8) -> verify."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from moonprune.exporters import RejectingClassifier, export_onnx
from moonprune.exporters.checkpoint_export import export_checkpoint
from moonprune.exporters.feature_rejector import SCORE_PREFIX
from moonprune.exporters.inspection import inspect_onnx
from moonprune.exporters.onnx_export import run_onnx
from moonprune.exporters.rejector import hostile_rows
from typer.testing import CliRunner

from moonprune.assessment import collect
from moonprune.checkpoints import ArchSpec, DenseModel, load_checkpoint
from moonprune.config import build_config
from moonprune.data import load_ood, load_splits
from moonprune.errors import ConfigError
from moonprune.models import demo_cnn
from moonprune.pipeline import compress
from moonprune.reliability.options import EvalOptions
from moonprune.reliability.scores import score_names
from moonprune.verification import verify

DATA, OOD = "digits:0-2", ["noise", "textures"]


@pytest.fixture(scope="module")
def knn_run(tmp_path_factory: pytest.TempPathFactory):
    """A 1-epoch compress deploying the knn score, with its ONNX export."""
    out = tmp_path_factory.mktemp("knn") / "run"
    torch.manual_seed(0)
    cfg = build_config({
        "checkpoint": "", "data": DATA, "ood": OOD, "out": str(out), "score": "knn",
        "feature_bank": 200, "knn_k": 5, "train": {"epochs": 1}, "moon": {"warmup_epochs": 0},
    })  # fmt: skip
    spec = ArchSpec("moonprune.models:demo_cnn", {"num_classes": 3, "width": 4})
    return compress(cfg, dense=DenseModel(demo_cnn(num_classes=3, width=4), spec))


def _real_and_random() -> np.ndarray:
    splits = load_splits(DATA, seed=0)
    textures = load_ood("textures", splits.preprocessing).x[:40]
    random = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 3
    return torch.cat([splits.test.x[:60], textures, random]).numpy()


@pytest.mark.parametrize("score", ["mahalanobis", "mahalanobis++", "knn"])
def test_in_graph_score_equals_pytorch(knn_run, tmp_path, score: str) -> None:
    ckpt = knn_run.checkpoint
    splits = load_splits(DATA, seed=0)
    path = tmp_path / f"{score}.onnx"
    export_onnx(ckpt.model, path, num_known=3, input_shape=(1, 8, 8), threshold=-1.0,
                score=score, feature_stats=ckpt.feature_stats,
                example_inputs=splits.val.x)  # fmt: skip
    x = _real_and_random()
    got = run_onnx(path, x)["confidence"]
    wrapper = RejectingClassifier(ckpt.model, 3, -1.0, score, feature_stats=ckpt.feature_stats,
                                  feature_layer="classifier").eval()  # fmt: skip
    with torch.no_grad():
        torch_conf = wrapper(torch.from_numpy(x))[2].numpy()
    assert np.allclose(got, torch_conf, rtol=1e-4, atol=1e-4)
    # ... and the score the assessment (threshold, AUROC) computed on the same rows
    assessed = collect(ckpt.model, splits, {}, feature_stats=ckpt.feature_stats)
    n = len(splits.test)
    test_conf = run_onnx(path, splits.test.x.numpy())["confidence"]
    assert assessed.features is not None
    assert np.allclose(test_conf, assessed.features.values[score]["id_test"][:n], rtol=1e-4,
                       atol=1e-4)  # fmt: skip
    hostile = run_onnx(path, hostile_rows(x))
    assert (hostile["label"] == -1).all() and hostile["is_unknown"].all()


def test_checkpoint_report_and_onnx_carry_the_statistics(knn_run) -> None:
    report, ckpt = knn_run.report, knn_run.checkpoint
    assert report.score == "knn"
    assert set(report.scores["compressed"]) == set(score_names())
    assert set(report.scores["dense"]) == set(score_names()) - {"unknown"}  # no K+1 head
    for per_ood in report.scores["compressed"].values():
        assert set(per_ood) == set(OOD) and set(per_ood["noise"]) == {"auroc", "fpr95"}
    knn_auroc = report.models["compressed"]["ood"]["textures"]["auroc"]
    assert report.scores["compressed"]["knn"]["textures"]["auroc"] == pytest.approx(knn_auroc)
    stats = ckpt.feature_stats
    assert stats is not None and stats.k == 5 and stats.bank.shape[0] <= 200
    loaded = load_checkpoint(knn_run.out / "model.pt")
    assert loaded.feature_stats is not None
    for name in ("means", "whitening", "bank"):
        assert torch.equal(getattr(loaded.feature_stats, name), getattr(stats, name))
    proto = onnx.load(str(knn_run.out / "model.onnx"))
    bank = stats.bank.numpy()
    constants = [onnx.numpy_helper.to_array(i) for i in proto.graph.initializer]
    assert any(c.shape == bank.T.shape and np.allclose(c, bank.T) for c in constants)
    info = inspect_onnx(knn_run.out / "model.onnx")
    assert info["metadata"]["moonprune.score"] == "knn"
    assert int(info["metadata"]["moonprune.score_bytes"]) == stats.nbytes("knn") == bank.nbytes
    from moonprune.cli.app import app

    shown = CliRunner().invoke(app, ["inspect", str(knn_run.out / "model.onnx")])
    assert shown.exit_code == 0 and f"moonprune.score_bytes: {bank.nbytes}" in shown.output


def test_int8_keeps_the_score_path_in_float(knn_run, tmp_path) -> None:
    out = tmp_path / "int8.onnx"
    report = export_checkpoint(knn_run.out / "model.pt", out, quantize="int8").to_json()
    proto = onnx.load(str(out))
    dequantized = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    score_nodes = [n for n in proto.graph.node if n.name.startswith(SCORE_PREFIX)]
    assert {"MatMul", "TopK"} <= {n.op_type for n in score_nodes}
    for node in score_nodes:
        assert not dequantized & set(node.input), node.name  # float inputs only
    # the network itself is quantized
    assert any(n.op_type == "DequantizeLinear" for n in proto.graph.node)
    x = _real_and_random()
    hostile = run_onnx(out, hostile_rows(x))
    assert (hostile["label"] == -1).all() and hostile["is_unknown"].all()
    for name, value in report["metrics"]["auroc"].items():
        assert value == pytest.approx(report["float_metrics"]["auroc"][name], abs=0.05)


def test_verify_uses_the_stored_statistics(knn_run) -> None:
    result = verify(knn_run.out / "model.pt", n_boot=10)
    report = result.report
    assert report.score == "knn"
    assert report.data.features_fitted_on == {"compressed": "checkpoint"}
    assert set(report.scores["compressed"]) == set(score_names())
    expected = knn_run.report.scores["compressed"]["knn"]
    for name, value in report.scores["compressed"]["knn"].items():
        assert value["auroc"] == pytest.approx(expected[name]["auroc"], abs=1e-9)


def test_a_feature_score_without_a_final_linear_is_refused() -> None:
    from moonprune.assessment import assess

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 8), torch.nn.Flatten())  # no nn.Linear
    splits = load_splits(DATA, seed=0)
    with pytest.raises(ConfigError, match=r"final nn\.Linear"):
        assess(model, splits, {}, EvalOptions(score="mahalanobis", n_boot=1))
    assert "mahalanobis" not in assess(model, splits, {}, EvalOptions(n_boot=1)).score_table


@pytest.mark.parametrize("command", ["verify", "export"])
def test_older_statistics_refuse_only_mahalanobis_plus_plus(knn_run, tmp_path, command) -> None:
    """A checkpoint whose statistics predate mahalanobis++ still verifies and exports
    with its own score; asking for mahalanobis++ is one line and exit 2, no file."""
    from moonprune.cli.app import app

    record = torch.load(knn_run.out / "model.pt", weights_only=True)
    record["feature_stats"] = {k: v for k, v in record["feature_stats"].items()
                               if not k.startswith("unit_")}  # fmt: skip
    old = tmp_path / "old.pt"
    torch.save(record, old)
    extra = ["--out", str(tmp_path / "o.onnx")] if command == "export" else []
    asked = CliRunner().invoke(app, [command, str(old), *extra, "--score", "mahalanobis++"])
    assert asked.exit_code == 2, asked.output
    lines = [line for line in asked.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "before the 'mahalanobis++' score existed" in " ".join(
        asked.output.split()
    )
    assert not (tmp_path / "o.onnx").exists()
    own = CliRunner().invoke(app, [command, str(old), *extra])
    assert own.exit_code == 0, own.output
