"""The masker registry: names -> classes, as an object (like timm's optimizer factory).

Third-party packages add maskers through the ``moonprune.maskers`` entry-point
group; each entry point names a :class:`~moonprune.sparsity.Masker` subclass::

    # the plug-in's pyproject.toml
    [project.entry-points."moonprune.maskers"]
    snip = "my_package.maskers:SnipMasker"

They are loaded the first time a name is looked up or listed, so importing
moonprune never imports a plug-in. A plug-in that fails to load, or is not a
Masker, is reported with its entry point's name instead of breaking the others.
"""

from __future__ import annotations

import logging
from typing import TypeVar

from moonprune.errors import ConfigError, did_you_mean
from moonprune.sparsity.base import Masker, MaskerConfig

M = TypeVar("M", bound=type[Masker])
logger = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "moonprune.maskers"


class MaskerRegistry:
    """Holds masker classes by ``name``; :meth:`register` works as a decorator.

    Example::

        >>> from moonprune import MASKERS, MaskerConfig
        >>> [n for n in MASKERS.names() if MASKERS.origin(n) == "moonprune"]
        ['gmp', 'magnitude', 'rigl', 'set', 'torch-ao']
        >>> type(MASKERS.create("set", MaskerConfig(sparsity=0.8))).__name__
        'SETMasker'
    """

    def __init__(self, entry_point_group: str | None = None) -> None:
        self._classes: dict[str, type[Masker]] = {}
        self._origins: dict[str, str] = {}
        self._group = entry_point_group
        self._plugins_loaded = entry_point_group is None
        self.plugin_errors: dict[str, str] = {}

    def refresh(self) -> None:
        """Scan the entry points again (after installing a plug-in in this process)."""
        self._plugins_loaded = self._group is None
        self.plugin_errors = {}

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=self._group or ""):
            origin = f"{ep.dist.name} {ep.dist.version}" if ep.dist else ep.value
            try:
                cls = ep.load()
                if not (isinstance(cls, type) and issubclass(cls, Masker)):
                    raise TypeError(f"{ep.value} is not a moonprune Masker subclass")
                if cls.name != ep.name:
                    raise ValueError(f"entry point {ep.name!r} names a masker called {cls.name!r}")
                self.register(cls, origin=origin)
            except Exception as exc:
                self.plugin_errors[ep.name] = f"{origin}: {exc}"
                logger.warning("masker plug-in %r could not be loaded: %s", ep.name, exc)

    def register(self, cls: M, origin: str | None = None) -> M:
        """Add ``cls`` under ``cls.name`` and return it, so it works as a decorator::

            @MASKERS.register
            class SnipMasker(Masker):
                name = "snip"
                description = "SNIP: prune by |w * grad| once, at the start"
                ...

        ``origin`` (shown by :meth:`origin`) defaults to the top-level package of the
        class's module. A second class with the same name is an error.
        """
        if not (isinstance(cls, type) and issubclass(cls, Masker)):
            raise TypeError(f"{cls!r} is not a subclass of moonprune.sparsity.Masker")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{cls.__name__} needs a class attribute name = '...' to register")
        if not isinstance(getattr(cls, "description", None), str):
            raise ConfigError(f"{cls.__name__} needs a one-line class attribute description")
        if name in self._classes and self._classes[name] is not cls:
            raise ConfigError(
                f"a masker named {name!r} is already registered "
                f"({self._classes[name].__qualname__} from {self._origins[name]}); "
                "pick another name"
            )
        self._classes[name] = cls
        self._origins[name] = origin or cls.__module__.split(".")[0]
        return cls

    def names(self) -> list[str]:
        """Registered masker names, sorted."""
        self._load_plugins()
        return sorted(self._classes)

    def describe(self) -> dict[str, str]:
        """Name -> one-line description."""
        return {n: self._classes[n].description for n in self.names()}

    def origin(self, name: str) -> str:
        """Where a masker comes from: ``moonprune``, a plug-in distribution, or a package."""
        self.get(name)
        return self._origins[name]

    def get(self, name: str) -> type[Masker]:
        """The class registered as ``name``; an unknown name is a ConfigError with hints."""
        self._load_plugins()
        try:
            return self._classes[name]
        except (KeyError, TypeError):
            hint = did_you_mean(name, self.names())
            raise ConfigError(
                f"unknown sparse method {name!r}{hint}; choose one of: {', '.join(self.names())}"
            ) from None

    def create(self, name: str, config: MaskerConfig) -> Masker:
        """A new masker ``name`` with ``config``."""
        return self.get(name)(config)

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._classes
