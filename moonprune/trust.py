"""What moonprune believes of a file: a checkpoint, a recipe, a data folder is data.

A moonprune checkpoint records the factory that builds its network
(``package.module:factory``) and the keyword arguments. Calling a recorded factory
would let any file run code (``os:system`` with ``{"command": ...}``), so a factory
read from a file is called only when it is one of moonprune's own
(:data:`moonprune.models.BUILTIN_FACTORIES`) or the user named it on the command line
(``--arch``). The other fields (classes, structure, and the run record with the
threshold, temperature and preprocessing: :mod:`moonprune.run_record`) are checked for
type and range on every load, so a tampered or damaged file stops with one line
instead of exporting a model that accepts nothing.

Example::

    >>> from moonprune.trust import recorded_arch
    >>> recorded_arch({"factory": "moonprune.models:demo_cnn", "kwargs": {}}, "m.pt").factory
    'moonprune.models:demo_cnn'
    >>> recorded_arch({"factory": "os:system", "kwargs": {"command": "x"}}, "m.pt")
    Traceback (most recent call last):
    ...
    moonprune.errors.CheckpointError: m.pt names the factory 'os:system' ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeGuard

from moonprune.arch import ArchSpec
from moonprune.errors import CheckpointError
from moonprune.heads import UNKNOWN_HEADS

BUILTIN_MODULE = "moonprune.models"


def is_builtin_factory(factory: str) -> bool:
    """True for ``moonprune.models:<name>`` with ``name`` a moonprune factory."""
    from moonprune.models import BUILTIN_FACTORIES

    module, sep, attr = factory.partition(":")
    return module == BUILTIN_MODULE and bool(sep) and attr in BUILTIN_FACTORIES


def json_like(value: Any, depth: int = 0) -> bool:
    """Plain data only: what a recipe or ``--arch-kwargs`` can express."""
    if value is None or isinstance(value, bool | int | str):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if depth > 8:
        return False
    if isinstance(value, list | tuple):
        return all(json_like(v, depth + 1) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and json_like(v, depth + 1) for k, v in value.items())
    return False


def recorded_arch(record: Any, source: str, given: str | None = None) -> ArchSpec:
    """The :class:`~moonprune.arch.ArchSpec` a file records, if it may be called.

    ``given`` is the ``--arch`` the user passed: it replaces a recorded factory (the
    recorded keyword arguments, plain data, are kept), so a checkpoint whose network
    lives in the user's own package loads with ``--arch`` naming it. Without it only a
    moonprune built-in is called.
    """
    if not (
        isinstance(record, Mapping)
        and isinstance(record.get("factory"), str)
        and isinstance(record.get("kwargs"), Mapping)
    ):
        raise CheckpointError(
            f"{source}: the architecture record is damaged (expected factory and kwargs); "
            "recreate the checkpoint with `moonprune compress`"
        )
    factory, kwargs = record["factory"], dict(record["kwargs"])
    if not json_like(kwargs):
        raise CheckpointError(
            f"{source}: the factory's keyword arguments hold something other than plain "
            "numbers, strings and lists; recreate the checkpoint with `moonprune compress`"
        )
    if given:
        return ArchSpec(given, kwargs)
    if not is_builtin_factory(factory):
        raise CheckpointError(
            f"{source} names the factory {factory!r}, and moonprune never calls code named "
            f"inside a file; if you trust it, name it yourself: --arch {factory}"
        )
    return ArchSpec(factory, kwargs)


def checked_recipe_arch(recipe_arch: Any, given: str | None, recipe: str) -> None:
    """A recipe is data too: an ``arch`` it names must be a built-in or also be given as
    ``--arch`` on the command line (the flag then wins, as every flag does)."""
    if recipe_arch is None or given:
        return
    if not isinstance(recipe_arch, str) or not is_builtin_factory(recipe_arch):
        raise CheckpointError(
            f"the recipe {recipe} names arch = {recipe_arch!r}, and moonprune never imports "
            f"code named inside a file; if you trust it, name it yourself: --arch {recipe_arch}"
        )


def finite_number(value: Any) -> TypeGuard[float]:
    """A finite int or float (never a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_fields(obj: Mapping[str, Any], source: str, format_version: int) -> None:
    """Type and range of what a checkpoint records about its model besides the weights
    (the format version, the classes, the head, the channel structure, the metrics;
    the run record checks itself: :meth:`moonprune.run_record.RunRecord.from_dict`).

    Raises :class:`CheckpointError` naming the first bad field; a file that fails here
    was edited by hand or damaged, so the fix is always to recreate it.
    """
    fix = "recreate it with `moonprune compress`"
    version = obj.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > format_version:
        raise CheckpointError(
            f"{source} has checkpoint format version {version!r}; this moonprune reads up to "
            f"{format_version}: upgrade moonprune, or {fix}"
        )
    classes = obj.get("classes")
    if (
        not isinstance(classes, list | tuple)
        or len(classes) < 2
        or not all(isinstance(c, str) for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise CheckpointError(
            f"{source}: 'classes' must be a list of at least 2 distinct names, got "
            f"{short_repr(classes)}; {fix}"
        )
    _check_structure(obj.get("structure"), source, fix)
    if not isinstance(obj.get("metrics"), Mapping):
        raise CheckpointError(f"{source}: 'metrics' must be a mapping; {fix}")
    head = obj.get("head_layer")
    if head is not None and not isinstance(head, str):
        raise CheckpointError(f"{source}: head_layer {short_repr(head)} must be a name; {fix}")
    kind = obj.get("unknown_head")
    if kind is not None and (head is None or kind not in UNKNOWN_HEADS):
        raise CheckpointError(
            f"{source}: unknown_head {short_repr(kind)} must be 'mean' or 'separate' on a "
            f"model with a head_layer; {fix}"
        )


#: The size attributes a channel-pruned checkpoint may set (nothing else is written).
STRUCTURE_ATTRS = frozenset(
    {
        "in_channels",
        "out_channels",
        "in_features",
        "out_features",
        "num_features",
        "groups",
        "num_channels",
        "num_groups",
    }
)


def _check_structure(structure: Any, source: str, fix: str) -> None:
    if structure is None:
        return
    ok = isinstance(structure, Mapping) and all(
        isinstance(name, str)
        and isinstance(attrs, Mapping)
        and all(
            a in STRUCTURE_ATTRS and isinstance(v, int) and not isinstance(v, bool) and v > 0
            for a, v in attrs.items()
        )
        for name, attrs in structure.items()
    )
    if not ok:
        raise CheckpointError(
            f"{source}: the channel structure record holds something other than positive "
            f"layer sizes; {fix}"
        )


def short_repr(value: Any) -> str:
    """``repr(value)``, cut to 60 characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
