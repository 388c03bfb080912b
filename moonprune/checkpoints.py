"""The dense model a user brings, and moonprune's own checkpoint.

Reading files safely (``weights_only=True`` unless trusted; nested state_dicts,
wrapper prefixes, ``.safetensors``) is :mod:`moonprune.weights`; this module builds
the network from an :class:`ArchSpec` and loads them into it.

A moonprune checkpoint is a plain dict of tensors and JSON-like values (so it too
loads with ``weights_only=True``): the architecture spec (factory + kwargs), the
weights, the masks, the class names, the preprocessing, the head surgery, the
threshold, the resolved config, the metrics and the moonprune version. Loading it
rebuilds the network from the factory, replays the head surgery, loads the weights.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moonprune.data import Preprocessing
from moonprune.errors import CheckpointError
from moonprune.heads import add_unknown_output_
from moonprune.outputs import atomic_path
from moonprune.reliability.features import FeatureStats
from moonprune.trust import check_fields, recorded_arch
from moonprune.weights import (
    NESTED_KEYS,
    check_finite,
    find_state_dict,
    load_safetensors,
    load_weights_,
    torch_load,
)

FORMAT = "moonprune-checkpoint"
FORMAT_VERSION = 1


def _version() -> str:
    from moonprune import __version__

    return __version__


@dataclass(frozen=True)
class ArchSpec:
    """How to build the network: ``package.module:factory`` or ``path/file.py:factory``.

    Example::

        >>> spec = ArchSpec("moonprune.models:demo_cnn", {"num_classes": 3, "width": 4})
        >>> spec.build().classifier.out_features
        3
    """

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def resolve(self) -> Callable[..., nn.Module]:
        """Import the factory; the error names what was tried."""
        target, sep, attr = self.factory.rpartition(":")
        if not sep or not target or not attr:
            raise CheckpointError(
                f"--arch {self.factory!r} is not of the form package.module:factory "
                "or path/to/file.py:factory"
            )
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise CheckpointError(f"--arch file {target!r} does not exist")
            spec = importlib.util.spec_from_file_location(f"_moonprune_arch_{path.stem}", path)
            if spec is None or spec.loader is None:
                raise CheckpointError(f"cannot import {target!r} as a Python file")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                raise CheckpointError(f"importing {target!r} failed: {exc}") from None
        else:
            try:
                module = importlib.import_module(target)
            except ImportError as exc:
                raise CheckpointError(
                    f"cannot import module {target!r} for --arch {self.factory!r} ({exc}); "
                    "install the package or give a path: path/to/file.py:factory"
                ) from None
        try:
            fn = getattr(module, attr)
        except AttributeError:
            raise CheckpointError(f"module {target!r} has no attribute {attr!r}") from None
        if not callable(fn):
            raise CheckpointError(f"{self.factory!r} is not callable")
        return fn

    def build(self) -> nn.Module:
        """Call the factory with ``kwargs``; it must return an ``nn.Module``."""
        try:
            model = self.resolve()(**self.kwargs)
        except TypeError as exc:
            raise CheckpointError(
                f"calling {self.factory} with {self.kwargs} failed: {exc}; "
                "fix the keyword arguments (--arch-kwargs or the recipe's arch_kwargs)"
            ) from None
        except CheckpointError:
            raise
        except Exception as exc:  # the user's factory: any failure is a bad argument
            reason = str(exc).splitlines()[0] if str(exc) else ""
            raise CheckpointError(
                f"{self.factory}({_kwargs_text(self.kwargs)}) raised {type(exc).__name__}"
                f"{': ' + reason if reason else ''}; fix the keyword arguments "
                "(--arch-kwargs or the recipe's arch_kwargs) or the factory"
            ) from None
        if not isinstance(model, nn.Module):
            raise CheckpointError(f"{self.factory} returned {type(model).__name__}, not nn.Module")
        return model

    def with_defaults(self, **defaults: Any) -> ArchSpec:
        """Fill keyword arguments the factory accepts but the user did not give (e.g.
        ``num_classes`` and ``in_channels`` from the data), so common factories need
        no recipe at all."""
        try:
            params = inspect.signature(self.resolve()).parameters
        except (TypeError, ValueError):
            return self
        extra = {k: v for k, v in defaults.items() if k in params and k not in self.kwargs}
        return ArchSpec(self.factory, {**self.kwargs, **extra}) if extra else self

    def as_dict(self) -> dict[str, Any]:
        return {"factory": self.factory, "kwargs": dict(self.kwargs)}


def _kwargs_text(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


@dataclass
class DenseModel:
    """The model a user brings; ``arch`` is None for a trusted pickled module.

    Starting from a moonprune checkpoint (e.g. a channel-pruned one, to sparsify it
    further), ``head_layer`` names its unknown output, ``structure`` its shapes and
    ``preprocessing`` the inputs it was fine-tuned on (kept by the next run).
    """

    model: nn.Module
    arch: ArchSpec | None
    head_layer: str | None = None
    structure: dict[str, dict[str, int]] | None = None
    preprocessing: Preprocessing | None = None


def load_dense(
    path: str | Path,
    arch: ArchSpec | None = None,
    trust: bool = False,
    example_input: torch.Tensor | None = None,
) -> DenseModel:
    """Load a state_dict (+ ``arch``), a nested state_dict, a moonprune checkpoint,
    ``.safetensors`` (+ ``arch``), or with ``trust`` a whole pickled module.

    A pickled module given with ``arch`` is checked now to load into ``arch.build()``
    (the saved result is rebuilt from ``arch``, so a mismatch would only show later, in
    an unloadable ``model.pt``); its weights are then used in the rebuilt network.
    ``example_input`` lets a classifier-width mismatch be reported as such.

    Example::

        >>> import torch, moonprune
        >>> torch.save(moonprune.models.demo_cnn(num_classes=3).state_dict(), "dense.pt")
        >>> spec = moonprune.ArchSpec("moonprune.models:demo_cnn", {"num_classes": 3})
        >>> moonprune.load_dense("dense.pt", spec).model.classifier.out_features
        3
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        state = load_safetensors(p)
    else:
        obj = torch_load(p, trust)
        if isinstance(obj, nn.Module) and arch is None:
            check_finite(obj.state_dict(), str(p))
            return DenseModel(obj, arch)
        if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
            ckpt = checkpoint_from_dict(obj, str(p), arch.factory if arch else None)
            return DenseModel(
                ckpt.model, ckpt.arch, ckpt.head_layer, ckpt.structure, ckpt.preprocessing
            )
        found = obj.state_dict() if isinstance(obj, nn.Module) else find_state_dict(obj)
        if found is None:
            raise CheckpointError(
                f"{str(p)!r} holds no state_dict (a dict of tensors, possibly under "
                f"one of the keys {list(NESTED_KEYS)}); save model.state_dict()"
            )
        state = found
    if arch is None:
        raise CheckpointError(
            f"{str(p)!r} is a state_dict: pass --arch package.module:factory (or "
            "path/to/file.py:factory) to say which network it belongs to"
        )
    check_finite(state, str(p))
    model = arch.build()
    load_weights_(model, state, str(p), example_input)
    return DenseModel(model, arch)


@dataclass
class MoonpruneCheckpoint:
    """A compressed model and everything needed to evaluate, export or resume it."""

    model: nn.Module
    arch: ArchSpec
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    head_layer: str | None = None
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    threshold: float | None = None
    temperature: float = 1.0
    tpr: float = 0.95
    score: str = "msp"
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    structure: dict[str, dict[str, int]] | None = None
    #: Mahalanobis/KNN statistics of the classifier's input, fitted on the training
    #: split of this model (None in checkpoints written before they existed).
    feature_stats: FeatureStats | None = None

    @property
    def num_known(self) -> int:
        """K, the number of known classes."""
        return len(self.classes)

    @property
    def has_unknown(self) -> bool:
        """True when the K+1 head surgery was applied."""
        return self.head_layer is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "moonprune_version": self.version or _version(),
            "arch": self.arch.as_dict(),
            "head_layer": self.head_layer,
            "classes": list(self.classes),
            "preprocessing": self.preprocessing.as_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "masks": {k: v.detach().cpu().bool() for k, v in self.masks.items()},
            "threshold": self.threshold,
            "temperature": self.temperature,
            "tpr": self.tpr,
            "score": self.score,
            "config": self.config,
            "metrics": self.metrics,
            "structure": self.structure,
            "feature_stats": None if self.feature_stats is None else self.feature_stats.to_dict(),
        }


def checkpoint_from_dict(
    obj: Mapping[str, Any], source: str, arch: str | None = None
) -> MoonpruneCheckpoint:
    """Rebuild a :class:`MoonpruneCheckpoint` from its saved dict.

    Every field is checked first (:func:`moonprune.trust.check_fields`); the recorded
    factory is called only when it is a moonprune built-in, and ``arch`` (the user's
    ``--arch``) replaces it otherwise (:func:`moonprune.trust.recorded_arch`).
    """
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise CheckpointError(
            f"{source} is an incomplete moonprune checkpoint (no {missing[0]!r}); "
            "recreate it with `moonprune compress`"
        )
    check_fields(obj, source, FORMAT_VERSION)
    spec = recorded_arch(obj["arch"], source, arch)
    model = spec.build()
    if obj["head_layer"] is not None:
        add_unknown_output_(model, layer=obj["head_layer"])
    state, masks = obj["state_dict"], obj["masks"]
    for key, value in (("state_dict", state), ("masks", masks)):
        if not isinstance(value, Mapping) or not all(
            isinstance(t, torch.Tensor) for t in value.values()
        ):
            raise CheckpointError(
                f"{source}: {key!r} must map names to tensors; recreate it with "
                "`moonprune compress`"
            )
    if obj.get("structure"):  # channel-pruned: rebuild the slimmer shapes first
        from moonprune.sparsity.channel.structure import apply_structure_

        try:
            apply_structure_(model, obj["structure"], state)
        except (AttributeError, KeyError) as exc:
            raise CheckpointError(
                f"{source}: the channel structure does not fit {spec.factory} ({exc}); "
                "recreate the checkpoint with `moonprune compress`"
            ) from None
    check_finite(state, source)
    load_weights_(model, state, source)
    model.eval()
    stats = obj.get("feature_stats")
    feature_stats = None if stats is None else FeatureStats.from_dict(stats, source)
    if feature_stats is not None and len(feature_stats.means) != len(obj["classes"]):
        raise CheckpointError(
            f"{source}: the feature statistics hold {len(feature_stats.means)} class means for "
            f"{len(obj['classes'])} classes; recreate it with `moonprune compress`"
        )
    return MoonpruneCheckpoint(
        model=model,
        arch=spec,
        classes=tuple(obj["classes"]),
        preprocessing=Preprocessing.from_dict(obj["preprocessing"]),
        head_layer=obj["head_layer"],
        masks=dict(masks),
        threshold=None if obj["threshold"] is None else float(obj["threshold"]),
        temperature=float(obj.get("temperature", 1.0)),
        tpr=float(obj["tpr"]),
        score=str(obj["score"]),
        config=dict(obj["config"]),
        metrics=dict(obj["metrics"]),
        version=str(obj["moonprune_version"]),
        structure=obj.get("structure"),
        feature_stats=feature_stats,
    )


_REQUIRED = (
    "format_version", "moonprune_version", "arch", "head_layer", "classes", "preprocessing",
    "state_dict", "masks", "threshold", "tpr", "score", "config", "metrics",
)  # fmt: skip


def save_checkpoint(ckpt: MoonpruneCheckpoint, path: str | Path) -> Path:
    """Write ``ckpt`` atomically (temporary name, then rename).

    Example::

        >>> import moonprune
        >>> from moonprune.checkpoints import MoonpruneCheckpoint
        >>> from moonprune.data import Preprocessing
        >>> ckpt = MoonpruneCheckpoint(
        ...     model=moonprune.models.demo_cnn(num_classes=2, width=4),
        ...     arch=moonprune.ArchSpec("moonprune.models:demo_cnn",
        ...                             {"num_classes": 2, "width": 4}),
        ...     classes=("a", "b"), preprocessing=Preprocessing(1, 8, 8, 1.0, (0.0,), (1.0,)))
        >>> moonprune.save_checkpoint(ckpt, "saved.pt").name
        'saved.pt'
        >>> moonprune.load_checkpoint("saved.pt").classes
        ('a', 'b')
    """
    p = Path(path)
    with atomic_path(p) as tmp:
        torch.save(ckpt.to_dict(), tmp)
    return p


def load_checkpoint(path: str | Path, arch: str | None = None) -> MoonpruneCheckpoint:
    """Load a moonprune checkpoint (``model.pt`` from ``compress``), safely.

    The network is rebuilt by the factory the checkpoint records only when that is a
    moonprune built-in; a network of your own needs ``arch`` (``--arch``) naming it,
    because a file never decides which code runs (:mod:`moonprune.trust`).

    Example::

        >>> import moonprune
        >>> result = moonprune.compress(moonprune.build_config({
        ...     "checkpoint": "", "data": "digits:0-2", "out": "ckpt-run", "export": False,
        ...     "train": {"epochs": 1}, "moon": {"warmup_epochs": 0}}),
        ...     dense=moonprune.checkpoints.DenseModel(
        ...         moonprune.models.demo_cnn(num_classes=3, width=4),
        ...         moonprune.ArchSpec("moonprune.models:demo_cnn",
        ...                            {"num_classes": 3, "width": 4})))
        >>> ckpt = moonprune.load_checkpoint("ckpt-run/model.pt")
        >>> ckpt.num_known, ckpt.has_unknown
        (3, True)
    """
    p = Path(path)
    obj = torch_load(p, trust=False, trust_flag=False)
    if not (isinstance(obj, Mapping) and obj.get("format") == FORMAT):
        raise CheckpointError(
            f"{str(p)!r} is not a moonprune checkpoint (written by `moonprune compress`)"
        )
    return checkpoint_from_dict(obj, str(p), arch)


def measured_sparsity(model: nn.Module) -> float:
    """Zeros / total over the prunable (conv and linear) weights."""
    from moonprune.conventions import prunable_weights

    zeros = total = 0
    for _, w in prunable_weights(model):
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else math.nan
