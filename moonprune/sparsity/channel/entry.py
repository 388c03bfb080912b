"""``channel``'s entry in the method registry (:data:`moonprune.sparsity.METHODS`):
what it is, when it steps (between fine-tuning stages) and the options it takes. Light:
importing it loads neither Torch-Pruning nor the training loop."""

from __future__ import annotations

from moonprune.sparsity.config import STRUCTURED_OPTIONS
from moonprune.sparsity.method_info import MethodInfo

CHANNEL_METHOD = MethodInfo(
    "channel",
    "structured: removes whole channels; widths chosen by timing candidate networks in "
    "onnxruntime (--speedup X, default auto: faster at batch 1 and --latency-batch)",
    "moonprune",
    structured=True,
    options=tuple(STRUCTURED_OPTIONS["channel"]),
)
