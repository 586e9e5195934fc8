"""How the contract suites report a broken contract: an ``AssertionError`` naming the plugin."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, NoReturn

__all__ = ["plugin_label", "fail", "check", "raising_fails"]


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


@contextmanager
def raising_fails(plugin: Any, what: str = "raised", where: str = "") -> Iterator[None]:
    """Within the block, an exception from the plugin's code becomes ``fail(plugin, "<what>
    <Type>: <message> <where>")``; an ``AssertionError`` (a failed check) passes through as it is."""
    try:
        yield
    except AssertionError:
        raise
    except Exception as exc:
        fail(plugin, f"{what} {type(exc).__name__}: {exc}" + (f" {where}" if where else ""))
