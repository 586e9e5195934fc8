"""The scheme and observer plugins a ``QuantSpec`` names, looked up in the default registry."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quanta._records.spec import QuantSpec
    from quanta.contracts import Observer, Scheme

__all__ = ["resolve_scheme", "resolve_observer", "scheme_for", "observer_for", "backend_for"]


def resolve_scheme(name: str) -> Scheme:
    """The scheme implementation registered as ``name`` (with its default options)."""
    from quanta.registry import get

    obj: Scheme = get("scheme", name).obj
    return obj


def resolve_observer(name: str) -> Observer:
    """The observer implementation registered as ``name`` (with its default options)."""
    from quanta.registry import get

    obj: Observer = get("observer", name).obj
    return obj


def scheme_for(spec: QuantSpec) -> Scheme:
    """The scheme ``spec`` names, configured with ``spec.scheme_config`` (a ``quanta.contracts.Scheme``)."""
    scheme = resolve_scheme(spec.scheme)
    return scheme if spec.scheme_config is None else scheme.with_config(spec.scheme_config)


def observer_for(spec: QuantSpec) -> Observer:
    """The observer ``spec`` names, configured with ``spec.observer_config``."""
    observer = resolve_observer(spec.observer)
    return observer if spec.observer_config is None else observer.with_config(spec.observer_config)


def backend_for(model: Any) -> Any:
    """The entry of the backend for ``model``: the first (by declared ``priority``) whose
    ``accepts(model)`` is true. Raises ``quanta.ConfigError`` naming the backends when none is."""
    from quanta.errors import ConfigError
    from quanta.registry import backends, names
    from quanta.registry.guard import plugin_code

    for entry in backends():
        with plugin_code(entry.obj):
            accepted = entry.obj.accepts(model)
        if accepted:
            return entry
    raise ConfigError(f"no backend accepts a {type(model).__module__}.{type(model).__name__} "
                      f"(backends: {', '.join(names('backend'))}); pass a torch.nn.Module, a Core ML "
                      f"model or the path of an .mlpackage")
