"""``quanta.registry``: look plugins up by kind and name, register and list them.

The module-level functions act on one process-wide :class:`Registry`, loaded lazily on
first use (built-ins first, then the ``quanta`` entry-point group).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Any, Iterator

import pluggy

from .manager import ENTRY_POINT_GROUP, KINDS, FieldInfo, PluginEntry, PluginFailure, Registry

__all__ = [
    "ENTRY_POINT_GROUP", "KINDS", "FieldInfo", "PluginEntry", "PluginFailure", "Registry",
    "default", "reset", "names", "get", "entries", "describe", "capabilities", "failures", "backends",
    "register_plugin", "unregister_plugin", "plugin", "hook", "use",
]

_default: Registry | None = None


def default() -> Registry:
    """The process-wide registry (created on first call)."""
    global _default
    if _default is None:
        _default = Registry()
    return _default


def reset() -> Registry:
    """Drop the process-wide registry so the next lookup reloads plugins (tests, env changes)."""
    global _default
    _default = None
    return default()


@contextmanager
def use(registry: Registry) -> Iterator[Registry]:
    """Make ``registry`` the process-wide default for a block (tests: ``quanta.testing``); the
    previous default is restored after, also on error."""
    global _default
    previous, _default = _default, registry
    try:
        yield registry
    finally:
        _default = previous


def names(kind: str) -> list[str]:
    """Sorted plugin names of ``kind`` ("scheme", "observer", "algorithm", "backend", "exporter")."""
    return default().names(kind)


def get(kind: str, name: str) -> PluginEntry:
    """The :class:`PluginEntry` for ``(kind, name)``; raises ``PluginNotFoundError`` (a KeyError)."""
    return default().get(kind, name)


def entries(kind: str | None = None) -> list[PluginEntry]:
    """Every entry, or those of one kind."""
    return default().entries(kind)


def describe(kind: str, name: str) -> list[FieldInfo]:
    """Config fields (name, type, default, doc) of one plugin."""
    return default().describe(kind, name)


def capabilities(kind: str, name: str) -> dict[str, Any]:
    """The capabilities one plugin declares (a scheme's ``grid``, a backend's ``priority``, ...)."""
    return default().capabilities(kind, name)


def backends() -> list[PluginEntry]:
    """Backend entries in the order they are asked ``accepts`` (highest priority first)."""
    return default().backends()


def failures() -> list[PluginFailure]:
    """Plugins that failed to load, with their entry point, distribution and error."""
    return default().failures()


def register_plugin(obj: Any, name: str | None = None) -> str:
    """Register an in-process plugin object; returns its plugin name."""
    return default().add_plugin(obj, name=name)


def unregister_plugin(obj_or_name: Any) -> None:
    """Remove an in-process plugin and its contributions."""
    default().remove_plugin(obj_or_name)


def plugin(obj: Any, name: str | None = None) -> AbstractContextManager[str]:
    """Context manager registering ``obj`` for the duration of a block."""
    return default().plugin(obj, name=name)


def hook() -> pluggy.HookRelay:
    """The pluggy hook relay of the default registry (fire event hooks through it)."""
    return default().hook
