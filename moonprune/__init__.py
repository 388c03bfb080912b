"""moonprune: sparse models that still know when they do not know (MOON), shipped as ONNX.

The public API is what ``__all__`` lists; every other module is internal and may
change. A researcher's loop needs four pieces::

    >>> import torch, moonprune
    >>> model = moonprune.models.demo_cnn(num_classes=3, width=4)
    >>> layer = moonprune.add_unknown_output_(model, torch.randn(2, 1, 8, 8))
    >>> masker = moonprune.MASKERS.create("rigl", moonprune.MaskerConfig(sparsity=0.9))
    >>> schedule = moonprune.MoonSchedule(moonprune.MoonScheduleConfig(total_epochs=10))
    >>> averaging = moonprune.WeightAveraging(start_epoch=8)

and ``moonprune.assess`` / ``moonprune.export_onnx`` at the end (see
``examples/foreign_loop.py``). ``moonprune.compress`` runs the whole pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moonprune import models
from moonprune.assessment import Assessment, assess
from moonprune.averaging import WeightAveraging
from moonprune.calibration import fit_temperature
from moonprune.checkpoints import ArchSpec, load_checkpoint, load_dense, save_checkpoint
from moonprune.config import (
    CompressConfig,
    Gates,
    MoonConfig,
    SparsityConfig,
    TrainConfig,
    build_config,
)
from moonprune.data import load_ood, load_splits
from moonprune.heads import add_unknown_output_, find_classifier
from moonprune.objectives import (
    MoonSchedule,
    MoonScheduleConfig,
    threshold_statistic,
    unknown_aware_loss,
)
from moonprune.pipeline import compress
from moonprune.reliability import SCORES
from moonprune.reliability.options import EvalOptions
from moonprune.sparsity import MASKERS, Masker, MaskerConfig, TopologySchedule
from moonprune.training import Trainer, train
from moonprune.verification import verify
from moonprune.version import __version__ as __version__

if TYPE_CHECKING:  # the exporters stay unimported until used (they import onnx)
    from moonprune.exporters import RejectingClassifier as RejectingClassifier
    from moonprune.exporters import export_onnx as export_onnx

#: Names served by :func:`__getattr__` from ``moonprune.exporters`` on first use, so
#: ``import moonprune`` loads neither the exporters nor the CLI (documented in
#: :mod:`moonprune.exporters`; not in ``__all__``, which the docs build resolves eagerly).
_LAZY = {"RejectingClassifier": "moonprune.exporters", "export_onnx": "moonprune.exporters"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moonprune' has no attribute {name!r}")


__all__ = [
    "MASKERS",
    "SCORES",
    "ArchSpec",
    "Assessment",
    "CompressConfig",
    "EvalOptions",
    "Gates",
    "Masker",
    "MaskerConfig",
    "MoonConfig",
    "MoonSchedule",
    "MoonScheduleConfig",
    "SparsityConfig",
    "TopologySchedule",
    "TrainConfig",
    "Trainer",
    "WeightAveraging",
    "__version__",
    "add_unknown_output_",
    "assess",
    "build_config",
    "compress",
    "find_classifier",
    "fit_temperature",
    "load_checkpoint",
    "load_dense",
    "load_ood",
    "load_splits",
    "models",
    "save_checkpoint",
    "threshold_statistic",
    "train",
    "unknown_aware_loss",
    "verify",
]
