"""Core ML deployment targets: what each one can store, and the environment guards.

Core ML groups its targets by specification version: iOS16 = macOS13, iOS17 = macOS14,
iOS18 = macOS15. What quanta needs from each (measured with coremltools 9.0):

========  ==============================================================================
target    supports
========  ==============================================================================
iOS16     int8/uint8 weights, per-tensor or per-channel (``constexpr_affine_dequantize``)
iOS17     the above, plus activation quantization (``quantize``/``dequantize`` ops)
iOS18     int4/uint4/int8/uint8 weights, also per-block (``constexpr_blockwise_shift_scale``)
========  ==============================================================================
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from quanta.errors import ConfigError, QuantaError
from quanta._records.spec import Granularity

__all__ = ["TARGETS", "parse_target", "target_name", "weight_target", "required_target",
           "choose_target", "check_environment", "CoreMLEnvironmentError", "STORABLE_BITS"]

#: Specification version -> the names of that target (iOS first).
TARGETS = {7: ("iOS16", "macOS13"), 8: ("iOS17", "macOS14"), 9: ("iOS18", "macOS15")}
#: Lowest target quanta converts for: coremltools ignores quantization metadata below iOS16.
_FLOOR = 7
#: Integer widths Core ML stores for weights.
STORABLE_BITS = (4, 8)


class CoreMLEnvironmentError(QuantaError, RuntimeError):
    """The installed coremltools/numpy combination is known to convert models wrongly or not at all."""


def _ct() -> Any:
    from .ct_import import import_coremltools

    return import_coremltools()


def parse_target(value: Any) -> Any:
    """``ct.target.iOS17``, ``"iOS17"``, ``"macOS14"`` ... -> a ``ct.target`` member (None stays None)."""
    if value is None:
        return None
    ct = _ct()
    if isinstance(value, ct.target):
        return value
    if isinstance(value, str):
        text = value.strip().removeprefix("ct.target.").removeprefix("target.")
        member = getattr(ct.target, text, None)
        if member is not None:
            return member
    allowed = ", ".join(n for names in TARGETS.values() for n in names)
    raise ConfigError(f"unknown deployment target {value!r} (allowed: {allowed}, or a ct.target member)",
                      "minimum_deployment_target")


def target_name(target) -> str:
    """``"iOS18 (macOS15)"`` for a ct.target member or a specification version."""
    version = getattr(target, "value", target)
    names = TARGETS.get(version)
    return f"{names[0]} ({names[1]})" if names else str(getattr(target, "name", target))


def weight_target(record) -> int:
    """Lowest specification version that stores ``record`` exactly (7 = iOS16, 9 = iOS18)."""
    bits = record.spec.dtype.bits
    if bits not in STORABLE_BITS:
        raise ConfigError(f"Core ML stores 4- or 8-bit weight codes, not {record.spec.dtype}", "dtype")
    if bits != 8 or (record.spec.granularity is Granularity.per_block and _blocked(record)):
        return 9
    return 7


def _blocked(record) -> bool:
    """Whether the scale varies along an axis other than the output channel (a block size that
    spans the whole input axis is per-channel, which iOS16 stores)."""
    return any(n > 1 for axis, n in enumerate(record.scale.shape) if axis != record.channel_axis)


def required_target(records: dict, has_activation_quant: bool) -> tuple[int, str]:
    """``(spec version, reason)``: the lowest target for these records and activation ops."""
    need, why = _FLOOR, "quantized weights need at least iOS16"
    for name, rec in records.items():
        try:
            v = weight_target(rec)
        except ConfigError as exc:
            raise ConfigError(str(exc), f"layer {name!r}") from None
        if v > need:
            need, why = v, f"layer {name!r} is {rec.spec.describe()}, which Core ML stores from iOS18 on"
    if has_activation_quant and need < 8:
        need, why = 8, "activation quantization (quantize/dequantize ops) needs iOS17"
    return need, why


def choose_target(requested: Any, records: dict, has_activation_quant: bool) -> Any:
    """The ``ct.target`` to convert for: ``requested`` if it fits, else the lowest that fits.

    Raises ConfigError naming the layer and the minimum target when ``requested`` is too low.
    """
    ct = _ct()
    need, why = required_target(records, has_activation_quant)
    target = parse_target(requested)
    if target is None:
        return ct.target(need)
    if target.value < need:
        raise ConfigError(f"{target_name(target)} is too low: {why}; use minimum_deployment_target="
                          f"{TARGETS[need][0]} or later", "minimum_deployment_target")
    return target


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def check_environment(numpy_version: str | None = None, coremltools_version: str | None = None) -> None:
    """Refuse a known-bad pair: coremltools 9.0 with numpy >= 2.4.

    coremltools 9.0's torch frontend calls ``int()`` on 1-element arrays, which numpy 2.4 turned
    into an error (apple/coremltools#2633, fixed after 9.0): attention blocks fail to convert.
    """
    np_v = _version_tuple(numpy_version or np.__version__)
    ct_text = coremltools_version or _ct().__version__
    ct_v = _version_tuple(ct_text)
    if ct_v == (9, 0) and np_v >= (2, 4):
        raise CoreMLEnvironmentError(
            f"coremltools {ct_text} cannot convert models with numpy {numpy_version or np.__version__} "
            "(>= 2.4: 'only 0-dimensional arrays can be converted to Python scalars', "
            "apple/coremltools#2633); install numpy<2.4 or a coremltools release after 9.0")


def describe_targets() -> Iterable[str]:
    """Lines of the targets table, for docs and ``quanta plugins``."""
    yield "iOS16/macOS13: int8/uint8 weights, per-tensor or per-channel"
    yield "iOS17/macOS14: + activation quantization (W8A8)"
    yield "iOS18/macOS15: + int4/uint4 and per-block weights"
