"""Flag text to values, for every command: JSON objects, temperatures, image sizes.

Each raises :class:`moonprune.errors.ConfigError` naming the flag and an example of
what it takes; the range of a parsed value is the config's to check.
"""

from __future__ import annotations

from typing import Any


def parse_json_object(text: str | None, flag: str) -> dict[str, Any] | None:
    """``'{"width": 16}'`` -> dict; a clear error otherwise."""
    if text is None:
        return None
    import json

    from moonprune.errors import ConfigError

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{flag} is not valid JSON ({exc.msg}); e.g. '{{\"width\": 16}}'"
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object, e.g. '{{\"width\": 16}}'")
    return value


def parse_temperature(text: str | None) -> str | float | None:
    """``"auto"`` stays; anything else must be a number (validated by the config)."""
    if text is None or text == "auto":
        return text
    from moonprune.errors import ConfigError

    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--temperature must be 'auto' or a number > 0, got {text!r}") from None


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"32"`` -> (32, 32); ``"24x32"`` -> (24, 32)."""
    if text is None:
        return None
    from moonprune.errors import ConfigError

    try:
        values = [int(p) for p in text.lower().replace(",", "x").split("x")]
    except ValueError:
        raise ConfigError(f"--image-size {text!r} is not HxW, e.g. 32x32") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise ConfigError(f"--image-size {text!r} is not HxW, e.g. 32x32")
    return values[0], values[1]
