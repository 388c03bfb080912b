"""The ONNX contract, checked in a bare onnxruntime session; quantization; sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from moonprune.exporters import RejectingClassifier, export_onnx
from moonprune.exporters.checkpoint_export import export_checkpoint
from moonprune.exporters.onnx_export import gzip_size

from moonprune.checkpoints import load_checkpoint
from moonprune.data import load_ood, load_splits
from moonprune.errors import ExportError
from moonprune.models import demo_cnn


def _bare_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_contract_in_a_bare_onnxruntime_session(demo_run) -> None:
    path = demo_run.out / "model.onnx"
    ckpt = load_checkpoint(demo_run.out / "model.pt")
    splits = load_splits("digits:0-5", seed=0)
    session = _bare_session(path)
    assert [i.name for i in session.get_inputs()] == ["input"]
    expected = {
        "logits": ("tensor(float)", 7),
        "probabilities": ("tensor(float)", 6),
        "confidence": ("tensor(float)", None),
        "label": ("tensor(int64)", None),
        "is_unknown": ("tensor(bool)", None),
    }
    assert [o.name for o in session.get_outputs()] == list(expected)
    for o in session.get_outputs():
        assert o.type == expected[o.name][0]
    x = np.concatenate([splits.test.x.numpy(), load_ood("noise", ckpt.preprocessing).x.numpy()])
    for n in (1, 7, len(x)):
        out = dict(zip(expected, session.run(None, {"input": x[:n]}), strict=True))
        for name, (_, width) in expected.items():
            assert out[name].shape == ((n, width) if width else (n,)), name
    logits, probs, conf, label, unknown = session.run(None, {"input": x})
    wrapper = RejectingClassifier(ckpt.model, 6, ckpt.threshold or 0.0).eval()
    with torch.no_grad():
        ref = wrapper(torch.from_numpy(x))
    assert np.abs(ref[0].numpy() - logits).max() < 1e-4
    clear = np.abs(ref[2].numpy() - ckpt.threshold) > 1e-5  # exact ties may flip
    assert clear.mean() > 0.99
    assert np.array_equal(ref[3].numpy()[clear], label[clear])
    assert np.array_equal(label == -1, conf < ckpt.threshold)
    assert np.array_equal(unknown, conf < ckpt.threshold)
    assert np.array_equal(label[~unknown], probs[~unknown].argmax(1))
    meta = session.get_modelmeta().custom_metadata_map
    assert float(meta["moonprune.threshold"]) == pytest.approx(ckpt.threshold)
    assert json.loads(meta["moonprune.classes"]) == list(ckpt.classes)
    assert json.loads(meta["moonprune.preprocessing"])["height"] == 8
    assert meta["moonprune.score"] == "msp" and float(meta["moonprune.tpr"]) == 0.95
    assert abs(float(meta["moonprune.sparsity"]) - 0.9) < 0.005


def test_non_finite_rows_are_rejected_alone(demo_run) -> None:
    session = _bare_session(demo_run.out / "model.onnx")
    x = load_splits("digits:0-5", seed=0).test.x[:6].numpy().copy()
    clean = session.run(None, {"input": x})
    x[1, 0, 3, 3] = np.nan
    x[3, 0, 0, 0] = np.inf
    x[4, 0, 7, 7] = -np.inf
    logits, _, conf, label, unknown = session.run(None, {"input": x})
    assert unknown[[1, 3, 4]].all() and (label[[1, 3, 4]] == -1).all()
    for i in (0, 2, 5):
        assert np.allclose(logits[i], clean[0][i], atol=1e-6)
        assert label[i] == clean[3][i] and unknown[i] == clean[4][i]
    assert np.isfinite(conf[[0, 2, 5]]).all()


def test_sparse_file_gzips_far_smaller_than_dense(demo_run, tmp_path: Path) -> None:
    ckpt = load_checkpoint(demo_run.out / "model.pt")
    dense = demo_cnn(num_classes=6, in_channels=1)
    dense_path = tmp_path / "dense.onnx"
    export_onnx(dense, dense_path, num_known=6, input_shape=(1, 8, 8), threshold=0.5)
    ratio = gzip_size(demo_run.out / "model.onnx") / gzip_size(dense_path)
    assert ckpt.model is not None and ratio <= 0.25


def test_int8_export_is_small_and_keeps_the_acceptance(demo_run, tmp_path: Path) -> None:
    report = export_checkpoint(demo_run.out / "model.pt", tmp_path / "q.onnx", quantize="int8")
    assert report["size_ratio"] >= 3.5
    assert abs(report["metrics"]["id_val_accepted"] - 0.95) <= 0.02
    assert set(report["metrics"]["auroc"]) == {"digits:6-9", "noise"}
    assert report["metrics"]["accuracy"] >= report["float_metrics"]["accuracy"] - 0.02
    meta = _bare_session(tmp_path / "q.onnx").get_modelmeta().custom_metadata_map
    assert float(meta["moonprune.threshold"]) == pytest.approx(report["threshold"])


def test_baked_preprocessing_takes_raw_pixels(demo_run, tmp_path: Path) -> None:
    export_checkpoint(demo_run.out / "model.pt", tmp_path / "raw.onnx", bake_preprocessing=True)
    from sklearn.datasets import load_digits

    digits = load_digits()
    raw = digits.images[digits.target < 6][:50, None].astype(np.float32)  # 0..16 pixels
    pre = load_checkpoint(demo_run.out / "model.pt").preprocessing
    normalised = (raw * pre.scale - pre.mean[0]) / pre.std[0]
    a = _bare_session(tmp_path / "raw.onnx").run(None, {"input": raw})
    b = _bare_session(demo_run.out / "model.onnx").run(None, {"input": normalised})
    assert np.array_equal(a[3], b[3])
    assert np.abs(a[0] - b[0]).max() < 1e-4


def test_failed_parity_raises_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    import moonprune.exporters.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "parity", lambda *a: (1.0, False))
    with pytest.raises(ExportError, match="parity"):
        export_onnx(demo_cnn(num_classes=3, width=4), tmp_path / "m.onnx", num_known=3,
                    input_shape=(1, 8, 8), threshold=0.5)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_plain_k_way_model_exports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = demo_cnn(num_classes=4, width=4).eval()
    export_onnx(model, tmp_path / "plain.onnx", num_known=4, input_shape=(1, 8, 8), threshold=0.3)
    out = _bare_session(tmp_path / "plain.onnx").run(
        None, {"input": np.zeros((2, 1, 8, 8), np.float32)}
    )
    assert out[0].shape == (2, 4) and out[1].shape == (2, 4)
    assert np.allclose(out[1].sum(1), 1.0, atol=1e-5)


def test_sparse_storage_is_smaller_and_identical(demo_run, tmp_path: Path) -> None:
    report = export_checkpoint(demo_run.out / "model.pt", tmp_path / "s.onnx", sparse_storage=True)
    assert report["sparse_storage"]["sparse_initializers"]
    assert report["bytes"] < 0.5 * report["dense_storage_bytes"]
    x = load_splits("digits:0-5", seed=0).test.x.numpy()
    a = _bare_session(tmp_path / "s.onnx").run(None, {"input": x})
    b = _bare_session(demo_run.out / "model.onnx").run(None, {"input": x})
    assert np.array_equal(a[3], b[3]) and np.abs(a[0] - b[0]).max() < 1e-5
