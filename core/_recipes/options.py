"""Plugin options from recipes: a plugin is named by a string, or by a mapping
``{name: <plugin>, <option>: <value>, ...}``; the options become an instance of the plugin's
``config_class``, validated (unknown names get the nearest one) before any weight changes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from quanta.errors import ConfigError, PluginNotFoundError, did_you_mean

__all__ = ["make_config", "parse_plugin_ref", "option_names"]


def _registry():
    from quanta import registry

    return registry


def option_names(kind: str, name: str) -> list[str]:
    """The option names of plugin ``(kind, name)`` (its ``config_class`` fields)."""
    cls = _registry().get(kind, name).config_class
    return [] if cls is None else [f.name for f in attrs.fields(cls) if f.init]


def make_config(kind: str, name: str, options: Mapping[str, Any] | None, key: str) -> Any:
    """An instance of plugin ``(kind, name)``'s ``config_class`` built from ``options``, or None
    when no options are given. Raises ConfigError naming ``key`` for an unknown plugin, an
    unknown option (with the nearest name and the allowed ones) or a value the class refuses."""
    try:
        entry = _registry().get(kind, name)
    except PluginNotFoundError as exc:
        raise ConfigError(str(exc), key) from None
    options = dict(options or {})
    if not options:
        return None
    cls = entry.config_class
    if cls is None:
        raise ConfigError(f"{kind} {name!r} takes no options (got {', '.join(map(str, options))})", key)
    if isinstance(options, cls):
        return options
    allowed = option_names(kind, name)
    for k in options:
        if k not in allowed:
            raise ConfigError(f"unknown option {k!r} for {kind} {name!r}{did_you_mean(str(k), allowed)} "
                              f"(allowed: {', '.join(allowed)})", f"{key}.{k}")
    try:
        return cls(**options)
    except ConfigError as exc:
        raise ConfigError(str(exc).split(": ", 1)[-1] if exc.key else str(exc),
                          f"{key}.{exc.key}" if exc.key else key) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid options for {kind} {name!r}: {exc}", key) from None


def parse_plugin_ref(value: Any, kind: str, key: str) -> tuple[str, Any]:
    """``(name, config or None)`` from a plugin reference: a name, or a mapping with ``name`` and options."""
    if isinstance(value, Mapping):
        opts = dict(value)
        name = opts.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"a {kind} given as a mapping needs 'name' (e.g. {{name: ..., option: value}})", key)
        return name, make_config(kind, name, opts, key)
    if not isinstance(value, str):
        raise ConfigError(f"expected a {kind} name or a mapping {{name: ..., options}}, got {value!r}", key)
    try:
        _registry().get(kind, value)
    except PluginNotFoundError as exc:
        raise ConfigError(str(exc), key) from None
    return value, None
