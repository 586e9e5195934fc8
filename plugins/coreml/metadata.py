"""The one place that writes coremltools' ``_COREML_`` compression metadata onto torch modules.

``ct.convert`` (torch frontend, minimum_deployment_target >= iOS16) reads, per parameter,
the buffers ``_COREML_/<param>/quantization_n_bits``, ``.../quantization_scale`` (the
weight's rank), ``.../zero_point`` and ``.../compression_type`` (``[3]`` = quantization),
and stores ``clip(round(W / scale) + zero_point)`` as the weight's integer data.
"""

from __future__ import annotations

from typing import Any

import torch

from quanta.record import read_record

__all__ = ["annotate", "strip_annotations", "PREFIX"]

PREFIX = "_COREML_"
_QUANTIZATION = 3


def _buffer(param: str, key: str) -> str:
    return f"{PREFIX}/{param}/{key}"


def _write(module: torch.nn.Module, param: str, record: Any) -> None:
    """The metadata buffers of ``module.<param>``, quantized as ``record``."""
    module.register_buffer(_buffer(param, "quantization_n_bits"), torch.tensor(record.spec.dtype.bits))
    module.register_buffer(_buffer(param, "quantization_scale"), record.scale.detach().to(torch.float32).clone())
    zp_name = _buffer(param, "zero_point")
    if record.zero_point is not None:
        module.register_buffer(zp_name, record.zero_point.detach().clone())
    elif zp_name in module._buffers:
        del module._buffers[zp_name]
    module.register_buffer(_buffer(param, "compression_type"), torch.tensor([_QUANTIZATION]))


def annotate(model: torch.nn.Module) -> torch.nn.Module:
    """Add ``_COREML_`` metadata for every quanta record in ``model`` (in place); returns ``model``.

    Each quantized parameter is also reset to exactly ``record.dequantize()`` so that the
    converter's ``round(W / scale)`` gives back the record's codes. Idempotent.
    """
    annotated: dict[int, Any] = {}  # id of a quantized parameter -> its record
    for _, module in model.named_modules():
        for param in list(getattr(module, "_quanta_meta", {})):
            record = read_record(module, param)
            if record is None:
                continue
            weight = getattr(module, param)
            with torch.no_grad():
                weight.copy_(record.dequantize().to(weight.dtype).reshape(weight.shape))
            _write(module, param, record)
            annotated[id(weight)] = record
    # A parameter tied to a quantized one (an embedding sharing the LM head's weight) is one
    # constant in the converted program, named after whichever module the converter meets first:
    # it carries the same metadata, so that constant is stored compressed under either name.
    for _, module in model.named_modules():
        for param, value in module._parameters.items():
            record = annotated.get(id(value))
            if record is not None and param not in getattr(module, "_quanta_meta", {}):
                _write(module, param, record)
    if annotated:
        model.register_buffer(f"{PREFIX}/metadata_version", torch.tensor(1))
    return model


def strip_annotations(model: torch.nn.Module) -> torch.nn.Module:
    """Remove every ``_COREML_`` buffer from ``model`` (in place); returns ``model``."""
    for _, module in model.named_modules():
        for key in [k for k in module._buffers if k.startswith(PREFIX + "/")]:
            del module._buffers[key]
    return model
