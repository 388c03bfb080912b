"""Issue 14, the exporter side: hostile rows in every export variant, inputs never
overwritten, thresholds checked against the graph, bench on foreign files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from moonprune.exporters.checkpoint_export import export_checkpoint

from moonprune.data import load_splits

#: One hostile value per row (NaN, +-inf, a finite value whose square overflows
#: float32), then a row that is 3e38 everywhere.
HOSTILE = (np.nan, np.inf, -np.inf, 3e38, -3e38)


def hostile_rows(clean: np.ndarray) -> np.ndarray:
    rows = np.repeat(clean[:1], len(HOSTILE) + 1, axis=0)
    for i, value in enumerate(HOSTILE):
        rows[i].reshape(-1)[i * 7 % rows[i].size] = value
    rows[-1] = 3e38
    return rows


@pytest.fixture(scope="module")
def int8_file(demo_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("int8") / "q.onnx"
    export_checkpoint(demo_run.out / "model.pt", path, quantize="int8")
    return path


@pytest.mark.parametrize("variant", ["float", "int8"])
def test_hostile_rows_are_rejected_in_a_bare_session(demo_run, int8_file, variant) -> None:
    path = int8_file if variant == "int8" else demo_run.out / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    clean = load_splits("digits:0-5", seed=0).test.x[:8].numpy()
    x = np.concatenate([clean, hostile_rows(clean)])
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, {"input": x}), strict=True))
    bad = slice(len(clean), None)
    assert (out["label"][bad] == -1).all(), out["label"][bad]
    assert out["is_unknown"][bad].all()
    assert (out["label"][: len(clean)] >= 0).sum() >= 6  # the clean rows still classified


def test_int8_self_check_refuses_a_file_that_accepts_nan(tmp_path: Path, monkeypatch) -> None:
    """Without the rewiring, the quantized finiteness test sees a clipped copy of the
    input: the exporter's own check must catch that and write nothing."""
    import torch
    from moonprune.exporters import export_onnx, quantize

    from moonprune.errors import ExportError
    from moonprune.models import demo_cnn

    torch.manual_seed(0)
    export_onnx(demo_cnn(num_classes=3, width=4), tmp_path / "f.onnx", num_known=3,
                input_shape=(1, 8, 8), threshold=0.0)  # fmt: skip
    calibration = np.random.default_rng(0).standard_normal((32, 1, 8, 8)).astype(np.float32)
    monkeypatch.setattr(quantize, "raw_input_for_float_readers_", lambda model: None)
    with pytest.raises(ExportError, match="accepts input rows holding NaN"):
        quantize.quantize_int8(tmp_path / "f.onnx", tmp_path / "q.onnx", calibration)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.onnx"]


def test_rejector_never_accepts_a_nan_confidence() -> None:
    import torch
    from moonprune.exporters import RejectingClassifier

    class NaNLogits(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((len(x), 3), float("nan"))

    rejector = RejectingClassifier(NaNLogits(), num_known=3, threshold=0.5).eval()
    *_, label, unknown = rejector(torch.zeros(2, 1, 8, 8))
    assert unknown.all() and (label == -1).all()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"threshold": float("nan")}, "threshold"), ({"threshold": float("inf")}, "threshold"),
     ({"threshold": 0.5, "temperature": float("nan")}, "temperature"),
     ({"threshold": 0.5, "temperature": 0.0}, "temperature")],
)  # fmt: skip
def test_rejector_refuses_non_finite_settings(kwargs: dict, needle: str) -> None:
    from moonprune.exporters import RejectingClassifier

    from moonprune.errors import ConfigError
    from moonprune.models import demo_cnn

    with pytest.raises(ConfigError, match=needle):
        RejectingClassifier(demo_cnn(num_classes=3, width=4), num_known=3, **kwargs)


def test_a_network_of_your_own_exports_with_arch(own_factory_run: Path) -> None:
    """export reads the checkpoint like inspect and verify: a recorded factory that is
    not a moonprune built-in needs --arch, which export offers."""
    from moonprune.cli.app import app
    from typer.testing import CliRunner

    runner = CliRunner()
    refused = runner.invoke(app, ["export", "run/model.pt", "--out", "m.onnx"])
    assert refused.exit_code == 2 and "--arch mynets:net" in refused.output
    result = runner.invoke(app, ["export", "run/model.pt", "--out", "m.onnx", "--arch",
                                 "mynets:net"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert Path("m.onnx").is_file()
