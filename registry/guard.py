"""Attributing failures to plugins: :func:`plugin_code` wraps calls into plugin code.

An unexpected exception raised inside a plugin becomes a :class:`~quanta.errors.PluginError`
naming the plugin's kind, name, distribution and (where known) the layer, with the original
chained. A :class:`~quanta.errors.QuantaError` passes through unchanged: a plugin raising one on
purpose has already said what is wrong. ``KeyboardInterrupt`` and ``SystemExit`` are never
wrapped.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from quanta.errors import PluginError, QuantaError

__all__ = ["plugin_code", "plugin_distribution"]


def plugin_distribution(kind: str, name: str) -> str | None:
    from quanta import registry

    try:
        return registry.get(kind, name).distribution
    except Exception:  # an unregistered (in-test) object: no distribution to name
        return None


@contextmanager
def plugin_code(plugin: Any, layer: str | None = None) -> Iterator[None]:
    """Run the block as a call into ``plugin``'s code (a contribution of any kind).

    A PluginError raised by another plugin inside the block (a backend failing inside an
    algorithm's run) gets this plugin added to its ``during`` list, so the message names both.
    """
    try:
        yield
    except PluginError as exc:
        if (exc.kind, exc.name) != (plugin.kind, plugin.name):
            exc.add_context(f"{plugin.kind} {plugin.name!r}")
        raise
    except QuantaError:
        raise
    except Exception as exc:
        raise PluginError(plugin.kind, plugin.name, plugin_distribution(plugin.kind, plugin.name), exc, layer) from exc
