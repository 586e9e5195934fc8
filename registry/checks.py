"""What the registry checks of a contribution before it is registered, and of a plugin whose
registration hook failed: the contract of its kind, its declared capabilities, completeness."""

from __future__ import annotations

import inspect
import re
from types import FrameType, TracebackType
from typing import Any, Iterable, Mapping

import attrs

from quanta.contracts import GRIDS, KINDS as _KIND_TABLE, Algorithm
from quanta.errors import PluginContractError

__all__ = ["check_contract", "declared_problem", "incomplete", "abstract_contributions"]

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*$")


def check_contract(kind: str, contribution: object, where: str) -> str:
    """Check ``contribution`` against the contract of ``kind``; return its one-line description.

    Raises ``PluginContractError`` naming ``where`` (the plugin and its distribution)."""
    base = _KIND_TABLE[kind].base
    if not isinstance(contribution, base):
        raise PluginContractError(
            f"{where} registered {contribution!r} as a {kind}, but it is not an instance of a subclass of "
            f"quanta.contracts.{base.__name__}. Since quanta 0.2 every contribution subclasses its kind's "
            f"class, which declares the required and optional methods: write "
            f"`class MyPlugin(quanta.contracts.{base.__name__})` (docs/plugins.md, 'Updating a plugin')")
    if inspect.isabstract(type(contribution)):
        raise incomplete(where, kind, [type(contribution)])
    c: Any = contribution  # an instance of the kind's class: its declared attributes exist
    name = c.name
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PluginContractError(f"{where} registered a {kind} without a valid 'name' (got {name!r})")
    desc = c.description
    if not isinstance(desc, str) or not desc.strip():
        raise PluginContractError(f"{where}: {kind} {name!r} needs a one-line 'description'")
    config_class = c.config_class
    if config_class is not None and not (isinstance(config_class, type) and attrs.has(config_class)):
        raise PluginContractError(f"{where}: {kind} {name!r} config_class must be an attrs class")
    problem = declared_problem(kind, c)
    if problem:
        raise PluginContractError(f"{where}: {kind} {name!r} {problem}")
    return desc.strip().splitlines()[0]


def incomplete(where: str, kind: str, classes: Iterable[type]) -> PluginContractError:
    """The error for contribution classes that leave abstract methods of their contract unimplemented."""
    parts = [f"{c.__qualname__} (abstract methods left: {', '.join(sorted(getattr(c, '__abstractmethods__', ())))})"
             for c in classes]
    return PluginContractError(
        f"{where} registered an incomplete {kind}: {'; '.join(parts)}; implement every abstract method of "
        f"quanta.contracts.{_KIND_TABLE[kind].base.__name__} (docs/plugins.md)")


def _innermost_frame(tb: TracebackType | None) -> FrameType | None:
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return None if last is None else last.tb_frame


def abstract_contributions(tb: TracebackType | None) -> dict[str, list[type]]:
    """Per kind, the abstract (incomplete) contract classes that the innermost frame of ``tb``
    names (its locals first, then its globals): when instantiating one fails inside a plugin's
    registration hook, Python raises a TypeError from that frame (``object.__new__``)."""
    frame = _innermost_frame(tb)
    if frame is None:
        return {}
    for scope in (frame.f_locals, frame.f_globals):
        found: dict[str, list[type]] = {}
        for value in list(scope.values()):
            if isinstance(value, type) and inspect.isabstract(value) \
                    and not value.__module__.startswith("quanta.contracts"):
                for kind, spec in _KIND_TABLE.items():
                    if issubclass(value, spec.base) and value not in found.get(kind, []):
                        found.setdefault(kind, []).append(value)
        if found:
            return found
    return {}


def declared_problem(kind: str, c: Any) -> str | None:
    """What is wrong with the declared capabilities of contribution ``c`` of ``kind``, or None."""
    def bad_grids(grids: Any) -> bool:
        return not isinstance(grids, frozenset) or not grids or not grids <= set(GRIDS)

    if kind == "scheme" and c.grid not in GRIDS:
        return f"declares grid {c.grid!r}; allowed: {', '.join(GRIDS)}"
    if kind == "backend":
        if isinstance(c.priority, bool) or not isinstance(c.priority, int):
            return f"priority must be an int, got {c.priority!r}"
        if bad_grids(c.grids):
            return f"grids must be a non-empty frozenset of {', '.join(GRIDS)}, got {c.grids!r}"
    if kind == "exporter":
        if c.suffix is not None and not (isinstance(c.suffix, str) and c.suffix.startswith(".")):
            return f"suffix must be None or a string starting with '.', got {c.suffix!r}"
        if bad_grids(c.grids):
            return f"grids must be a non-empty frozenset of {', '.join(GRIDS)}, got {c.grids!r}"
    if kind == "algorithm":
        if c.changes not in ("weights", "model"):
            return f"declares changes={c.changes!r}; allowed: 'weights', 'model'"
        if c.training_loop and type(c).session is Algorithm.session:
            return "declares training_loop = True but does not implement session()"

        def type_names(value: Any) -> bool:
            return isinstance(value, tuple) and all(isinstance(t, str) for t in value)

        types = c.global_types
        if types is not None and not (type_names(types) or (
                isinstance(types, Mapping) and all(isinstance(k, str) and type_names(v) for k, v in types.items()))):
            return (f"global_types must be None, a tuple of type names or a mapping of backend name -> tuple, "
                    f"got {types!r}")
    return None
