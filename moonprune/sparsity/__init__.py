"""Sparse-training methods behind one base class and a registry.

>>> from moonprune.sparsity import MASKERS, MaskerConfig
>>> [n for n in MASKERS.names() if MASKERS.origin(n) == "moonprune"]
['gmp', 'magnitude', 'rigl', 'set', 'torch-ao']
>>> masker = MASKERS.create("rigl", MaskerConfig(sparsity=0.9))
"""

from __future__ import annotations

from moonprune.sparsity.base import Masker, MaskerConfig, TopologySchedule
from moonprune.sparsity.distributions import keep_counts, layer_densities
from moonprune.sparsity.maskers import (
    GradualMagnitudeMasker,
    MagnitudeMasker,
    RigLMasker,
    SETMasker,
)
from moonprune.sparsity.method_info import MethodInfo
from moonprune.sparsity.methods import MethodRegistry
from moonprune.sparsity.registry import ENTRY_POINT_GROUP, MaskerRegistry
from moonprune.sparsity.torch_ao import TorchAOMasker

MASKERS = MaskerRegistry(entry_point_group=ENTRY_POINT_GROUP)
for _cls in (MagnitudeMasker, GradualMagnitudeMasker, SETMasker, RigLMasker, TorchAOMasker):
    MASKERS.register(_cls)
#: Every pruning method: the maskers above (and plug-ins) and channel pruning.
METHODS = MethodRegistry(MASKERS)


def create_masker(name: str, config: MaskerConfig) -> Masker:
    """``MASKERS.create(name, config)``."""
    return MASKERS.create(name, config)


__all__ = [
    "MASKERS",
    "METHODS",
    "GradualMagnitudeMasker",
    "MagnitudeMasker",
    "Masker",
    "MaskerConfig",
    "MaskerRegistry",
    "MethodInfo",
    "MethodRegistry",
    "RigLMasker",
    "SETMasker",
    "TopologySchedule",
    "TorchAOMasker",
    "create_masker",
    "keep_counts",
    "layer_densities",
]
