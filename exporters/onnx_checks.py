"""The checks every export passes before its file is moved into place: onnxruntime runs
it, rows holding NaN, inf or 3e38 are rejected, and its logits and labels agree with
PyTorch's (:func:`parity`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from moonprune.exporters.rejector import RejectingClassifier, hostile_rows

from moonprune.errors import ExportError
from moonprune.streaming import Images, batch_rows

#: largest |logit difference| between PyTorch and onnxruntime an export may show
LOGIT_TOLERANCE = 1e-4
#: rows whose confidence lies this close to the threshold are left out of the label check
BORDERLINE = 1e-5


#: Rows per onnxruntime call on small images (a data set of digits or MNIST runs in one
#: call); large images get fewer (:func:`moonprune.streaming.batch_rows`).
RUN_ROWS = 4096


class InputBatches:
    """Model input for an exported graph, read batch by batch (re-iterable): the rows of
    ``x`` (a tensor or a lazily read set), as float32 arrays passed through ``transform``
    (e.g. undoing the normalisation for a graph that takes raw pixels)."""

    def __init__(self, x: Images, transform: Callable[[np.ndarray], np.ndarray] | None = None):
        self.x = x
        self.transform = transform

    def __len__(self) -> int:
        return len(self.x)

    def __iter__(self) -> Iterator[np.ndarray]:
        for batch in self.x.split(batch_rows(self.x.shape, RUN_ROWS)):
            array = batch.numpy()
            yield array if self.transform is None else self.transform(array)

    def head(self, n: int) -> np.ndarray:
        """The first ``n`` rows as one array."""
        array = self.x[:n].numpy()
        return array if self.transform is None else self.transform(array)


def run_onnx(path: str | Path, x: np.ndarray | InputBatches) -> dict[str, np.ndarray]:
    """All outputs of the model at ``path`` on ``x`` (float32 NCHW rows), with
    onnxruntime, at most :func:`~moonprune.streaming.batch_rows` rows per call."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if isinstance(x, np.ndarray):
        rows = batch_rows(x.shape, RUN_ROWS)
        batches: Iterable[np.ndarray] = [x[s : s + rows] for s in range(0, len(x), rows)] or [x]
    else:
        batches = x
    parts = [
        session.run(None, {"input": np.ascontiguousarray(b, dtype=np.float32)}) for b in batches
    ]
    names = [o.name for o in session.get_outputs()]
    return {name: np.concatenate([p[i] for p in parts]) for i, name in enumerate(names)}


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
