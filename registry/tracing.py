"""``QUANTA_TRACE_PLUGINS=1``: print every hook call of a plugin manager to stderr, through
pluggy's ``add_hookcall_monitoring`` (one line before the call, one line if it raised)."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Mapping, Sequence

import pluggy

__all__ = ["ENV", "tracing_requested", "trace_hook_calls"]

ENV = "QUANTA_TRACE_PLUGINS"


def tracing_requested() -> bool:
    """Whether ``QUANTA_TRACE_PLUGINS`` asks for hook-call tracing."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes")


def _short(value: Any, width: int = 60) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def trace_hook_calls(pm: pluggy.PluginManager, write: Callable[[str], Any] | None = None) -> Callable[[], None]:
    """Print each hook call of ``pm`` (its arguments and the implementing plugins) with ``write``
    (default: stderr). Returns the function that stops tracing."""
    out = write or (lambda line: print(line, file=sys.stderr, flush=True))

    def before(hook_name: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
        args = ", ".join(f"{k}={_short(v)}" for k, v in kwargs.items())
        plugins = ", ".join(impl.plugin_name for impl in reversed(impls)) or "no implementation"
        out(f"quanta hook: {hook_name}({args}) -> {plugins}")

    def after(outcome: pluggy.Result[Any], hook_name: str, impls: Sequence[pluggy.HookImpl],
              kwargs: Mapping[str, Any]) -> None:
        if outcome.exception is not None:
            out(f"quanta hook: {hook_name} raised {type(outcome.exception).__name__}: {outcome.exception}")

    return pm.add_hookcall_monitoring(before, after)
