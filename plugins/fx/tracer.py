"""Symbolic tracing with errors that name the module that broke the trace."""

from __future__ import annotations

import fnmatch
import re
from typing import Iterable

from torch import fx, nn

from quanta.errors import QuantizationError

__all__ = ["QuantTracer", "trace", "names_matching"]


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


def trace(model: nn.Module, leaf_names: Iterable[str] = (), leaf_types: tuple[type, ...] = ()) -> fx.GraphModule:
    """Symbolically trace ``model`` into a GraphModule (leaves kept as ``call_module`` nodes).

    Raises QuantizationError naming the innermost module whose forward could not be traced,
    and how to leave it out (``module_name_configs: {name: null}`` makes it an opaque leaf).
    """
    tracer = QuantTracer(leaf_names, leaf_types)
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        where = tracer.failed_module
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        if where:
            cls = type(model.get_submodule(where)).__name__
            msg = (f"torch.fx cannot trace module {where!r} ({cls}): {reason}. Leave it out with "
                   f"module_name_configs: {{{where!r}: null}} (it becomes an opaque leaf left in float), "
                   f"or make its forward traceable")
            raise QuantizationError(msg, where) from exc
        msg = (f"torch.fx cannot trace the model's own forward ({type(model).__name__}): {reason}. Only "
               f"submodules can be left out (module_name_configs: {{name: null}}); make the top-level forward "
               f"traceable, or quantize traceable submodules separately")
        raise QuantizationError(msg) from exc
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name if name.isidentifier() else "GraphModule")

