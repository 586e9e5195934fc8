"""The quantized-weight record: integer codes, scale, zero point and the spec that made them.

A record is backend-neutral. On a torch module it lives beside the parameter as buffers
(``<param>_quanta_codes``, ``<param>_quanta_scale``, ``<param>_quanta_zero_point``) so it
follows ``.to(device)``, ``state_dict()`` and ``copy.deepcopy``; the parameter itself holds
exactly ``record.dequantize()``, so the module computes with the quantized values.
"""

from __future__ import annotations

import math
from typing import Iterator

import attrs
import torch

from quanta._records.qmath import from_groups, to_groups
from quanta._records.spec import QuantSpec

__all__ = ["QuantizedWeight", "attach_record", "read_record", "records", "declare_state", "extra_state"]


@attrs.frozen(kw_only=True, eq=False)
class QuantizedWeight:
    """An exact quantized tensor.

    Attributes:
        codes: integer codes, ``torch.int8`` (signed types) or ``torch.uint8``, the weight's shape.
        scale: float32, ``scale_shape`` (the weight's rank; see ``quanta._records.qmath.scale_shape``).
        zero_point: same shape as ``scale`` and dtype as ``codes``, or None (symmetric signed).
        spec: the QuantSpec used (its scheme, with the scheme's options, dequantizes).
        block_sizes: per-axis block sizes (0 = whole axis), coremltools' convention.
        channel_axis / input_axis: the weight's output and input axes.
        grid: ``"affine"`` (a code stands for ``(code - zero_point) * scale``) or ``"lut"`` (the
            scheme maps codes to values some other way, e.g. a table); exporters and backends
            declare which grids they store.
        lut: a per-group lookup table ``[G, L]`` (float32) when the record carries one
            (palettization), else None.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    spec: QuantSpec
    block_sizes: tuple[int, ...]
    channel_axis: int = 0
    input_axis: int = 1
    grid: str = "affine"
    lut: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """The float32 values the codes stand for, a tensor of the weight's shape.

        Delegates to the record's scheme (``spec.scheme`` with ``spec.scheme_config``):
        ``scheme.dequantize(codes, scale, zero_point)`` per group, or ``scheme.dequantize_lut``
        when the record carries a lookup table. For the affine grid that is
        ``(codes - zero_point) * scale``."""
        from quanta.registry.guard import plugin_code
        from quanta.registry.lookup import scheme_for

        scheme = scheme_for(self.spec)
        sizes = list(self.block_sizes)
        codes = to_groups(self.codes.to(torch.float32), sizes)
        scale = self.scale.reshape(-1, 1).to(torch.float32)
        with plugin_code(scheme, None):
            if self.lut is not None:
                values = scheme.dequantize_lut(codes, self.lut.reshape(scale.shape[0], -1), scale)
            else:
                zp = None if self.zero_point is None else self.zero_point.reshape(-1, 1).to(torch.float32)
                values = scheme.dequantize(codes, scale, zp)
        return from_groups(values.to(torch.float32), self.shape, sizes)

    def nbytes(self, scale_bytes: int = 2) -> int:
        """Deployed size: packed codes plus scales (fp16 by default), zero points and any table."""
        n_params = self.scale.numel()
        size = math.ceil(self.codes.numel() * self.spec.dtype.bits / 8) + n_params * scale_bytes
        if self.zero_point is not None:
            size += math.ceil(n_params * self.spec.dtype.bits / 8)
        if self.lut is not None:
            size += self.lut.numel() * scale_bytes
        return size

    def to(self, device) -> "QuantizedWeight":
        """A copy of the record on ``device``."""
        zp = None if self.zero_point is None else self.zero_point.to(device)
        lut = None if self.lut is None else self.lut.to(device)
        return attrs.evolve(self, codes=self.codes.to(device), scale=self.scale.to(device), zero_point=zp, lut=lut)


def attach_record(module: torch.nn.Module, param: str, record: QuantizedWeight,
                  values: torch.Tensor | None = None) -> None:
    """Store ``record`` on ``module`` beside parameter ``param`` and set the parameter to its values.

    ``values`` may pass ``record.dequantize()`` when the caller already has it.
    """
    weight = getattr(module, param)
    values = (record.dequantize() if values is None else values).to(weight.device, weight.dtype)
    values = values.reshape(weight.shape).contiguous()
    if values.data_ptr() == weight.data_ptr():
        values = values.clone()
    # Always new storage, never an in-place write: a copied model may share the float weight's
    # storage with the user's model (see ``Backend.copy(..., share=...)``).
    weight.data = values
    module.register_buffer(param + "_quanta_codes", record.codes)
    module.register_buffer(param + "_quanta_scale", record.scale)
    for suffix, tensor in (("_quanta_zero_point", record.zero_point), ("_quanta_lut", record.lut)):
        if tensor is not None:
            module.register_buffer(param + suffix, tensor)
        elif param + suffix in module._buffers:
            del module._buffers[param + suffix]
    meta = dict(getattr(module, "_quanta_meta", {}))
    meta[param] = (record.spec, tuple(record.block_sizes), record.channel_axis, record.input_axis, record.grid)
    setattr(module, "_quanta_meta", meta)  # plain attribute (nn.Module's setattr types it as a tensor)


def read_record(module: torch.nn.Module, param: str = "weight") -> QuantizedWeight | None:
    """The record stored for ``module.<param>``, or None when that parameter is not quantized."""
    meta = getattr(module, "_quanta_meta", {}).get(param)
    if meta is None:
        return None
    spec, block_sizes, channel_axis, input_axis, grid = meta
    buffers = module._buffers
    codes, scale = buffers[param + "_quanta_codes"], buffers[param + "_quanta_scale"]
    if codes is None or scale is None:
        return None
    return QuantizedWeight(
        codes=codes,
        scale=scale,
        zero_point=buffers.get(param + "_quanta_zero_point"),
        spec=spec,
        block_sizes=block_sizes,
        channel_axis=channel_axis,
        input_axis=input_axis,
        grid=grid,
        lut=buffers.get(param + "_quanta_lut"),
    )


def records(model: torch.nn.Module) -> dict[str, QuantizedWeight]:
    """Every record in ``model``, keyed ``"<module name>.<param>"``."""
    return dict(_iter_records(model))


def _iter_records(model: torch.nn.Module) -> Iterator[tuple[str, QuantizedWeight]]:
    for name, module in model.named_modules():
        for param in getattr(module, "_quanta_meta", {}):
            rec = read_record(module, param)
            if rec is not None:
                yield (f"{name}.{param}" if name else param), rec


def declare_state(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Store extra state an algorithm adds besides the weights (an input scale, a smoothing vector)
    as buffer ``name`` of ``module``, and declare it, so that ``inplace`` restore removes it,
    ``quanta.save``/``quanta.load`` carry it and exporters can find it (:func:`extra_state`)."""
    module.register_buffer(name, value)
    declared = tuple(getattr(module, "_quanta_state", ()))
    if name not in declared:
        setattr(module, "_quanta_state", declared + (name,))


def extra_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor declared with :func:`declare_state` in ``model``, keyed ``"<module>.<name>"``."""
    out = {}
    for mname, module in model.named_modules():
        for name in getattr(module, "_quanta_state", ()):
            out[f"{mname}.{name}" if mname else name] = module._buffers[name]
    return out
