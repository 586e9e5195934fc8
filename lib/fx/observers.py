"""Streaming observers for activations: an observer plugin's ``streaming`` form, found by name."""

from __future__ import annotations

from typing import Any

from torch import nn

from quanta.errors import ConfigError, did_you_mean

__all__ = ["streaming_observer"]


def streaming_observer(name: str, spec: Any = None, **options: Any) -> nn.Module:
    """A fresh streaming observer module for the observer plugin ``name``.

    Calls the plugin's ``streaming(spec, **options)`` with the options it declares in
    ``streaming_options`` (others are dropped). Raises ConfigError (key ``activation_observer``)
    when ``name`` is not an observer with a streaming form, naming those that have one.
    """
    from quanta import registry

    entry = registry.get("observer", name) if name in registry.names("observer") else None
    if entry is not None:
        declared = entry.obj.streaming_options
        module = entry.obj.streaming(spec, **{k: v for k, v in options.items() if k in declared})
        if module is not None:
            return module
    streaming = [e.name for e in registry.entries("observer") if e.obj.streaming() is not None]
    raise ConfigError(f"observer {name!r} has no streaming form for activations{did_you_mean(name, streaming)} "
                      f"(allowed: {', '.join(streaming)})", "activation_observer")
