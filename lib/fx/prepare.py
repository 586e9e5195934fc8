"""Graph passes that turn a traced model into its fake-quantized training form.

1. ``fuse_conv_bn``: conv → bn (single user) becomes one :class:`ConvBnQAT` at the conv's name.
2. ``swap_weighted``: quantized Linear/Conv modules become their fake-quant forms (same Parameters).
3. ``insert_activation_quantizers``: an :class:`ActivationFakeQuantize` after each quantized op's
   output (after a fused ReLU, if one follows) and before each of its float inputs (model inputs,
   outputs of float ops); inputs reached through pass-through ops (pool, flatten, reshape) from
   a quantized output are left as they are.

Which ops are which comes from the backend's :class:`~quanta.fx.rules.ActivationRules`.
"""

from __future__ import annotations

import contextlib
import io
from typing import Callable, Mapping

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from quanta._records.spec import QuantSpec

from .fake_quant import ActivationFakeQuantize, ConvBnQAT, QAT_WEIGHTED, to_qat_module
from .learnable import LearnableWeightFakeQuantize
from .rules import ActivationRules

__all__ = ["fuse_conv_bn", "swap_weighted", "insert_activation_quantizers", "propagate_shapes", "is_float_tensor",
           "assume_float_tensors"]


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Record each node's output metadata (``node.meta['tensor_meta']``) with one forward in eval
    mode under no_grad, so batch-norm statistics and the caller's train/eval flags are untouched."""
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        # ShapeProp prints the traceback of a failing node itself; the caller reports the error.
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*example_inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode


def assume_float_tensors(gm: fx.GraphModule, rules: ActivationRules) -> None:
    """Without a forward (the example input does not run): mark as float tensors the graph inputs,
    module outputs and outputs of the ops the rules name (quantized, fused or pass-through ops)."""
    meta = TensorMetadata(shape=torch.Size(), dtype=torch.float32, requires_grad=False, stride=(),
                          memory_format=None, is_quantized=False, qparams={})
    for node in gm.graph.nodes:
        mod = _module(gm, node)
        if node.op in ("placeholder", "call_module") or (node.op in ("call_function", "call_method") and (
                rules.is_quantized_function(node, mod) or rules.is_fused_activation(node, mod)
                or rules.is_passthrough(node, mod))):
            node.meta["tensor_meta"] = meta


#: ops whose output is never negative (the ``nonnegative_scheme`` sites).
_RELUS = (torch.nn.ReLU, torch.nn.ReLU6, torch.relu, torch.relu_, torch.nn.functional.relu,
          torch.nn.functional.relu_, torch.nn.functional.relu6, "relu", "relu_")


def _is_relu(node: fx.Node, mod) -> bool:
    if node.op == "call_module":
        return isinstance(mod, tuple(t for t in _RELUS if isinstance(t, type)))
    return node.op in ("call_function", "call_method") and any(node.target is t or node.target == t for t in _RELUS
                                                               if not isinstance(t, type))


def is_float_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return isinstance(meta, TensorMetadata) and meta.dtype.is_floating_point


def _module(gm: fx.GraphModule, node: fx.Node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def fuse_conv_bn(gm: fx.GraphModule, rules: ActivationRules, specs: Mapping[str, QuantSpec],
                 learnable: bool = False) -> list[str]:
    """Replace each quantized conv → bn pair by a ConvBnQAT at the conv's name. Returns fused conv names.
    ``learnable``: learnable weight qparams (:mod:`quanta.fx.learnable`)."""
    fused = []
    for node in list(gm.graph.nodes):
        bn = _module(gm, node)
        if bn is None or not isinstance(bn, rules.batch_norms) or not node.args:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv = gm.get_submodule(src.target)
        if type(conv) not in tuple(rules.foldable_convs) or specs.get(src.target) is None:
            continue
        if not bn.track_running_stats or bn.running_var is None:
            continue
        qat = ConvBnQAT(conv, bn, specs[src.target])
        if learnable:  # initialised from the bn-folded weight, which is what it quantizes
            with torch.no_grad():
                folded = qat.folded()[0]
            qat.weight_fake_quant = LearnableWeightFakeQuantize(specs[src.target], folded)
        gm.add_submodule(src.target, qat)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        fused.append(src.target)
    return fused


def swap_weighted(gm: fx.GraphModule, rules: ActivationRules, specs: Mapping[str, QuantSpec],
                  learnable: bool = False) -> list[str]:
    """Give each quantized Linear/Conv its fake-quant form. Returns the names swapped."""
    swapped = []
    for node in gm.graph.nodes:
        mod = _module(gm, node)
        if mod is None or not rules.is_weighted(mod) or specs.get(node.target) is None:
            continue
        if type(mod) not in QAT_WEIGHTED:
            continue
        weight_fq = LearnableWeightFakeQuantize(specs[node.target], mod.weight.detach()) if learnable else None
        gm.add_submodule(node.target, to_qat_module(mod, specs[node.target], weight_fq))
        swapped.append(node.target)
    return swapped


def _is_quantized_module(mod) -> bool:
    return isinstance(mod, (ConvBnQAT, *QAT_WEIGHTED.values()))


def insert_activation_quantizers(gm: fx.GraphModule, rules: ActivationRules,
                                 make_quantizer: Callable[..., ActivationFakeQuantize],
                                 skip: set[str] = frozenset(), sites: str = "inputs_and_outputs",
                                 nonnegative_scheme: bool = False) -> list[str]:
    """Insert activation fake-quantizers (see the module docstring). Returns their module names.

    ``make_quantizer(site)`` builds one quantizer; ``skip`` holds module names left float.
    ``nonnegative_scheme``: a quantizer of a ReLU/ReLU6 output (never negative: after a fused relu,
    or on an input that a relu produces) is built with ``make_quantizer(site, nonnegative=True)``
    (coremltools quantizes those affine).
    ``sites="weighted_inputs"`` quantizes only the inputs of weighted modules (the int8 GEMM
    inputs of SmoothQuant-style W8A8): their outputs, adds, matmuls and whatever feeds a
    layer norm stay float, keeping a transformer's outlier channels intact.
    Needs ``propagate_shapes`` first (only floating-point tensors are quantized).
    """
    outputs = sites == "inputs_and_outputs"
    graph = gm.graph
    quantizer_nodes: set[fx.Node] = set()
    input_quantizer: dict[fx.Node, fx.Node] = {}
    names: list[str] = []

    def add_quantizer(after: fx.Node, site: str, nonnegative: bool = False) -> fx.Node:
        name = f"{after.name}_act_fq"
        gm.add_submodule(name, make_quantizer(site, nonnegative=True) if nonnegative else make_quantizer(site))
        anchor = after
        if after.op == "placeholder":  # keep every placeholder ahead of the body
            anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(anchor):
            q = graph.call_module(name, (after,))
        q.meta["tensor_meta"] = after.meta.get("tensor_meta")
        quantizer_nodes.add(q)
        names.append(name)
        return q

    def quantized_source(node: fx.Node) -> bool:
        seen = node
        while True:
            if seen in quantizer_nodes:
                return True
            if not rules.is_passthrough(seen, _module(gm, seen)):
                return False
            inputs = [n for n in seen.all_input_nodes if is_float_tensor(n) or n in quantizer_nodes]
            if len(inputs) != 1:
                return False
            seen = inputs[0]

    for node in list(graph.nodes):
        if node in quantizer_nodes:
            continue
        mod = _module(gm, node)
        if node.op == "call_module":
            if node.target in skip or not _is_quantized_module(mod):
                continue
        elif not (outputs and rules.is_quantized_function(node) and is_float_tensor(node)):
            continue
        site = node.target if node.op == "call_module" else node.name
        # Inputs first: a float producer gets one shared quantizer for all quantized consumers.
        for arg in list(node.all_input_nodes):
            if not is_float_tensor(arg) or quantized_source(arg):
                continue
            if arg not in input_quantizer:
                input_quantizer[arg] = add_quantizer(arg, f"input of {site}",
                                                     nonnegative_scheme and _is_relu(arg, _module(gm, arg)))
            node.replace_input_with(arg, input_quantizer[arg])
        if not outputs:
            continue
        out = node
        users = list(node.users)
        if len(users) == 1 and rules.is_fused_activation(users[0], _module(gm, users[0])) \
                and users[0].all_input_nodes[:1] == [node]:
            out = users[0]
        if not is_float_tensor(out):
            continue
        q = add_quantizer(out, f"output of {site}", nonnegative_scheme and _is_relu(out, _module(gm, out)))
        out.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
    return names
