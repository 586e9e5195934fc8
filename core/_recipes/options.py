"""Plugin options given outside a recipe (``quanta.export(..., **options)``): the same structuring
as a recipe's (:func:`quanta._recipes.structure.plugin_config`), errors keyed under the caller's name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from quanta._recipes.structure import join_key, option_names, plugin_config
from quanta.errors import ConfigError, PluginNotFoundError

__all__ = ["make_config", "option_names"]


def make_config(kind: str, name: str, options: Mapping[str, Any] | Any | None, key: str) -> Any:
    """An instance of plugin ``(kind, name)``'s ``config_class`` built from ``options`` (a mapping,
    or already an instance), or None when no options are given. Raises ConfigError naming ``key``
    for an unknown plugin, an unknown option (with the nearest name and the allowed ones), a
    newer options ``version`` than this quanta's, or a value the class refuses."""
    try:
        return plugin_config(kind, name, options if options else None)
    except PluginNotFoundError as exc:
        raise ConfigError(str(exc), key) from None
    except ConfigError as exc:
        raise ConfigError(exc.detail, join_key(key, exc.key)) from None
