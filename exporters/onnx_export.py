"""Export a classifier with its rejector to one ONNX file, checked and parity-tested.

The file is written to a temporary name in the target directory, checked with
``onnx.checker``, compared with PyTorch in onnxruntime, given its metadata, and only
then moved into place: a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moonprune.exporters.feature_rejector import mark_score_nodes_, score_metadata
from moonprune.exporters.opsets import EXPORTER_OPSET, check_opset, convert_opset, written_opset
from moonprune.exporters.rejector import RejectingClassifier, hostile_rows
from torch import nn

from moonprune.errors import ExportError
from moonprune.heads import find_classifier
from moonprune.outputs import atomic_path
from moonprune.reliability.features import FeatureStats
from moonprune.reliability.scores import is_feature_score

OUTPUT_NAMES = ("logits", "probabilities", "confidence", "label", "is_unknown")
DEFAULT_OPSET = 18
LOGIT_TOLERANCE = 1e-4
BORDERLINE = 1e-5


@dataclass(frozen=True)
class ExportReport:
    """What was written and how well it agrees with PyTorch."""

    path: str
    bytes: int
    gzip_bytes: int
    parity_max_abs_diff: float
    labels_agree: bool
    opset: int
    export_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def gzip_size(path: Path) -> int:
    """Bytes of ``path`` after gzip -9 (what a download would cost)."""
    return len(gzip.compress(path.read_bytes(), compresslevel=9))


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The dynamo exporter logs progress and deprecation noise; keep the CLI clean."""
    names = ["torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("moonprune")
    except Exception:
        from moonprune import __version__

        return __version__


def metadata(
    *, threshold: float, tpr: float, score: str, classes: list[str], preprocessing: dict[str, Any],
    sparsity: float, temperature: float, extra: dict[str, str] | None = None,
) -> dict[str, str]:  # fmt: skip
    """The ``moonprune.*`` metadata_props of the DESIGN.md contract."""
    props = {
        "moonprune.threshold": repr(float(threshold)),
        "moonprune.tpr": repr(float(tpr)),
        "moonprune.score": score,
        "moonprune.classes": json.dumps(list(classes)),
        "moonprune.preprocessing": json.dumps(preprocessing),
        "moonprune.sparsity": repr(float(sparsity)),
        "moonprune.version": _version(),
        "moonprune.temperature": repr(float(temperature)),
    }
    props.update(extra or {})
    return props


def set_metadata(model: Any, props: dict[str, str]) -> None:
    """Replace ``model.metadata_props`` entries named in ``props`` (an onnx ModelProto)."""
    keep = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def strip_debug_info(model: Any) -> None:
    """Drop what a device never reads: the exporter's annotations on nodes (stack traces
    with local paths, FX names), on graph inputs, outputs and initializers, and on the
    graph itself (the ExportedProgram signature, about 13 KB for a ResNet-20: 4% of its
    int8 file), and intermediate shape annotations (onnxruntime infers them). The
    model-level ``moonprune.*`` metadata_props are a different field and stay."""
    graph = model.graph
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in [*graph.input, *graph.output, *graph.initializer]:
        del value.metadata_props[:]
    del graph.metadata_props[:]
    del graph.value_info[:]
    graph.doc_string = ""


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


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    num_known: int,
    input_shape: tuple[int, int, int],
    threshold: float,
    tpr: float = 0.95,
    score: str = "msp",
    classes: list[str] | None = None,
    preprocessing: dict[str, Any] | None = None,
    sparsity: float = 0.0,
    temperature: float = 1.0,
    opset: int | None = None,
    example_inputs: torch.Tensor | None = None,
    bake_preprocessing: bool = False,
    extra_metadata: dict[str, str] | None = None,
    feature_stats: FeatureStats | None = None,
) -> ExportReport:
    """Write ``model`` + rejector to ``path`` (see the module docstring); return the report.

    ``example_inputs`` (normalised model inputs) drive the parity check; rows holding
    NaN, +-inf and 3e38 are added to them (:func:`hostile_rows`), which the file must
    reject. With ``bake_preprocessing`` the graph takes raw pixels and ``preprocessing``
    (``scale``, ``mean``, ``std``) is applied inside it. A feature ``score``
    (``mahalanobis``, ``knn``) reads the classifier's input and needs ``feature_stats``.

    Example::

        >>> import moonprune
        >>> model = moonprune.models.demo_cnn(num_classes=3, width=4)
        >>> report = moonprune.export_onnx(model, "m.onnx", num_known=3, input_shape=(1, 8, 8),
        ...                                threshold=0.5)
        >>> report.labels_agree, report.parity_max_abs_diff < 1e-4
        (True, True)
    """
    import onnx

    start = time.perf_counter()
    path = Path(path)
    opset = opset or DEFAULT_OPSET
    check_opset(opset)
    preprocessing = preprocessing or {}
    normalization = None
    if bake_preprocessing:
        if not preprocessing:
            raise ExportError(
                "--bake-preprocessing needs the model's preprocessing (scale, mean, std)"
            )
        normalization = (preprocessing["scale"], preprocessing["mean"], preprocessing["std"])
    device_model = model.cpu().eval()
    x = _parity_inputs(example_inputs, input_shape, preprocessing if bake_preprocessing else None)
    layer = None
    if is_feature_score(score):
        layer = find_classifier(device_model, torch.zeros(2, *input_shape))
    wrapper = RejectingClassifier(
        device_model, num_known, threshold, score, temperature, normalization,
        feature_stats, layer,
    ).eval()  # fmt: skip
    try:
        with atomic_path(path) as tmp:
            with quiet_exporter():
                torch.onnx.export(
                    wrapper,
                    (x[:2],),
                    str(tmp),
                    input_names=["input"],
                    output_names=list(OUTPUT_NAMES),
                    dynamic_shapes=({0: torch.export.Dim("N")},),
                    opset_version=max(opset, EXPORTER_OPSET),
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                )
            proto = convert_opset(onnx.load(str(tmp)), opset)
            mark_score_nodes_(proto)
            strip_debug_info(proto)
            set_metadata(proto, metadata(
                threshold=threshold, tpr=tpr, score=score, classes=list(classes or []),
                preprocessing={**preprocessing, "baked": bake_preprocessing}, sparsity=sparsity,
                temperature=temperature,
                extra={**score_metadata(score, feature_stats), **(extra_metadata or {})},
            ))  # fmt: skip
            onnx.checker.check_model(proto)
            onnx.save(proto, str(tmp))
            diff, agree = parity(wrapper, tmp, x)
            if not agree or not diff <= LOGIT_TOLERANCE:
                raise ExportError(
                    f"ONNX parity check failed: max |logit diff| {diff:.2e} (limit "
                    f"{LOGIT_TOLERANCE:.0e}), labels agree: {agree}; the model may use an "
                    "operator the exporter translates differently; try another --opset"
                )
    except ExportError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX export failed: {first}") from exc
    return ExportReport(
        path=str(path),
        bytes=path.stat().st_size,
        gzip_bytes=gzip_size(path),
        parity_max_abs_diff=diff,
        labels_agree=agree,
        opset=written_opset(onnx.load(str(path))),
        export_seconds=time.perf_counter() - start,
    )


def _parity_inputs(
    example: torch.Tensor | None, input_shape: tuple[int, int, int], raw: dict[str, Any] | None
) -> torch.Tensor:
    if example is None:
        example = torch.randn(16, *input_shape, generator=torch.Generator().manual_seed(0))
    x = example.detach().cpu().float()[:64]
    if raw is not None:  # the graph takes raw pixels: undo the normalisation
        mean = torch.tensor(raw["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(raw["std"]).view(1, -1, 1, 1)
        x = (x * std + mean) / raw["scale"]
    return x
