"""The masker registry: names -> classes, as an object (like timm's optimizer factory)."""

from __future__ import annotations

import difflib
from typing import TypeVar

from moonprune.errors import ConfigError
from moonprune.sparsity.base import Masker, MaskerConfig

M = TypeVar("M", bound=type[Masker])


class MaskerRegistry:
    """Holds masker classes by ``name``; :meth:`register` works as a decorator.

    Example::

        >>> from moonprune import MASKERS, MaskerConfig
        >>> MASKERS.names()
        ['gmp', 'magnitude', 'rigl', 'set']
        >>> type(MASKERS.create("set", MaskerConfig(sparsity=0.8))).__name__
        'SETMasker'
    """

    def __init__(self) -> None:
        self._classes: dict[str, type[Masker]] = {}
        self._origins: dict[str, str] = {}

    def register(self, cls: M, origin: str = "moonprune") -> M:
        """Add ``cls`` under ``cls.name``; a second class with the same name is an error."""
        name = cls.name
        if name in self._classes and self._classes[name] is not cls:
            raise ConfigError(f"a masker named {name!r} is already registered")
        self._classes[name] = cls
        self._origins[name] = origin
        return cls

    def names(self) -> list[str]:
        return sorted(self._classes)

    def describe(self) -> dict[str, str]:
        """Name -> one-line description."""
        return {n: self._classes[n].description for n in self.names()}

    def origin(self, name: str) -> str:
        return self._origins[name]

    def get(self, name: str) -> type[Masker]:
        try:
            return self._classes[name]
        except KeyError:
            close = difflib.get_close_matches(name, self.names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown sparse method {name!r}{hint}; choose one of: {', '.join(self.names())}"
            ) from None

    def create(self, name: str, config: MaskerConfig) -> Masker:
        """A new masker ``name`` with ``config``."""
        return self.get(name)(config)

    def __contains__(self, name: object) -> bool:
        return name in self._classes
