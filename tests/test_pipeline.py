"""The demo end to end, verify's gates and exit codes, resume through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from moonprune.cli.app import app
from typer.testing import CliRunner

runner = CliRunner()


def _moonprune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moonprune", *args], capture_output=True, text=True, timeout=600
    )


def test_demo_outputs_and_report_contract(demo_run) -> None:
    out = demo_run.out
    for name in ("model.pt", "report.json", "report.html", "model.onnx", "recipe.json", "dense.pt"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    for key in ("moonprune_version", "method", "target_sparsity", "sparsity", "threshold", "tpr",
                "models", "timing"):  # fmt: skip
        assert key in report, key
    assert abs(report["sparsity"] - report["target_sparsity"]) <= 0.005
    for model in ("dense", "compressed"):
        m = report["models"][model]
        assert set(m) >= {"accuracy", "ece", "nll", "ood"}
        assert set(m["ood"]) == {"digits:6-9", "noise"}
        for metrics in m["ood"].values():
            assert set(metrics) == {"auroc", "fpr95", "aupr_in", "aupr_out"}
    assert report["models"]["compressed"]["accuracy"] > 0.9
    assert abs(report["acceptance"]["id_val_accepted"] - 0.95) < 0.02
    for model in ("dense", "compressed"):
        cal = report["calibration"][model]
        assert {"ece_before", "ece_after", "nll_before", "nll_after", "auroc_before",
                "auroc_after", "temperature"} <= set(cal)  # fmt: skip
        if cal["temperature"] == 1.0:
            assert cal["ece_after"] == cal["ece_before"] and not cal["auroc_changed"]


def test_verify_matches_the_demo_report(demo_run, tmp_path: Path) -> None:
    report = json.loads((demo_run.out / "report.json").read_text())
    json_path = tmp_path / "verify.json"
    result = runner.invoke(
        app, ["verify", str(demo_run.out / "model.pt"), "--data", "digits:0-5",
              "--ood", "digits:6-9", "--ood", "noise", "--json", str(json_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    verified = json.loads(json_path.read_text())
    for name in ("digits:6-9", "noise"):
        assert verified["models"]["compressed"]["ood"][name]["auroc"] == pytest.approx(
            report["models"]["compressed"]["ood"][name]["auroc"], abs=1e-12
        )
    assert verified["threshold"] == pytest.approx(report["threshold"])


def test_verify_numbers_recomputed_from_the_model_outputs(demo_run, tmp_path: Path) -> None:
    """--json's AUROC equals scikit-learn's on the model's own outputs (PyTorch exactly;
    the exported graph's float32 arithmetic within 2e-3)."""
    import numpy as np
    from moonprune.exporters import run_onnx
    from sklearn.metrics import roc_auc_score

    from moonprune.checkpoints import load_checkpoint
    from moonprune.data import load_ood, load_splits

    json_path = tmp_path / "v.json"
    runner.invoke(app, ["verify", str(demo_run.out / "model.pt"), "--json", str(json_path)])
    verified = json.loads(json_path.read_text())
    ckpt = load_checkpoint(demo_run.out / "model.pt")
    splits = load_splits("digits:0-5", seed=0, preprocessing=ckpt.preprocessing)
    noise = load_ood("noise", ckpt.preprocessing, seed=0)
    id_conf = run_onnx(demo_run.out / "model.onnx", splits.test.x.numpy())["confidence"]
    ood_conf = run_onnx(demo_run.out / "model.onnx", noise.x.numpy())["confidence"]
    labels = np.r_[np.ones(len(id_conf)), np.zeros(len(ood_conf))]
    got = verified["models"]["compressed"]["ood"]["noise"]["auroc"]
    assert got == pytest.approx(roc_auc_score(labels, np.r_[id_conf, ood_conf]), abs=2e-3)
    with torch.no_grad():
        probs = [torch.softmax(ckpt.model(x), dim=1)[:, :6].amax(1).numpy()
                 for x in (splits.test.x, noise.x)]  # fmt: skip
    assert got == pytest.approx(roc_auc_score(labels, np.r_[probs[0], probs[1]]), abs=1e-12)
    accuracy = (ckpt.model(splits.test.x)[:, :6].argmax(1) == splits.test.y).float().mean()
    assert verified["models"]["compressed"]["accuracy"] == pytest.approx(float(accuracy))


def test_verify_exit_codes_as_subprocess(demo_run, tmp_path: Path) -> None:
    model = str(demo_run.out / "model.pt")
    ok = _moonprune("verify", model, "--min-auroc", "0.5", "--max-ece", "0.5")
    assert ok.returncode == 0, ok.stderr
    bad = _moonprune("verify", model, "--min-auroc", "1.01", "--json", str(tmp_path / "g.json"))
    assert bad.returncode == 1
    assert "gate failed" in bad.stderr and "Traceback" not in bad.stderr
    gates = json.loads((tmp_path / "g.json").read_text())["gates"]
    assert gates and not any(g["passed"] for g in gates)
    missing = _moonprune("verify", str(tmp_path / "nope.pt"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_verify_with_baseline_drop_gates(demo_run) -> None:
    result = runner.invoke(
        app, ["verify", str(demo_run.out / "model.pt"), "--baseline",
              str(demo_run.out / "dense.pt"), "--max-accuracy-drop", "0.05",
              "--max-auroc-drop", "0.5"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "max_accuracy_drop" in result.output


def test_interrupted_compress_resumes_to_the_same_weights(demo_run, tmp_path: Path) -> None:
    import torch

    from moonprune.checkpoints import load_checkpoint
    from moonprune.config import build_config
    from moonprune.pipeline import compress
    from moonprune.training import StopTraining, Trainer

    base = {
        "checkpoint": str(demo_run.out / "dense.pt"), "arch": "moonprune.models:demo_cnn",
        "arch_kwargs": {"num_classes": 6, "in_channels": 1}, "data": "digits:0-5",
        "ood": ["noise"], "export": False, "train": {"epochs": 4},
        "moon": {"warmup_epochs": 1},
    }  # fmt: skip
    full = compress(build_config({**base, "out": str(tmp_path / "full")}))

    original_run = Trainer.run

    def interrupted(self, stop_after_epoch=None):  # type: ignore[no-untyped-def]
        return original_run(self, stop_after_epoch=1)

    Trainer.run = interrupted  # type: ignore[method-assign]
    try:
        with pytest.raises(StopTraining):
            compress(build_config({**base, "out": str(tmp_path / "resumed")}))
    finally:
        Trainer.run = original_run  # type: ignore[method-assign]
    assert not (tmp_path / "resumed").exists()
    assert (tmp_path / ".resumed.partial" / "train-state.pt").is_file()
    resumed = compress(build_config({**base, "out": str(tmp_path / "resumed")}), resume=True)
    a = load_checkpoint(full.out / "model.pt").model.state_dict()
    b = load_checkpoint(resumed.out / "model.pt").model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("score", ["energy", "max_logit", "unknown"])
def test_verify_with_each_score(demo_run, score: str, tmp_path: Path) -> None:
    out = tmp_path / "v.json"
    result = runner.invoke(app, ["verify", str(demo_run.out / "model.pt"), "--score", score,
                                 "--json", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["score"] == score
    assert abs(report["acceptance"]["id_val_accepted"] - 0.95) < 0.02
    assert 0.0 <= report["models"]["compressed"]["ood"]["noise"]["auroc"] <= 1.0
