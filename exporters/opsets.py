"""Write the ONNX opset that was asked for, or say why not.

The dynamo exporter writes opset 18 and above itself; asked for less it falls back to
a version conversion that fails on our graphs and then silently keeps 18. So a lower
opset is reached here: export at 18, then ``onnx.version_converter``, then the
clean-up its adapters miss (below), and the caller runs ``onnx.checker`` and the
onnxruntime parity check on the result like on any export.

The range is what this exporter, the ONNX converter and onnxruntime handle for the
operators a classifier + rejector uses: below 15 the converter has no adapter for
``Shape`` (opset 15 added its start/end attributes); above 25 onnxruntime cannot
load the file.
"""

from __future__ import annotations

from typing import Any

from moonprune.errors import ExportError

EXPORTER_OPSET = 18  # the lowest opset torch's dynamo exporter writes natively
MIN_OPSET = 15
MAX_OPSET = 25


def check_opset(opset: int) -> None:
    """Raise :class:`ExportError` naming the supported range if ``opset`` is outside it."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"--opset {opset} is not supported; use an opset from {MIN_OPSET} to {MAX_OPSET}"
        )


def written_opset(model: Any) -> int:
    """The default-domain opset an onnx ModelProto declares (0 if none)."""
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def convert_opset(model: Any, opset: int) -> Any:
    """``model`` (an onnx ModelProto) converted down to ``opset``.

    The converter turns the reductions' ``axes`` input back into an attribute but
    leaves the opset-18 ``noop_with_empty_axes`` attribute on ReduceMean/ReduceMax,
    which the older schemas reject. With a non-empty ``axes`` (or the default 0) that
    flag changes nothing, so it is dropped; any other attribute the target schema
    does not know is an error rather than a guess.
    """
    from onnx import defs, helper, version_converter

    if written_opset(model) == opset:
        return model
    try:
        converted = version_converter.convert_version(model, opset)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"cannot convert the graph to opset {opset} ({first}); use an opset from "
            f"{MIN_OPSET} to {MAX_OPSET}"
        ) from None
    for node in converted.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        known = defs.get_schema(node.op_type, opset, node.domain).attributes
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        for name, value in attrs.items():
            if name in known:
                continue
            if name == "noop_with_empty_axes" and (value == 0 or attrs.get("axes")):
                node.attribute.remove(next(a for a in node.attribute if a.name == name))
                continue
            raise ExportError(
                f"opset {opset}: {node.op_type} has attribute {name!r} that opset {opset} "
                f"lacks; use an opset from {MIN_OPSET} to {MAX_OPSET}"
            )
    return converted
