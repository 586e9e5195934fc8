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

from .qmath import from_groups, to_groups
from .spec import QuantSpec

__all__ = ["QuantizedWeight", "attach_record", "read_record", "records"]


@attrs.frozen(kw_only=True, eq=False)
class QuantizedWeight:
    """An exact quantized tensor.

    Attributes:
        codes: integer codes, ``torch.int8`` (signed types) or ``torch.uint8``, the weight's shape.
        scale: float32, ``scale_shape`` (the weight's rank; see ``quanta.qmath.scale_shape``).
        zero_point: same shape as ``scale`` and dtype as ``codes``, or None (symmetric signed).
        spec: the QuantSpec used.
        block_sizes: per-axis block sizes (0 = whole axis), coremltools' convention.
        channel_axis / input_axis: the weight's output and input axes.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    spec: QuantSpec
    block_sizes: tuple[int, ...]
    channel_axis: int = 0
    input_axis: int = 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """``(codes - zero_point) * scale`` in float32, per group: a tensor of the weight's shape."""
        sizes = list(self.block_sizes)
        values = to_groups(self.codes.to(torch.float32), sizes)
        if self.zero_point is not None:
            values = values - self.zero_point.reshape(-1, 1).to(torch.float32)
        values = values * self.scale.reshape(-1, 1)
        return from_groups(values, self.shape, sizes)

    def nbytes(self, scale_bytes: int = 2) -> int:
        """Deployed size: packed codes plus scales (fp16 by default) and zero points."""
        n_params = self.scale.numel()
        size = math.ceil(self.codes.numel() * self.spec.dtype.bits / 8) + n_params * scale_bytes
        if self.zero_point is not None:
            size += math.ceil(n_params * self.spec.dtype.bits / 8)
        return size

    def to(self, device) -> "QuantizedWeight":
        """A copy of the record on ``device``."""
        zp = None if self.zero_point is None else self.zero_point.to(device)
        return attrs.evolve(self, codes=self.codes.to(device), scale=self.scale.to(device), zero_point=zp)


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
    if record.zero_point is not None:
        module.register_buffer(param + "_quanta_zero_point", record.zero_point)
    elif hasattr(module, param + "_quanta_zero_point"):
        delattr(module, param + "_quanta_zero_point")
    meta = dict(getattr(module, "_quanta_meta", {}))
    meta[param] = (record.spec, tuple(record.block_sizes), record.channel_axis, record.input_axis)
    module._quanta_meta = meta


def read_record(module: torch.nn.Module, param: str = "weight") -> QuantizedWeight | None:
    """The record stored for ``module.<param>``, or None when that parameter is not quantized."""
    meta = getattr(module, "_quanta_meta", {}).get(param)
    if meta is None:
        return None
    spec, block_sizes, channel_axis, input_axis = meta
    return QuantizedWeight(
        codes=getattr(module, param + "_quanta_codes"),
        scale=getattr(module, param + "_quanta_scale"),
        zero_point=getattr(module, param + "_quanta_zero_point", None),
        spec=spec,
        block_sizes=block_sizes,
        channel_axis=channel_axis,
        input_axis=input_axis,
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
