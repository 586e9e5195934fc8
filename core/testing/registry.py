"""Registry helpers for tests: a fresh registry for a block, and in-process registration."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ["isolated_registry", "registered"]


@contextmanager
def isolated_registry(autoload: bool = False) -> Iterator[Any]:
    """A fresh ``quanta.registry.Registry`` made the process-wide default for the block, the
    previous default restored after. ``autoload=False`` (the default) loads only the built-ins,
    not the installed entry-point plugins; ``True`` loads those too."""
    from quanta import registry

    fresh = registry.Registry(autoload=autoload)
    with registry.use(fresh):
        yield fresh


@contextmanager
def registered(*plugins: Any) -> Iterator[list[str]]:
    """Register plugin objects (modules or objects with ``@quanta.hookimpl`` methods) in the
    default registry for the block; every one is unregistered in ``finally``. Yields their names."""
    from quanta import registry

    added, names = [], []
    try:
        for obj in plugins:
            names.append(registry.register_plugin(obj))
            added.append(obj)
        yield names
    finally:
        for obj in reversed(added):
            registry.unregister_plugin(obj)
