"""compat's ``LinearQuantizer.prepare``: torch.ao's ``prepare_qat_fx``, then coremltools' graph passes.

After ``prepare_qat_fx`` (with :func:`quanta.compat._ao_qconfig.qconfig_mapping` and
:func:`quanta.compat._ao_backend.backend_config`), these passes do what coremltools' QAT
preparation does to the prepared graph, written here with torch.ao's public names:

- with ``quantization_scheme: symmetric``, the quantizer after a layer whose output is never
  negative (ReLU, ReLU6, ConvReLU/LinearReLU fused modules, add + relu, a dropout after one of
  them) becomes affine (all 256 codes), and so does an add or cat whose inputs are all affine;
  a cat with any symmetric input keeps symmetric quantizers for all;
- a fused conv/linear + fixed-qparams activation keeps that activation's fixed qparams;
- Embedding weights get integer (not float) qparams, per channel;
- the quantizer after a dropout is removed (dropout only scales; in eval it is a no-op);
- learnable quantizers of weights are sized from the weight (so an optimizer built right after
  ``prepare`` sees their parameters).
"""

from __future__ import annotations

import operator
from collections import defaultdict
from typing import Any

import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.quantization as aoq
from torch import fx, nn

from quanta.compat._ao_backend import FIXED_QPARAMS_OPS, share_qparams_ops
from quanta.compat._ao_convt_bn import QAT_BN_ACT_T
from quanta.compat._ao_fused import QAT_ACT, QAT_BN_ACT
from quanta.compat._ao_modules import LearnableFakeQuantize

__all__ = ["prepare_qat", "is_activation_quantizer"]

_SCALE_ONLY = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_ALWAYS_AFFINE = {nn.ReLU, nn.functional.relu, nn.functional.relu_, nn.ReLU6, nni.ConvReLU1d, nniqat.ConvReLU1d,
                  nni.ConvReLU2d, nniqat.ConvReLU2d, nni.ConvReLU3d, nniqat.ConvReLU3d, nni.ConvBnReLU1d,
                  nniqat.ConvBnReLU1d, nni.ConvBnReLU2d, nniqat.ConvBnReLU2d, nni.ConvBnReLU3d, nniqat.ConvBnReLU3d,
                  nni.LinearReLU, nniqat.LinearReLU, nni.BNReLU2d, nni.BNReLU3d}
_FUSED_QAT = tuple(QAT_ACT.values()) + tuple(QAT_BN_ACT.values()) + tuple(QAT_BN_ACT_T.values())
_OBSERVER_PARAMS = ["dtype", "qscheme", "reduce_range", "quant_min", "quant_max", "eps"]


def is_activation_quantizer(module: Any) -> bool:
    """A torch.ao fake quantizer (FakeQuantize, FixedQParamsFakeQuantize, quanta's LearnableFakeQuantize)."""
    return isinstance(module, aoq.FakeQuantizeBase)


def _quantized(module: Any) -> bool:
    app = getattr(module, "activation_post_process", None)
    return app is not None and app.dtype in (torch.qint8, torch.quint8)


def _module(model: fx.GraphModule, node: Any):
    if getattr(node, "op", None) == "call_module":
        return model.get_submodule(node.target)
    return None


def _combine(node: fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    if node.target in (operator.add, torch.add):
        return "add"
    if node.target in (operator.mul, torch.mul):
        return "mul"
    if (node.target is nn.functional.relu and len(node.args) == 1 and isinstance(node.args[0], fx.Node)
            and node.args[0].op == "call_function" and node.args[0].target in (operator.add, torch.add)):
        return "add_relu"
    if node.target is torch.cat:
        return "cat"
    return None


def _affine_copy(module: aoq.FakeQuantizeBase) -> aoq.FakeQuantizeBase:
    """The same activation quantizer with a per-tensor affine qscheme."""
    app = module.activation_post_process
    kwargs = {k: getattr(app, k) for k in _OBSERVER_PARAMS if hasattr(app, k)}
    if hasattr(app, "averaging_constant"):
        kwargs["averaging_constant"] = app.averaging_constant
    if hasattr(app, "ema_ratio"):
        kwargs.pop("averaging_constant", None)
        kwargs["ema_ratio"] = app.ema_ratio
    kwargs["qscheme"] = torch.per_tensor_affine
    if isinstance(module, LearnableFakeQuantize):
        new = LearnableFakeQuantize(observer=type(app), **kwargs)
    else:
        new = aoq.FakeQuantize(observer=type(app), **kwargs)
    new.to(next(iter(module.buffers())).device)
    return new


class _Passes:
    def __init__(self, model: fx.GraphModule, qconfig_mapping, scheme: str):
        self.model = model
        self.mapping = qconfig_mapping
        self.shared = share_qparams_ops()
        self.groups: dict[int, list[fx.Node]] = defaultdict(list)
        for node in model.graph.nodes:
            mod = _module(model, node)
            if is_activation_quantizer(mod) and _quantized(mod):
                self.groups[id(mod)].append(node)
        self.to_replace: dict[fx.Node, list[fx.Node]] = {}
        self.new: dict[fx.Node, aoq.FakeQuantizeBase] = {}
        if scheme == "symmetric":
            self.mark_always_affine()
            self.mark_affine_combinations()
        self.mark_fixed_qparams()

    def mark(self, node: fx.Node, replacement: aoq.FakeQuantizeBase | None = None) -> None:
        if len(node.users) != 1:
            return
        nxt = next(iter(node.users))
        mod = _module(self.model, nxt)
        if not (is_activation_quantizer(mod) and _quantized(mod)):
            return
        shared = []
        for child in self.groups[id(mod)]:
            consumer = child.args[0]
            key = type(_module(self.model, consumer)) if consumer.op == "call_module" else (
                consumer.target if consumer.op == "call_function" else None)
            if key in self.shared:
                shared.append(child)
                self.to_replace[child] = []
        self.to_replace[nxt] = shared
        self.new[nxt] = replacement if replacement is not None else _affine_copy(mod)

    def mark_always_affine(self) -> None:
        for node in self.model.graph.nodes:
            if node.op == "call_module":
                layer = _module(self.model, node)
                if type(layer) in _ALWAYS_AFFINE:
                    self.mark(node)
                elif isinstance(layer, _FUSED_QAT) and type(layer.act) in _ALWAYS_AFFINE:
                    self.mark(node)
                elif isinstance(layer, _SCALE_ONLY):
                    arg = _module(self.model, node.args[0])
                    if is_activation_quantizer(arg) and node.args[0] in self.to_replace:
                        self.mark(node)
            elif node.op == "call_function":
                kind = _combine(node)
                if kind == "add_relu" or (kind is None and node.target in _ALWAYS_AFFINE):
                    self.mark(node)

    def mark_affine_combinations(self) -> None:
        for node in self.model.graph.nodes:
            kind = _combine(node)
            if kind is None or kind == "add_relu":
                continue
            args = node.args[0] if kind == "cat" else node.args
            schemes = []
            for arg in args:
                mod = _module(self.model, arg)
                if mod is not None and (type(mod) in _ALWAYS_AFFINE or arg in self.to_replace):
                    schemes.append("affine")
                elif mod is not None and getattr(mod, "qscheme", None) == torch.per_tensor_affine:
                    schemes.append("affine")
                else:
                    schemes.append("symmetric")
            if all(s == "affine" for s in schemes):
                if kind != "cat":
                    self.mark(node)
            elif kind == "cat":
                for arg in args:
                    self.to_replace.pop(arg, None)
                    self.new.pop(arg, None)

    def mark_fixed_qparams(self) -> None:
        """A fused layer + fixed-qparams activation (sigmoid...): its output quantizer takes that
        activation's fixed qparams (unless the output is concatenated with others)."""
        fixed = self.mapping.object_type_qconfigs
        for node in self.model.graph.nodes:
            layer = _module(self.model, node)
            if not isinstance(layer, _FUSED_QAT) or type(layer.act) not in FIXED_QPARAMS_OPS:
                continue
            if any(child.target is torch.cat for child in self.groups.get(id(layer), [])):
                continue
            if type(layer.act) in fixed and fixed[type(layer.act)] is not None:
                self.mark(node, fixed[type(layer.act)].activation())

    def replace(self) -> None:
        done = set()
        for node, new in self.new.items():
            if node in done:
                continue
            self.model.delete_submodule(node.target)
            self.model.add_submodule(node.target, new)
            done.add(node)
            for child in self.to_replace.get(node, []):
                if child not in done:
                    parent, _, name = child.target.rpartition(".")
                    setattr(self.model.get_submodule(parent) if parent else self.model, name, new)
                    done.add(child)
        self.model.recompile()


def _embedding_weights(model: nn.Module, scheme: str) -> None:
    """Embedding weights: integer qparams per channel (torch.ao's default there is float qparams)."""
    symmetric = scheme == "symmetric"
    for module in model.modules():
        if not isinstance(module, nn.Embedding) or not is_activation_quantizer(getattr(module, "weight_fake_quant", None)):
            continue
        old = module.weight_fake_quant
        observer = type(module.qconfig.weight().activation_post_process)
        qscheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
        cls = LearnableFakeQuantize if isinstance(old, LearnableFakeQuantize) else aoq.FakeQuantize
        new = cls(observer=observer, dtype=old.dtype, qscheme=qscheme, ch_axis=0)
        if isinstance(new, LearnableFakeQuantize):
            new.set_param_shape(module.weight.shape)
        module.weight_fake_quant = new.to(module.weight.device)


def _size_learnable(model: nn.Module) -> None:
    for module in model.modules():
        fq = getattr(module, "weight_fake_quant", None)
        if isinstance(fq, LearnableFakeQuantize) and fq.ch_axis >= 0 and hasattr(module, "weight"):
            weight = module.weight
            fq.set_param_shape(weight.shape)
            fq.to(weight.device)


def _remove_after_dropout(model: fx.GraphModule) -> None:
    remove = set()
    for node in model.graph.nodes:
        if node.op == "call_module" and isinstance(_module(model, node), _SCALE_ONLY):
            if is_activation_quantizer(_module(model, node.prev)) and is_activation_quantizer(_module(model, node.next)):
                remove.add(node.next)
    for node in remove:
        node.replace_all_uses_with(node.prev)
        model.delete_submodule(node.target)
        model.graph.erase_node(node)
    model.recompile()


def prepare_qat(model: nn.Module, example_inputs: tuple, mapping, backend, scheme: str,
                non_traceable: list[str], preserved: list[str]) -> fx.GraphModule:
    """``prepare_qat_fx`` with ``mapping``/``backend``, then coremltools' passes (see the module)."""
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    custom = PrepareCustomConfig().set_non_traceable_module_names(list(non_traceable or []))
    custom = custom.set_preserved_attributes(list(preserved or []))
    try:
        prepared = prepare_qat_fx(model, mapping, example_inputs, prepare_custom_config=custom, backend_config=backend)
    except Exception as exc:  # torch.fx / torch.ao: say what to do, keep the original error chained
        from quanta.errors import QuantizationError

        raise QuantizationError(
            f"torch.ao's prepare_qat_fx could not prepare {type(model).__name__} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); a submodule that torch.fx cannot trace can be "
            "listed in non_traceable_module_names (it then stays float), as in coremltools") from exc
    _size_learnable(prepared)
    passes = _Passes(prepared, mapping, scheme)
    _embedding_weights(prepared, scheme)
    passes.replace()
    _remove_after_dropout(prepared)
    return prepared
