"""The demo end to end, verify's gates and exit codes, resume through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    printed = " ".join(result.output.split())  # rich may wrap long lines
    accepted = 100 * verified["acceptance"]["id_val_accepted"]
    assert f"accepts {accepted:.1f}% of ID validation inputs" in printed
    for name, rejected in verified["acceptance"]["ood_rejected"].items():
        assert f"rejects {100 * rejected:.1f}% of {name}" in printed


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(chunk) for chunk in x.split(512)])


def _ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Equal-width bins (lo, hi], written out as a plain loop."""
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (confidence > lo) & (confidence <= hi) if b else confidence <= hi
        if inside.any():
            gap = correct[inside].mean() - confidence[inside].mean()
            total += inside.sum() / confidence.size * abs(gap)
    return total


def test_verify_numbers_recomputed_from_the_model_outputs(demo_run, tmp_path: Path) -> None:
    """Every number in --json equals one recomputed with numpy / scikit-learn from the
    model's logits (PyTorch exactly; the exported graph's float32 arithmetic within 2e-3)."""
    from moonprune.exporters import run_onnx
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    from moonprune.checkpoints import load_checkpoint
    from moonprune.data import load_ood, load_splits

    json_path = tmp_path / "v.json"
    result = runner.invoke(
        app, ["verify", str(demo_run.out / "model.pt"), "--json", str(json_path)]
    )
    assert result.exit_code == 0, result.output
    verified = json.loads(json_path.read_text())["models"]["compressed"]
    ckpt = load_checkpoint(demo_run.out / "model.pt")
    t, k = ckpt.temperature, 6
    splits = load_splits("digits:0-5", seed=0, preprocessing=ckpt.preprocessing)
    y = splits.test.y.numpy()
    test_logits = _forward(ckpt.model, splits.test.x)
    probs = torch.softmax(test_logits.double() / t, dim=1).numpy()
    predicted, confidence = probs[:, :k].argmax(1), probs[:, :k].max(1)
    assert verified["accuracy"] == pytest.approx(np.mean(predicted == y), abs=1e-12)
    assert verified["ece"] == pytest.approx(_ece(confidence, predicted == y), abs=1e-9)
    nll = -np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean()
    assert verified["nll"] == pytest.approx(nll, abs=1e-9)

    def mahalanobis(x: torch.Tensor) -> np.ndarray:  # the deployed (default) score, float32
        features: list[torch.Tensor] = []
        hook = ckpt.model.classifier.register_forward_pre_hook(lambda _m, a: features.append(a[0]))
        _forward(ckpt.model, x)
        hook.remove()
        stats = ckpt.feature_stats
        assert ckpt.score == "mahalanobis++" and stats is not None
        assert stats.unit_means is not None and stats.unit_whitening is not None
        f = torch.cat(features)
        z = f / f.norm(dim=1, keepdim=True)  # Mahalanobis++: on the unit sphere
        diff = z[:, None, :] - stats.unit_means[None]  # (N, K, D)
        # (z - mu)^T W W^T (z - mu) = ||(z - mu) W||^2, in the stored float32 factor
        distance = torch.einsum("nkd,de->nke", diff, stats.unit_whitening).square().sum(-1)
        return (-distance.amin(1)).double().numpy()

    id_scores = mahalanobis(splits.test.x)
    for name in ("digits:6-9", "noise"):
        ood = load_ood(name, ckpt.preprocessing, seed=0)
        ood_scores = mahalanobis(ood.x)
        labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
        pooled = np.r_[id_scores, ood_scores]
        fpr, tpr, _ = roc_curve(labels, pooled, drop_intermediate=False)
        expected = {
            "auroc": roc_auc_score(labels, pooled),
            "fpr95": fpr[np.flatnonzero(tpr >= 0.95)[0]],
            "aupr_in": average_precision_score(labels, pooled),
            "aupr_out": average_precision_score(1 - labels, -pooled),
        }
        for key, value in expected.items():
            assert verified["ood"][name][key] == pytest.approx(value, abs=1e-12), (name, key)
        graph = [run_onnx(demo_run.out / "model.onnx", v.numpy())["confidence"]
                 for v in (splits.test.x, ood.x)]  # fmt: skip
        graph_auroc = roc_auc_score(labels, np.r_[graph[0], graph[1]])
        assert verified["ood"][name]["auroc"] == pytest.approx(graph_auroc, abs=2e-3)


def test_onnx_accepts_the_validation_inputs_pytorch_accepts(demo_run) -> None:
    """The threshold sits between two validation scores, so the graph's float32 scores
    accept exactly the inputs the report counts (it differed when it equalled one)."""
    from moonprune.exporters import run_onnx

    from moonprune.checkpoints import load_checkpoint
    from moonprune.data import load_splits

    report = json.loads((demo_run.out / "report.json").read_text())
    ckpt = load_checkpoint(demo_run.out / "model.pt")
    val = load_splits("digits:0-5", seed=0, preprocessing=ckpt.preprocessing).val
    graph = run_onnx(demo_run.out / "model.onnx", val.x.numpy())
    assert float(np.mean(~graph["is_unknown"])) == report["acceptance"]["id_val_accepted"]
    assert abs(report["acceptance"]["id_val_accepted"] - 0.95) < 0.02


def test_verify_exit_codes_as_subprocess(demo_run, tmp_path: Path) -> None:
    model = str(demo_run.out / "model.pt")
    ok = _moonprune("verify", model, "--min-auroc", "0.5", "--max-ece", "0.5")
    assert ok.returncode == 0, ok.stderr
    bad = _moonprune("verify", model, "--min-auroc", "1.0", "--score", "msp",
                     "--json", str(tmp_path / "g.json"))  # fmt: skip
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
    # held-out digits are separable by every score; a flipped sign would give < 0.5
    assert report["models"]["compressed"]["ood"]["digits:6-9"]["auroc"] > 0.5


@pytest.mark.parametrize("option", ["--json", "--html"])
def test_verify_unwritable_output_path_exits_2_before_evaluating(
    demo_run, tmp_path: Path, option: str
) -> None:
    target = tmp_path / "missing" / "out.file"
    run = _moonprune("verify", str(demo_run.out / "model.pt"), option, str(target))
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0] and "does not exist" in lines[0]
    assert "threshold" not in run.stdout  # nothing was evaluated


def test_verify_output_path_that_is_a_folder_is_bad_input(demo_run, tmp_path: Path) -> None:
    result = runner.invoke(app, ["verify", str(demo_run.out / "model.pt"), "--json",
                                 str(tmp_path)])  # fmt: skip
    assert result.exit_code == 2
    assert "is a folder" in " ".join(result.output.split())


def test_verify_write_failure_is_bad_input_not_a_failed_gate(
    demo_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import moonprune.verification

    def full_disk(obj: object, path: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(moonprune.verification, "write_json", full_disk)
    result = runner.invoke(app, ["verify", str(demo_run.out / "model.pt"), "--json",
                                 str(tmp_path / "v.json")])  # fmt: skip
    assert result.exit_code == 2
    assert "No space left on device" in " ".join(result.output.split())
