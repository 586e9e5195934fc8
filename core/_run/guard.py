"""Calls into plugins during a run: :func:`fire_event` broadcasts an event hook through pluggy
(each listener isolated by the registry); :func:`plugin_code` (from ``quanta.registry.guard``)
turns an unexpected exception inside a plugin into a :class:`~quanta.errors.PluginError`.
"""

from __future__ import annotations

from typing import Any

from quanta.registry.guard import plugin_code, plugin_distribution

__all__ = ["plugin_code", "fire_event", "plugin_distribution"]


def fire_event(hook_name: str, **kwargs: Any) -> None:
    """Call the event hook ``hook_name`` with ``kwargs`` through pluggy.

    The registry registers every event-hook implementation isolated (``quanta.registry``): one
    that raises is reported as a :class:`~quanta.errors.PluginWarning` naming its plugin; the
    others still run and the caller goes on. Hook wrappers and ``QUANTA_TRACE_PLUGINS=1``
    tracing see the call like any pluggy hook call.
    """
    from quanta import registry

    getattr(registry.default().event_hooks, hook_name)(**kwargs)  # hook names are ours, from quanta.contracts.hooks
