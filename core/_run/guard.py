"""Attributing failures to plugins: :func:`plugin_code` wraps calls into plugin code, and
:func:`fire_event` broadcasts an event hook so that one failing listener cannot stop a run.

An unexpected exception raised inside a plugin becomes a :class:`~quanta.errors.PluginError`
naming the plugin's kind, name, distribution and (where known) the layer, with the original
chained. A :class:`~quanta.errors.QuantaError` passes through unchanged: a plugin raising one on
purpose has already said what is wrong. ``KeyboardInterrupt`` and ``SystemExit`` are never
wrapped.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Iterator

from quanta.errors import PluginError, PluginWarning, QuantaError

__all__ = ["plugin_code", "fire_event", "plugin_distribution"]


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


def fire_event(hook_name: str, **kwargs: Any) -> None:
    """Call every implementation of the event hook ``hook_name`` with ``kwargs``.

    An implementation that raises is reported as a :class:`~quanta.errors.PluginWarning` naming
    its plugin; the others still run and the caller goes on.
    """
    from quanta import registry

    reg = registry.default()
    caller = getattr(reg.hook, hook_name)  # hook names are ours, from quanta.contracts.hooks
    for impl in reversed(caller.get_hookimpls()):  # pluggy's own call order
        try:
            impl.function(*[kwargs[a] for a in impl.argnames])
        except Exception as exc:  # isolate: an event listener never stops the run
            warnings.warn(f"plugin {impl.plugin_name!r} failed in its {hook_name} hook and was skipped: "
                          f"{type(exc).__name__}: {exc}", PluginWarning, stacklevel=2)
