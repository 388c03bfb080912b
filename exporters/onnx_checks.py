"""The checks every export passes before its file is moved into place: onnxruntime runs
it, rows holding NaN, inf or 3e38 are rejected, and its logits and labels agree with
PyTorch's (:func:`parity`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from moonprune.exporters.rejector import RejectingClassifier, hostile_rows

from moonprune.errors import ExportError

#: largest |logit difference| between PyTorch and onnxruntime an export may show
LOGIT_TOLERANCE = 1e-4
#: rows whose confidence lies this close to the threshold are left out of the label check
BORDERLINE = 1e-5


def run_onnx(path: str | Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """All outputs of the model at ``path`` on ``x`` (float32 NCHW), with onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"input": np.ascontiguousarray(x, dtype=np.float32)})
    return {o.name: v for o, v in zip(session.get_outputs(), outputs, strict=True)}


def check_rejects_hostile_rows(got: dict[str, np.ndarray], n_hostile: int, path: Path) -> None:
    """Raise :class:`ExportError` unless the last ``n_hostile`` rows of ``got`` (the
    outputs of ``path``) are all rejected: label -1 and is_unknown true."""
    label, unknown = got["label"][-n_hostile:], got["is_unknown"][-n_hostile:]
    if not ((label == -1).all() and unknown.all()):
        raise ExportError(
            f"{path.name} accepts input rows holding NaN, inf or 3e38 (labels "
            f"{label.tolist()}); nothing was written; this is a moonprune bug, please report it"
        )


def check_hostile_rows(path: Path, clean: np.ndarray) -> None:
    """Run ``path`` in onnxruntime on ``clean`` rows plus :func:`hostile_rows`; raise
    :class:`ExportError` unless every hostile row is rejected."""
    hostile = hostile_rows(clean)
    got = run_onnx(path, np.concatenate([np.asarray(clean, np.float32), hostile]))
    check_rejects_hostile_rows(got, len(hostile), path)


def parity(wrapper: RejectingClassifier, path: Path, x: torch.Tensor) -> tuple[float, bool]:
    """Max |logit difference| and whether labels and rejections agree, torch vs ORT.

    ``x`` (finite rows) is followed by :func:`hostile_rows`, which both must reject
    (:class:`ExportError` otherwise). Rows whose confidence lies within ``BORDERLINE``
    of the threshold are left out of the label comparison: the threshold is itself an
    ID validation score, so that row sits exactly on the boundary, and a 1e-6
    difference between two correct float32 implementations may put it on either side.
    """
    hostile = hostile_rows(x.cpu().numpy())
    full = np.concatenate([x.cpu().numpy(), hostile])
    with torch.no_grad():
        ref = [t.cpu().numpy() for t in wrapper(torch.from_numpy(full))]
    got = run_onnx(path, full)
    check_rejects_hostile_rows(got, len(hostile), path)
    n = len(x)
    diff = float(np.abs(ref[0][:n] - got["logits"][:n]).max()) if n else 0.0
    clear = np.abs(ref[2] - float(wrapper.threshold)) > BORDERLINE  # NaN: left out
    agree = bool(
        np.array_equal(ref[3][clear], got["label"][clear])
        and np.array_equal(ref[4][clear], got["is_unknown"][clear])
        and (ref[3][n:] == -1).all()
    )
    return diff, agree
