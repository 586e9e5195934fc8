"""How the contract suites report a broken contract: an ``AssertionError`` naming the plugin."""

from __future__ import annotations

from typing import Any, NoReturn

__all__ = ["plugin_label", "fail", "check"]


def plugin_label(plugin: Any) -> str:
    """``"scheme 'nf4' (mypkg.NF4Scheme)"``: kind, name and class of a contribution."""
    kind = getattr(plugin, "kind", "") or "plugin"
    cls = type(plugin)
    return f"{kind} {getattr(plugin, 'name', '?')!r} ({cls.__module__}.{cls.__qualname__})"


def fail(plugin: Any, what: str) -> NoReturn:
    """Raise ``AssertionError("<plugin>: <what>")``."""
    raise AssertionError(f"{plugin_label(plugin)}: {what}")


def check(ok: Any, plugin: Any, what: str) -> None:
    """``fail(plugin, what)`` unless ``ok`` (a plain check that survives ``python -O``)."""
    if not ok:
        fail(plugin, what)
