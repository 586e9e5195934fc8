"""Tracing below the root, for models whose own forward ``torch.fx`` cannot trace.

A Hugging Face BERT's forward builds its attention mask with item assignment on a tensor
and its attention calls take ``**kwargs``; symbolic tracing fails there, but most of what
quantization is about (the Linear layers, the residual adds) sits in small submodules
that do trace. :func:`find_parts` walks the module tree top-down:

- a module traces (as it was called on the example inputs, see ``trace_call``), and its
  traced graph computes the same outputs as the module on those inputs → it becomes a
  *part*: the model holds its prepared GraphModule in its place;
- otherwise it stays ordinary Python code (a *float* module, reported with the first line
  of the trace error) and the walk goes on into its children;
- a weighted module (Linear, Conv) reached this way is a part on its own: a one-node graph
  ``x → module(x)`` whose layer is called ``module``, so placement quantizes its input
  and output as it would inside a bigger graph.

What stays float is the code of the untraceable modules themselves (for BERT: the
embedding lookup's caller, mask arithmetic, the attention softmax/matmuls); its tensors
are quantized where a part consumes them (the part's input quantizers observe the
boundary).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping

import attrs
import torch
from torch import fx, nn

from quanta.errors import QuantizationError

from .tracer import CONCRETE_TYPES, bind_call, trace_call

__all__ = ["TracedPart", "FloatPart", "ModuleCall", "capture_calls", "find_parts", "share_structure",
           "WEIGHTED_LEAF_NAME"]

#: name of the weighted module inside the one-node graph of a weighted part.
WEIGHTED_LEAF_NAME = "module"


@attrs.define
class TracedPart:
    """A submodule replaced by its traced (then prepared) GraphModule.

    ``name``: its path in the model; ``module_type``: the original class name;
    ``graph_module``: the GraphModule; ``inputs``: the example values in placeholder order;
    ``weighted_leaf``: the part is one weighted module (its layer is ``graph_module.module``).
    """

    name: str
    module_type: str
    graph_module: fx.GraphModule
    inputs: tuple
    weighted_leaf: bool = False

    def layer_name(self, local: str) -> str:
        """The model-level name of ``local``, a module name inside ``graph_module``."""
        if self.weighted_leaf and local == WEIGHTED_LEAF_NAME:
            return self.name
        return f"{self.name}.{local}" if self.name else local


@attrs.frozen
class FloatPart:
    """A module left as float Python code: ``name``, ``module_type`` and why (``reason``)."""

    name: str
    module_type: str
    reason: str


@attrs.define
class ModuleCall:
    """The first call of one module during the example forward, and how many calls followed.

    ``consistent`` is False when a later call passed arguments of other kinds (a tensor where
    the first passed None, another flag value): one traced graph cannot serve both.
    """

    args: tuple
    kwargs: dict
    count: int = 1
    consistent: bool = True


def _kinds(args: tuple, kwargs: Mapping[str, Any]) -> tuple:
    def kind(v):
        return ("value", v) if isinstance(v, CONCRETE_TYPES) else ("input", type(v).__name__)

    return tuple(kind(a) for a in args), tuple(sorted((k, kind(v)) for k, v in kwargs.items()))


def capture_calls(model: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, ModuleCall]:
    """Run ``model(*args, **kwargs)`` once (eval mode, no grad) and record each module's call.

    Returns ``{module name: ModuleCall}`` (the root is ``""``); modules that were not called
    are absent. The model's train/eval flags are restored.
    """
    calls: dict[str, ModuleCall] = {}

    def hook_for(name):
        def hook(_module, a, kw):
            seen = calls.get(name)
            if seen is None:
                calls[name] = ModuleCall(tuple(a), dict(kw))
                return
            seen.count += 1
            if _kinds(tuple(a), kw) != _kinds(seen.args, seen.kwargs):
                seen.consistent = False

        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(hook_for(n), with_kwargs=True) for n, m in model.named_modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(*args, **dict(kwargs))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return calls


def share_structure(module: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every Parameter and buffer with ``module``.

    Swapping a submodule in the copy leaves ``module``'s own tree as it was (``inplace``
    prepare: an optimizer built on the model's parameters keeps working).
    """
    new = copy.copy(module)
    # Fresh containers (parameters, buffers, children, hook tables); the tensors are shared.
    new.__dict__ = {k: (v.copy() if isinstance(v, (dict, OrderedDict)) else v) for k, v in module.__dict__.items()}
    new._modules = {k: (share_structure(v) if v is not None else None) for k, v in module._modules.items()}
    return new


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _same_outputs(gm: nn.Module, inputs: tuple, module: nn.Module, call: ModuleCall) -> str | None:
    """None when ``gm(*inputs)`` equals ``module(*call.args, **call.kwargs)``, else why not."""
    modes = {m: m.training for m in [*gm.modules(), *module.modules()]}
    try:
        gm.eval()
        module.eval()
        with torch.no_grad():
            got, want = _tensors(gm(*inputs)), _tensors(module(*call.args, **call.kwargs))
    except Exception as exc:  # the graph ran into a guard or a missing attribute
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"the traced graph fails on the example inputs: {type(exc).__name__}: {first}"
    finally:
        for m, mode in modes.items():
            m.training = mode
    if len(got) != len(want):
        return f"the traced graph returns {len(got)} tensors, the module {len(want)}"
    for a, b in zip(got, want):
        if a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5):
            return "the traced graph's outputs differ from the module's on the example inputs"
    return None


def _weighted_part(name: str, module: nn.Module, call: ModuleCall) -> TracedPart:
    bound = bind_call(module, call.args, call.kwargs)
    if not all(isinstance(v, torch.Tensor) for v in bound.arguments.values()):
        raise QuantizationError(f"weighted module {name!r} called with non-tensor arguments", name)
    graph = fx.Graph()
    placeholders = [graph.placeholder(p) for p in bound.arguments]
    graph.output(graph.call_module(WEIGHTED_LEAF_NAME, tuple(placeholders)))
    gm = fx.GraphModule({WEIGHTED_LEAF_NAME: module}, graph, type(module).__name__)
    return TracedPart(name, type(module).__name__, gm, tuple(bound.arguments.values()), weighted_leaf=True)


def _relative(names: Iterable[str], prefix: str) -> set[str]:
    if not prefix:
        return set(names)
    return {n[len(prefix) + 1:] for n in names if n.startswith(prefix + ".")}


def find_parts(model: nn.Module, calls: Mapping[str, ModuleCall], *, is_weighted: Callable[[nn.Module], bool],
               leaf_types: tuple[type, ...], float_leaves: Iterable[str] = (),
               root_reason: str | None = None) -> tuple[list[TracedPart], list[FloatPart]]:
    """Walk ``model``'s children top-down: the largest submodules that trace become parts.

    ``calls``: from :func:`capture_calls`; ``is_weighted``: the backend's weighted-module test;
    ``leaf_types``: kept opaque inside graphs (the weighted types); ``float_leaves``: module
    names left float (``module_name_configs: null``); ``root_reason``: why the root itself
    did not trace (the root is reported as float with it).

    Returns ``(parts, float_modules)``; parts are disjoint, in module order.
    """
    leaves = set(float_leaves)
    parts: list[TracedPart] = []
    floats: list[FloatPart] = []
    if root_reason is not None:
        floats.append(FloatPart("", type(model).__name__, root_reason))

    def visit(name: str, module: nn.Module) -> None:
        cls = type(module).__name__
        if name in leaves:
            floats.append(FloatPart(name, cls, "module_name_configs: null"))
            return
        call = calls.get(name)
        if call is None:  # a container (ModuleList) or an unused module: its children may be called
            if is_weighted(module):
                floats.append(FloatPart(name, cls, "not called on the example inputs"))
            for child, sub in module.named_children():
                visit(f"{name}.{child}", sub)
            return
        reason = None
        if not call.consistent:
            reason = f"called {call.count} times with arguments of different kinds"
        else:
            try:
                if is_weighted(module):
                    part = _weighted_part(name, module, call)
                else:
                    gm, inputs = trace_call(module, call.args, call.kwargs, _relative(leaves, name), leaf_types)
                    part = TracedPart(name, cls, gm, inputs)
            except QuantizationError as exc:
                reason = getattr(exc, "trace_reason", str(exc))
            else:
                reason = _same_outputs(part.graph_module, part.inputs, module, call)
                if reason is None:
                    parts.append(part)
                    return
        floats.append(FloatPart(name, cls, reason))
        for child, sub in module.named_children():
            visit(f"{name}.{child}" if name else child, sub)

    for child, sub in model.named_children():
        visit(child, sub)
    return parts, floats
