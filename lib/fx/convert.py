"""``finalize``: from the fake-quant training form to the real quantized form.

- ConvBnQAT → a plain conv holding the bn-folded weight and bias;
- fake-quant Linear/Conv → plain modules; their weights get quanta records
  (``quanta.quantize_weight`` of the (folded) weight, written with ``attach_record``), so the
  module holds exactly the dequantized values;
- each ActivationFakeQuantize → ``torch.quantize_per_tensor(x, scale, zero_point, dtype)``
  followed by ``.dequantize()``, with Python float/int constants (converts to Core ML
  ``quantize``/``dequantize`` ops at iOS17+; fake-quant ops do not convert).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import fx, nn

from quanta.errors import QuantizationError
from quanta.record import QuantizedWeight
from quanta._run.weights import quantize_weight

from .fake_quant import QAT_WEIGHTED, ActivationFakeQuantize, ConvBnQAT

__all__ = ["finalize_graph", "TORCH_QDTYPES"]

#: activation dtype name -> torch quantized dtype of ``torch.quantize_per_tensor``.
TORCH_QDTYPES = {"int8": torch.qint8, "uint8": torch.quint8}
_FLOAT_OF = {v: k for k, v in QAT_WEIGHTED.items()}

#: ``on_record(name, module, record, float_weight)``: called once per quantized weight.
OnRecord = Callable[[str, nn.Module, QuantizedWeight, torch.Tensor], None]


def _plain_copy(qat: nn.Module, cls: type) -> nn.Module:
    plain = cls.__new__(cls)
    plain.__dict__.update(qat.__dict__)
    plain._parameters = dict(qat._parameters)
    plain._buffers = dict(qat._buffers)
    plain._modules = {k: v for k, v in qat._modules.items() if k != "weight_fake_quant"}
    return plain


def _fold(fused: ConvBnQAT) -> nn.Module:
    conv = fused.conv
    with torch.no_grad():
        weight, bias = fused.folded()
    plain = type(conv).__new__(type(conv))
    plain.__dict__.update(conv.__dict__)
    plain._parameters = {"weight": nn.Parameter(weight.detach().clone(), requires_grad=conv.weight.requires_grad),
                         "bias": nn.Parameter(bias.detach().clone(), requires_grad=conv.weight.requires_grad)}
    plain._buffers = dict(conv._buffers)
    plain._modules = dict(conv._modules)
    return plain


def finalize_graph(gm: fx.GraphModule, on_record: OnRecord | None = None, unobserved: str = "error") -> fx.GraphModule:
    """Rewrite the prepared ``gm`` in place into its quantized form and return it (eval mode).

    An activation whose observer never saw data: ``unobserved="error"`` raises QuantizationError
    naming it; ``"default"`` warns and uses scale 1.0 and zero point 0 (what torch.ao's observers,
    and so coremltools' ``finalize``, return without data).
    """
    for name, mod in list(gm.named_modules()):
        if isinstance(mod, ConvBnQAT):
            spec = mod.weight_fake_quant.spec
            plain = _fold(mod)
        elif type(mod) in _FLOAT_OF:
            spec = mod.weight_fake_quant.spec
            plain = _plain_copy(mod, _FLOAT_OF[type(mod)])
        else:
            continue
        weight = plain.weight.detach()
        record = quantize_weight(weight, spec, channel_axis=0, input_axis=1, layer=name,
                                 scheme=mod.weight_fake_quant.record_scheme())
        original = weight.clone()
        if on_record is not None:
            on_record(name, plain, record, original)
        else:
            from quanta.record import attach_record

            attach_record(plain, "weight", record)
        gm.add_submodule(name, plain)

    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, ActivationFakeQuantize):
            continue
        if not mod.observed and unobserved == "default":
            warnings.warn(f"activation quantizer {node.target!r} ({mod.site}) never observed data: using scale 1.0 "
                          "and zero point 0 (torch.ao's defaults)", stacklevel=3)
            scale, zero_point = 1.0, 0
        elif not mod.observed:
            raise QuantizationError(
                f"activation quantizer {node.target!r} ({mod.site}) never observed data: run forward passes "
                f"with observers on (after the step() that reaches milestone 0) before finalize()", mod.site)
        else:
            scale, zero_point = mod.qparams()
        qdtype = TORCH_QDTYPES[str(mod.dtype)]
        with graph.inserting_before(node):
            q = graph.call_function(torch.quantize_per_tensor, (node.args[0], scale, zero_point, qdtype))
            dq = graph.call_method("dequantize", (q,))
        node.replace_all_uses_with(dq)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm.eval()
