"""Temperature scaling: fitted on validation data, carried into the exported graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from moonprune.exporters import RejectingClassifier, export_onnx, run_onnx

from moonprune.assessment import assess_logits, collect
from moonprune.calibration import (
    choose_temperature,
    fit_temperature,
    saturated_fraction,
)
from moonprune.data import Splits, load_ood, load_splits
from moonprune.errors import ConfigError
from moonprune.models import demo_cnn
from moonprune.reliability import (
    calibrate_threshold,
    compute_score,
    evaluate_logits,
    expected_calibration_error,
)
from moonprune.reliability.options import EvalOptions


def _calibrated_logits(
    n: int = 4000, k: int = 5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose labels are drawn from their own softmax: calibrated at T = 1."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(n, k, generator=g)
    labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
    return logits, labels


def _ece(logits: torch.Tensor, labels: torch.Tensor) -> float:
    p = torch.softmax(logits, 1)
    return expected_calibration_error(p.amax(1).numpy(), (p.argmax(1) == labels).numpy())


def test_overconfident_model_gets_t_above_one_and_ece_drops() -> None:
    logits, labels = _calibrated_logits()
    over = 5.0 * logits
    t = fit_temperature(over, labels)
    assert 4.0 < t < 6.0
    assert _ece(over / t, labels) < 0.5 * _ece(over, labels)


def test_calibrated_model_keeps_t_near_one() -> None:
    logits, labels = _calibrated_logits(seed=1)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.1)


def test_separable_validation_data_falls_back_to_one() -> None:
    labels = torch.arange(6)
    logits = 10.0 * torch.eye(6)  # every prediction right: NLL falls as T -> 0
    assert fit_temperature(logits, labels) < 0.06
    assert choose_temperature("auto", logits, labels).used == 1.0


def test_sharpening_that_saturates_the_softmax_is_refused() -> None:
    """Separable but for one near-tie: NLL has an interior minimum (T ~ 0.36, far from the
    bound) where float32 confidences of half the inputs become exactly 1.0."""
    labels = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(0))
    logits = 6.0 * torch.nn.functional.one_hot(labels, 4).float()
    logits[0] = 0.0
    logits[0, (labels[0] + 1) % 4] = 0.001  # one input wrong by a hair
    t = fit_temperature(logits, labels)
    assert 0.2 < t < 0.5
    assert saturated_fraction(logits, t) > 0.3 and saturated_fraction(logits, 1.0) == 0.0
    assert choose_temperature("auto", logits, labels).used == 1.0


def test_explicit_values_are_validated() -> None:
    logits, labels = _calibrated_logits(n=10)
    assert choose_temperature(2.5, logits, labels).used == 2.5
    with pytest.raises(ConfigError):
        choose_temperature(-1.0, logits, labels)


def test_t_equal_one_leaves_every_output_unchanged(digits06: Splits) -> None:
    """T = 1 gives what the formulas give without any temperature, output by output."""
    torch.manual_seed(0)
    k = digits06.num_classes
    model = demo_cnn(num_classes=k + 1, width=4).eval()
    x = digits06.test.x[:40]
    with torch.no_grad():
        logits = model(x)
        expected = torch.softmax(logits, dim=1)[:, :k]
        threshold = float(expected.amax(dim=1).median())
        out = RejectingClassifier(model, k, threshold, temperature=1.0).eval()(x)
    raw, probabilities, confidence, label, is_unknown = out
    assert torch.equal(raw, logits)
    assert torch.equal(probabilities, expected)
    assert torch.equal(confidence, expected.amax(dim=1))
    rejected = expected.amax(dim=1) < threshold
    assert 0 < int(rejected.sum()) < len(x)  # both branches of the label are exercised
    assert torch.equal(is_unknown, rejected)
    assert torch.equal(label, torch.where(rejected, -1, expected.argmax(dim=1)))

    noise = {"noise": load_ood("noise", digits06.preprocessing)}
    collected = collect(model, digits06, noise)
    at_one = assess_logits(collected, digits06, EvalOptions(n_boot=5), temperature=1.0)
    plain = evaluate_logits(collected.test, digits06.test.y, collected.ood, k).as_dict()
    # T = 1 changes nothing; p(unknown) is reported beside the metrics
    assert {key: v for key, v in at_one.metrics.items() if key != "p_unknown"} == plain
    for name, values in (("id_val", collected.val), ("noise", collected.ood["noise"])):
        assert np.array_equal(at_one.scores[name], compute_score(values, k).double().numpy())
    assert at_one.threshold == calibrate_threshold(compute_score(collected.val, k).double(), 0.95)
    fit = at_one.temperature_fit
    assert fit is not None and (fit.fitted, fit.used, fit.refused) == (None, 1.0, None)


def test_refused_fits_record_fitted_used_and_reason() -> None:
    separable = choose_temperature("auto", 10.0 * torch.eye(6), torch.arange(6))
    assert separable.fitted is not None and separable.fitted < 0.06
    assert separable.used == 1.0 and "bound" in str(separable.refused)
    labels = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(0))
    logits = 6.0 * torch.nn.functional.one_hot(labels, 4).float()
    logits[0] = 0.0
    logits[0, (labels[0] + 1) % 4] = 0.001
    saturating = choose_temperature("auto", logits, labels)
    assert saturating.as_dict() == {"setting": "auto", "fitted": saturating.fitted, "used": 1.0,
                                    "refused": "saturates the softmax"}  # fmt: skip
    assert saturating.fitted is not None and 0.2 < saturating.fitted < 0.5
    over_logits, over_labels = _calibrated_logits()
    accepted = choose_temperature("auto", 5.0 * over_logits, over_labels)
    assert accepted.refused is None and accepted.used == accepted.fitted and accepted.used > 4
    given = choose_temperature(2.5, over_logits, over_labels)
    assert (given.fitted, given.used, given.refused) == (None, 2.5, None)


@pytest.fixture(scope="module")
def overconfident_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A briefly trained tiny model whose head is scaled by 5, compressed with auto T."""
    from moonprune.config import build_config
    from moonprune.demo import train_dense
    from moonprune.pipeline import compress

    splits = load_splits("digits:0-5", seed=0)
    torch.manual_seed(0)
    dense = train_dense(demo_cnn(num_classes=6), splits, epochs=1)
    with torch.no_grad():
        dense.classifier.weight.mul_(5.0)
        dense.classifier.bias.mul_(5.0)
    root = tmp_path_factory.mktemp("overconfident")
    torch.save(dense.state_dict(), root / "dense.pt")
    cfg = build_config({
        "checkpoint": str(root / "dense.pt"), "arch": "moonprune.models:demo_cnn",
        "arch_kwargs": {"num_classes": 6}, "data": "digits:0-5", "ood": ["noise"],
        "out": str(root / "run"), "train": {"epochs": 1, "lr": 0.001},
        "moon": {"warmup_epochs": 0}, "sparsity": {"method": "magnitude", "sparsity": 0.5},
    })  # fmt: skip
    return compress(cfg).out


def test_auto_temperature_reaches_checkpoint_and_onnx(overconfident_run: Path) -> None:
    import onnx
    from moonprune.exporters import run_onnx

    from moonprune.checkpoints import load_checkpoint

    report = json.loads((overconfident_run / "report.json").read_text())
    cal = report["calibration"]["dense"]
    assert cal["temperature"] > 1.5  # over-confident: softened
    assert cal["ece_after"] < cal["ece_before"] and cal["nll_after"] < cal["nll_before"]
    # fine-tuning (with BatchNorm statistics recomputed at the end) undoes most of that;
    # the compressed model's own fit is what ships
    assert report["calibration"]["compressed"]["temperature"] != 1.0
    t = report["calibration"]["compressed"]["temperature"]
    assert report["temperature"] == t
    ckpt = load_checkpoint(overconfident_run / "model.pt")
    assert ckpt.temperature == t
    graph = onnx.load(str(overconfident_run / "model.onnx"))
    metadata = {p.key: p.value for p in graph.metadata_props}
    assert float(metadata["moonprune.temperature"]) == t
    x = load_splits("digits:0-5", seed=0, preprocessing=ckpt.preprocessing).test.x[:32]
    with torch.no_grad():
        expected = torch.softmax(ckpt.model(x) / t, dim=1)[:, :6]
    out = run_onnx(overconfident_run / "model.onnx", x.numpy())
    assert np.abs(out["probabilities"] - expected.numpy()).max() < 1e-5


def test_verify_report_records_the_temperature_fit(overconfident_run: Path) -> None:
    from moonprune.verification import verify

    report = verify(overconfident_run / "model.pt", temperature="auto", n_boot=5).report
    fit = report.calibration["compressed"].temperature_fit
    assert fit is not None and fit["setting"] == "auto" and fit["refused"] is None
    assert fit["used"] == fit["fitted"] == report.temperature != 1.0
    assert report.calibration["compressed"].temperature == report.temperature
    kept = verify(overconfident_run / "model.pt", n_boot=5).report  # the checkpoint's T
    fit = kept.calibration["compressed"].temperature_fit
    assert fit is not None and fit["fitted"] is None and fit["refused"] is None
    assert fit["used"] == report.temperature


def test_compress_report_records_the_temperature_fit(overconfident_run: Path) -> None:
    report = json.loads((overconfident_run / "report.json").read_text())
    for name in ("dense", "compressed"):
        fit = report["calibration"][name]["temperature_fit"]
        assert fit["setting"] == "auto" and fit["refused"] is None
        assert fit["used"] == fit["fitted"] == report["calibration"][name]["temperature"]


def test_graph_confidence_uses_the_temperature(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = demo_cnn(num_classes=4, width=4).eval()
    x = torch.randn(16, 1, 8, 8)
    export_onnx(model, tmp_path / "t.onnx", num_known=3, input_shape=(1, 8, 8), threshold=0.5,
                temperature=2.5, example_inputs=x)  # fmt: skip
    out = run_onnx(tmp_path / "t.onnx", x.numpy())
    with torch.no_grad():
        logits = model(x)
    expected = torch.softmax(logits / 2.5, dim=1)[:, :3].amax(1).numpy()
    assert np.abs(out["confidence"] - expected).max() < 1e-5
    assert np.abs(out["logits"] - logits.numpy()).max() < 1e-4  # logits stay raw
