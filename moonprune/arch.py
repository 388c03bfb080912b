"""How to build the network: an :class:`ArchSpec` names a factory and its keyword arguments.

``package.module:factory`` is imported, ``path/file.py:factory`` is loaded from the
file; either is called only when the user named it (``--arch``) or it is a moonprune
built-in (:mod:`moonprune.trust`), never because a file recorded it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from moonprune.errors import CheckpointError


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
