"""The recipe file (``--config recipe.toml``): read, merged with flags, type-checked.

:func:`moonprune.config.build_config` turns the merged dict into the typed, frozen
config; this module only reads TOML and checks that each plain value has the type its
field declares, so ``epochs = 2.5`` or ``train = 5`` stops with one line naming the
key instead of failing later inside training.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from moonprune.errors import ConfigError

#: Plain annotation -> the recipe types it accepts (TOML has int, float, bool, str).
_PLAIN_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
}  # fmt: skip


def check_types(cls: type, values: dict[str, Any], where: str) -> None:
    """A value of the wrong type (``epochs = 2.5``, ``lr = "fast"``) named with its key."""
    for f in dataclasses.fields(cls):
        if f.name not in values or values[f.name] is None or not isinstance(f.type, str):
            continue
        options = [part.strip() for part in f.type.split("|")]
        if not all(o in _PLAIN_TYPES or o == "None" for o in options):
            continue  # a structured type: its own validation checks it
        accepted = tuple(t for o in options for t in _PLAIN_TYPES.get(o, ()))
        value = values[f.name]
        if (isinstance(value, bool) and bool not in accepted) or not isinstance(value, accepted):
            raise ConfigError(
                f"{f.name} in {where} must be {' or '.join(o for o in options)}, got "
                f"{value!r} ({type(value).__name__})"
            )


def merge(recipe: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recipe values overridden by command-line ones (``None`` = not given).

    Override keys are ``name`` for top-level fields or ``section.name``.
    """
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in recipe.items()}
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, name = key.rpartition(".")
        if section:
            if not isinstance(merged.setdefault(section, {}), dict):
                raise ConfigError(
                    f"[{section}] in the recipe must be a table, got {merged[section]!r}"
                )
            merged[section][name] = value
        else:
            merged[name] = value
    return merged


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Parse a TOML recipe file into a nested dict (validated later by build_config)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--config {str(p)!r} is a folder; pass the recipe file (a .toml)")
    if not p.is_file():
        raise ConfigError(f"recipe file {str(p)!r} does not exist; pass an existing --config")
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe {str(p)!r} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {str(p)!r} is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(
            f"recipe {str(p)!r} cannot be read ({exc.strerror or exc}); check its permissions"
        ) from None
