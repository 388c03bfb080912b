"""Temperature scaling: fitted on validation data, carried into the exported graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from moonprune.exporters import RejectingClassifier, export_onnx, run_onnx

from moonprune.calibration import fit_temperature, resolve_temperature, saturated_fraction
from moonprune.errors import ConfigError
from moonprune.models import demo_cnn
from moonprune.reliability import expected_calibration_error


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
    assert resolve_temperature("auto", logits, labels) == 1.0


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
    assert resolve_temperature("auto", logits, labels) == 1.0


def test_explicit_values_are_validated() -> None:
    logits, labels = _calibrated_logits(n=10)
    assert resolve_temperature(2.5, logits, labels) == 2.5
    with pytest.raises(ConfigError):
        resolve_temperature(-1.0, logits, labels)


def test_t_equal_one_leaves_every_output_unchanged() -> None:
    torch.manual_seed(0)
    model = demo_cnn(num_classes=4, width=4).eval()
    x = torch.randn(9, 1, 8, 8)
    plain = RejectingClassifier(model, 3, threshold=0.4).eval()
    with_t = RejectingClassifier(model, 3, threshold=0.4, temperature=1.0).eval()
    for a, b in zip(plain(x), with_t(x), strict=True):
        assert torch.equal(a, b)


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
