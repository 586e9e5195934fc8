"""Calls into plugins during a run: :func:`fire_event` broadcasts an event hook through pluggy
(each listener isolated by the registry); :func:`plugin_code` (from ``quanta.registry.guard``)
turns an unexpected exception inside a plugin into a :class:`~quanta.errors.PluginError`;
:func:`signals_deferred` holds Ctrl-C back while a model is changed past the point of no return.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from quanta.registry.guard import plugin_code, plugin_distribution

__all__ = ["plugin_code", "fire_event", "plugin_distribution", "signals_deferred"]


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM (where a Python handler runs for them) are recorded,
    not acted on; when the block ends, the first one recorded goes to the handler it was meant
    for (``KeyboardInterrupt`` for Ctrl-C). For a short step that must not stop halfway (an
    in-place run writing its values over the float weights it can no longer restore). Outside the
    main thread no Python handler can interrupt the block, so it changes nothing there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(signum)
        if callable(current):
            previous[signum] = current
            signal.signal(signum, lambda num, frame: received.append((num, frame)))
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
    if received:
        num, frame = received[0]
        previous[num](num, frame)


def fire_event(hook_name: str, **kwargs: Any) -> None:
    """Call the event hook ``hook_name`` with ``kwargs`` through pluggy.

    The registry registers every event-hook implementation isolated (``quanta.registry``): one
    that raises is reported as a :class:`~quanta.errors.PluginWarning` naming its plugin; the
    others still run and the caller goes on. Hook wrappers and ``QUANTA_TRACE_PLUGINS=1``
    tracing see the call like any pluggy hook call.
    """
    from quanta import registry

    getattr(registry.default().event_hooks, hook_name)(**kwargs)  # hook names are ours, from quanta.contracts.hooks
