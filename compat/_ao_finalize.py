"""compat's ``LinearQuantizer.finalize``: torch.ao's reference conversion, then quanta records.

``convert_to_reference_fx`` (torch.ao, public) turns the trained prepared model into torch.ao's
reference form, as coremltools' ``finalize`` does: ``quantize_per_tensor``/``dequantize`` pairs
for activations and reference modules (``torch.ao.nn.quantized.reference.Linear``, inside
``LinearReLU``/``ConvReLU2d`` fused containers...) holding each weight's scale and zero point.
Then every reference module's weight becomes a quanta record (:func:`quanta.record.attach_record`
of :func:`quanta.quantize_weight` with the fake quantizer's own scale/zero point, so the codes are
the ones training saw), which the Core ML annotation, ``quanta.record.records`` and the report read.
"""

from __future__ import annotations

from functools import lru_cache

import attrs
from typing import Any

import torch
from torch import fx, nn

from quanta.compat._ao_modules import is_symmetric

__all__ = ["weight_quantizers", "convert", "record_weights"]


def weight_quantizers(prepared: nn.Module) -> dict[str, Any]:
    """``{module name: its weight fake quantizer}`` of a prepared model (integer weights only)."""
    out = {}
    for name, module in prepared.named_modules():
        fq = getattr(module, "weight_fake_quant", None)
        if fq is not None and getattr(fq, "dtype", None) in (torch.qint8, torch.quint8):
            out[name] = fq
    return out


def convert(prepared: fx.GraphModule, mapping, backend, preserved: list[str]) -> fx.GraphModule:
    """torch.ao's reference conversion of ``prepared`` (in place; eval mode)."""
    from torch.ao.quantization.fx.custom_config import ConvertCustomConfig
    from torch.ao.quantization.quantize_fx import convert_to_reference_fx

    prepared.eval()
    custom = ConvertCustomConfig().set_preserved_attributes(list(preserved or []))
    # the qconfigs recorded at prepare apply (``mapping`` again would re-check fused modules: torch.ao
    # requires one qconfig for all members of a fused module, which a fixed-qparams activation is not)
    del mapping
    return convert_to_reference_fx(prepared, convert_custom_config=custom,
                                   backend_config=backend)


@lru_cache(maxsize=None)
def _spec(bits: int, signed: bool, symmetric: bool, per_channel: bool):
    from quanta import load_recipe

    scheme: Any = {"name": "symmetric", "grid": "full"} if symmetric else "affine"
    recipe = load_recipe({"algorithm": "rtn", "global_config": {
        "weight_dtype": f"{'' if signed else 'u'}int{bits}", "quantization_scheme": scheme,
        "granularity": "per_channel" if per_channel else "per_tensor"}})
    return recipe.global_config


def _reference_module(converted: nn.Module, name: str) -> nn.Module | None:
    try:
        module = converted.get_submodule(name)
    except AttributeError:
        return None
    if isinstance(module, nn.Sequential) and len(module) and hasattr(module[0], "weight_scale"):
        return module[0]
    return module if hasattr(module, "weight_scale") else None


def _torch_codes(weight: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, axis: int | None, qmin: int,
                 qmax: int) -> torch.Tensor:
    """The codes torch.ao's fake quantization computes (``round(w * (1 / scale)) + zero_point``: it
    multiplies by the inverse scale, which rounds a few exact ties differently from ``w / scale``)."""
    w = weight.detach().float().cpu()
    shape = [1] * w.dim()
    if axis is not None:
        shape[axis] = -1
    inv = 1.0 / scale.reshape(shape)
    return torch.clamp(torch.round(w * inv) + zp.reshape(shape).float(), qmin, qmax)


def record_weights(converted: nn.Module, quantizers: dict[str, Any]) -> list[str]:
    """Attach a quanta record to each reference module's weight, from its fake quantizer's
    (learned or observed) scale and zero point; returns the names of the recorded modules."""
    from quanta.fx.learnable import FixedQParams
    from quanta.fx.fake_quant import scheme_for
    from quanta.record import attach_record
    from quanta._run.weights import quantize_weight

    done = []
    for name, fq in quantizers.items():
        module = _reference_module(converted, name)
        if module is None:
            continue
        qmin, qmax = int(fq.quant_min), int(fq.quant_max)
        bits = (qmax - qmin + 1).bit_length() - 1
        per_channel = getattr(fq, "ch_axis", -1) >= 0 and fq.qscheme in (
            torch.per_channel_symmetric, torch.per_channel_affine, torch.per_channel_affine_float_qparams)
        symmetric = is_symmetric(fq.qscheme)
        spec = _spec(bits, qmin < 0, symmetric, per_channel)
        scale, zp = fq.calculate_qparams()
        scale, zp = scale.detach().float().reshape(-1).cpu(), zp.detach().reshape(-1).to(torch.int32).cpu()
        has_zero = not (symmetric and qmin < 0)
        weight = module.weight.detach()
        channel_axis = int(getattr(fq, "ch_axis", 0)) if per_channel else 0
        input_axis = 0 if channel_axis == 1 else 1
        if weight.dim() == 1:
            continue
        scheme = FixedQParams(scheme_for(spec), scale, zp if has_zero else None)
        record = quantize_weight(weight.float().cpu(), spec, channel_axis=channel_axis, input_axis=input_axis,
                                 layer=name, scheme=scheme)
        record = attrs.evolve(record, codes=_torch_codes(weight, scale, zp, channel_axis if per_channel else None,
                                                         qmin, qmax).to(record.codes.dtype))
        attach_record(module, "weight", record)
        done.append(name)
    return done
