"""Symbolic tracing with errors that name the module that broke the trace.

``trace_call`` traces a module *as it is called*: tensor arguments become graph inputs, and
``None``/``bool``/``int``/``float``/``str`` arguments are fixed to the values of that call
(torch.fx guards them), so a keyword-input model such as a Hugging Face BERT traces the
branch its real inputs take (``position_ids=None`` → the graph builds them).
"""

from __future__ import annotations

import fnmatch
import inspect
import re
from typing import Any, Iterable, Mapping

from torch import fx, nn

from quanta.errors import QuantizationError

__all__ = ["QuantTracer", "trace", "trace_call", "bind_call", "names_matching", "CONCRETE_TYPES"]

#: argument types fixed at trace time (guarded by torch.fx); anything else is a graph input.
CONCRETE_TYPES = (bool, int, float, str, type(None))


def names_matching(patterns: Iterable[str], names: Iterable[str]) -> set[str]:
    """Module names matched by exact names, globs or ``re:`` patterns (the recipe's name syntax)."""
    names = list(names)
    out: set[str] = set()
    for p in patterns:
        if p.startswith("re:"):
            out |= {n for n in names if re.fullmatch(p[3:], n)}
        else:
            out |= {n for n in names if n == p or fnmatch.fnmatchcase(n, p)}
    return out


class QuantTracer(fx.Tracer):
    """``torch.fx.Tracer`` that keeps ``leaf_names`` / ``leaf_types`` opaque and records the
    path of the module being traced, so a failure can name it (``failed_module``)."""

    def __init__(self, leaf_names: Iterable[str] = (), leaf_types: tuple[type, ...] = ()):
        super().__init__()
        self.leaf_names = set(leaf_names)
        self.leaf_types = tuple(leaf_types)
        self.path_stack: list[str] = []
        self.failed_module: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self.path_stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # the innermost module sees the error first
                self.failed_module = path
            raise
        finally:
            self.path_stack.pop()


def bind_call(module: nn.Module, args: tuple = (), kwargs: Mapping[str, Any] | None = None) -> inspect.BoundArguments:
    """``module.forward``'s parameters bound to one call (defaults applied)."""
    bound = inspect.signature(module.forward).bind(*args, **dict(kwargs or {}))
    bound.apply_defaults()
    return bound


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _trace_error(model: nn.Module, where: str | None, exc: Exception) -> QuantizationError:
    reason = _first_line(exc)
    if where:
        cls = type(model.get_submodule(where)).__name__
        msg = (f"torch.fx cannot trace module {where!r} ({cls}): {reason}. Leave it out with "
               f"module_name_configs: {{{where!r}: null}} (it becomes an opaque leaf left in float), "
               f"make its forward traceable, or set untraceable: submodules (trace the submodules that do)")
        err = QuantizationError(msg, where)
    else:
        msg = (f"torch.fx cannot trace the model's own forward ({type(model).__name__}): {reason}. Only "
               f"submodules can be left out (module_name_configs: {{name: null}}); make the top-level forward "
               f"traceable, or set untraceable: submodules (trace the submodules that do, keep the rest float)")
        err = QuantizationError(msg)
    # For reports: the first line of torch.fx's error, and where inside ``model`` it broke.
    err.trace_reason = f"in {where!r}: {reason}" if where else reason
    return err


def trace(model: nn.Module, leaf_names: Iterable[str] = (), leaf_types: tuple[type, ...] = ()) -> fx.GraphModule:
    """Symbolically trace ``model`` into a GraphModule (leaves kept as ``call_module`` nodes).

    Raises QuantizationError naming the innermost module whose forward could not be traced,
    and how to leave it out (``module_name_configs: {name: null}`` makes it an opaque leaf).
    """
    gm, _ = trace_call(model, None, None, leaf_names, leaf_types)
    return gm


def trace_call(model: nn.Module, args: tuple | None = (), kwargs: Mapping[str, Any] | None = None,
               leaf_names: Iterable[str] = (), leaf_types: tuple[type, ...] = ()) -> tuple[fx.GraphModule, tuple]:
    """Trace ``model`` as called with ``model(*args, **kwargs)``; ``args=None``: no call, every
    parameter is a graph input (plain ``torch.fx.symbolic_trace``).

    Parameters whose value in the call is ``None``/bool/int/float/str are fixed to it (the
    graph asserts the same value at run time); the others are graph inputs. The GraphModule
    keeps ``forward``'s parameter names, so it can be called as the module was.

    Returns ``(graph_module, inputs)``: ``inputs`` are the call's values in the order of the
    graph's placeholders (for shape propagation). Raises QuantizationError as :func:`trace`
    does; ``error.trace_reason`` holds the first line of torch.fx's error (and where).
    """
    concrete: dict[str, Any] = {}
    inputs: tuple = ()
    params: list[str] = []
    if args is not None:
        try:
            bound = bind_call(model, args, kwargs)
        except TypeError as exc:
            raise _trace_error(model, None, exc) from exc
        params = list(bound.arguments)
        concrete = {k: v for k, v in bound.arguments.items() if isinstance(v, CONCRETE_TYPES)}
        inputs = tuple(bound.arguments.values())
    tracer = QuantTracer(leaf_names, leaf_types)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as exc:
        raise _trace_error(model, tracer.failed_module, exc) from exc
    # torch.fx renames a fixed parameter ``p`` to ``p_1``; give it its name back so callers
    # that pass it by keyword (``position_ids=None``) still can.
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if concrete and len(placeholders) == len(params):
        for node, name in zip(placeholders, params):
            if name in concrete and node.target == f"{name}_1":
                node.target = name
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name if name.isidentifier() else "GraphModule"), inputs
