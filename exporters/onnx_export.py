"""Export a classifier with its rejector to one ONNX file, checked and parity-tested.

The file is written to a temporary name in the target directory, checked with
``onnx.checker``, compared with PyTorch in onnxruntime, given its metadata, and only
then moved into place: a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from moonprune.exporters.feature_rejector import mark_score_nodes_, score_metadata
from moonprune.exporters.onnx_checks import BORDERLINE as BORDERLINE
from moonprune.exporters.onnx_checks import LOGIT_TOLERANCE, parity
from moonprune.exporters.onnx_checks import check_hostile_rows as check_hostile_rows
from moonprune.exporters.onnx_checks import check_rejects_hostile_rows as check_rejects_hostile_rows
from moonprune.exporters.onnx_checks import run_onnx as run_onnx
from moonprune.exporters.onnx_metadata import metadata, set_metadata, strip_debug_info
from moonprune.exporters.opsets import EXPORTER_OPSET, check_opset, convert_opset, written_opset
from moonprune.exporters.rejector import RejectingClassifier
from torch import nn

from moonprune.errors import ExportError
from moonprune.heads import find_classifier
from moonprune.outputs import atomic_path
from moonprune.reliability.features import FeatureStats
from moonprune.reliability.scores import is_feature_score
from moonprune.report_parts import ExportReport as ExportReport

OUTPUT_NAMES = ("logits", "probabilities", "confidence", "label", "is_unknown")
DEFAULT_OPSET = 18


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
    if bake_preprocessing and not preprocessing:
        raise ExportError("--bake-preprocessing needs the model's preprocessing (scale, mean, std)")
    baked = preprocessing if bake_preprocessing else None  # the graph takes raw pixels
    model = model.cpu().eval()
    x = _parity_inputs(example_inputs, input_shape, baked)
    wrapper = _rejecting_classifier(model, num_known, input_shape, threshold, score,
                                    temperature, baked, feature_stats)  # fmt: skip
    try:
        with atomic_path(path) as tmp:
            props = metadata(
                threshold=threshold, tpr=tpr, score=score, classes=list(classes or []),
                preprocessing={**preprocessing, "baked": bake_preprocessing}, sparsity=sparsity,
                temperature=temperature,
                extra={**score_metadata(score, feature_stats), **(extra_metadata or {})},
            )  # fmt: skip
            _write_checked_onnx(wrapper, tmp, x[:2], opset, props)
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


def _rejecting_classifier(
    model: nn.Module, num_known: int, input_shape: tuple[int, int, int], threshold: float,
    score: str, temperature: float, baked: dict[str, Any] | None,
    feature_stats: FeatureStats | None,
) -> RejectingClassifier:  # fmt: skip
    """``model`` (on the CPU, in eval mode) wrapped with its rejector; ``baked`` (the
    preprocessing, when the graph takes raw pixels) is applied inside it, and a feature
    score reads the input of the classifier layer found here."""
    normalization = None if baked is None else (baked["scale"], baked["mean"], baked["std"])
    layer = None
    if is_feature_score(score):
        layer = find_classifier(model, torch.zeros(2, *input_shape))
    return RejectingClassifier(
        model, num_known, threshold, score, temperature, normalization, feature_stats, layer
    ).eval()


def _write_checked_onnx(
    wrapper: RejectingClassifier, path: Path, example: torch.Tensor, opset: int,
    props: dict[str, str],
) -> None:  # fmt: skip
    """Export ``wrapper`` (traced on ``example``, batch dimension dynamic) to ``path`` at
    ``opset``: score nodes marked, debug annotations stripped, ``props`` as metadata,
    passed by ``onnx.checker``."""
    import onnx

    with quiet_exporter():
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            input_names=["input"],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({0: torch.export.Dim("N")},),
            opset_version=max(opset, EXPORTER_OPSET),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    proto = convert_opset(onnx.load(str(path)), opset)
    mark_score_nodes_(proto)
    strip_debug_info(proto)
    set_metadata(proto, props)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


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
