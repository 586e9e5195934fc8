"""``QuantSpec``: how one tensor is quantized (dtype, scheme, granularity, observer)."""

from __future__ import annotations

import enum
import re
from typing import Any

import attrs
import numpy as np
import torch

from quanta.errors import ConfigError

__all__ = ["QuantDtype", "Granularity", "QuantSpec", "parse_dtype", "changed_options"]


@attrs.frozen
class QuantDtype:
    """An integer storage type: ``bits`` in 2..8 and ``signed``. ``str()`` gives ``"int4"``/``"uint8"``."""

    bits: int
    signed: bool = True

    def __str__(self) -> str:
        return f"{'' if self.signed else 'u'}int{self.bits}"

    @property
    def torch_storage(self) -> torch.dtype:
        """The torch dtype that stores codes of this type (int8 or uint8, also for 2..7 bits)."""
        return torch.int8 if self.signed else torch.uint8


_DTYPE_RE = re.compile(r"^(u?)int([2-8])$")


def parse_dtype(value: Any, key: str = "dtype") -> QuantDtype:
    """Turn ``4``, ``8``, ``"int4"``, ``"uint4"``, ``torch.int8``, ``np.uint8`` ... into a QuantDtype.

    A bare number means a signed type (``4`` -> ``int4``), as coremltools' docs use it.
    Raises ConfigError naming ``key`` and the allowed values otherwise.
    """
    allowed = "2..8 or 'int2'..'int8' / 'uint2'..'uint8', torch.int8, torch.uint8"
    if isinstance(value, QuantDtype):
        return value
    if isinstance(value, bool):
        raise ConfigError(f"expected a dtype ({allowed}), got {value!r}", key)
    if isinstance(value, (int, np.integer)):
        if 2 <= int(value) <= 8:
            return QuantDtype(int(value), True)
        raise ConfigError(f"{int(value)} bits is out of range; allowed: {allowed}", key)
    if isinstance(value, torch.dtype):
        if value in (torch.int8, torch.uint8):
            return QuantDtype(8, value == torch.int8)
        raise ConfigError(f"torch dtype {value} is not an integer quantization type; allowed: {allowed}", key)
    if isinstance(value, (type, np.dtype)) or hasattr(value, "__name__"):
        name = np.dtype(value).name if isinstance(value, np.dtype) else getattr(value, "__name__", str(value))
        value = name
    if isinstance(value, str):
        text = value.strip().lower().removeprefix("torch.").removeprefix("np.")
        if text.isdigit():
            return parse_dtype(int(text), key)
        m = _DTYPE_RE.match(text)
        if m:
            return QuantDtype(int(m.group(2)), m.group(1) != "u")
        raise ConfigError(f"unknown dtype {value!r}; allowed: {allowed}", key)
    raise ConfigError(f"expected a dtype ({allowed}), got {type(value).__name__} {value!r}", key)


class Granularity(str, enum.Enum):
    """Which elements share one scale: the whole tensor, one output channel, or a block."""

    per_tensor = "per_tensor"
    per_channel = "per_channel"
    per_block = "per_block"

    def __str__(self) -> str:
        return self.value


def _to_granularity(value: Any) -> Granularity:
    if isinstance(value, Granularity):
        return value
    text = getattr(value, "value", value)
    try:
        return Granularity(str(text))
    except ValueError:
        from quanta.errors import did_you_mean

        allowed = [g.value for g in Granularity]
        raise ConfigError(
            f"unknown granularity {value!r}{did_you_mean(str(text), allowed)} (allowed: {', '.join(allowed)})",
            "granularity",
        ) from None


def changed_options(config: Any) -> dict[str, Any]:
    """The fields of a plugin's options (an attrs instance, or None) that differ from their defaults."""
    if config is None:
        return {}
    try:
        defaults = type(config)()
    except TypeError:  # a config class with required fields: show them all
        defaults = None
    return {f.name: getattr(config, f.name) for f in attrs.fields(type(config))
            if f.init and (defaults is None or getattr(config, f.name) != getattr(defaults, f.name))}


def _options_text(config: Any) -> str:
    items = [f"{k}={v}" for k, v in changed_options(config).items()]
    return f"({', '.join(items)})" if items else ""


def _doc(text: str) -> dict:
    return {"doc": text}


@attrs.frozen(kw_only=True)
class QuantSpec:
    """How one weight (or activation) tensor is quantized.

    The scheme and observer are plugin names, checked against the registry when a recipe
    is loaded. Scales have the weight's rank: per-tensor ``(1, 1, ...)``, per-channel
    ``(out, 1, ...)``, per-block ``(out, in // block_size, 1, ...)``.
    """

    dtype: QuantDtype = attrs.field(
        default=QuantDtype(8, True), converter=parse_dtype,
        metadata=_doc("integer type: 2..8 bits, signed or unsigned ('int4', 'uint8', 8, torch.int8)"),
    )
    scheme: str = attrs.field(default="symmetric", metadata=_doc("scheme plugin name: 'symmetric', 'affine', ..."))
    granularity: Granularity = attrs.field(
        default=Granularity.per_channel, converter=_to_granularity,
        metadata=_doc("'per_tensor', 'per_channel' or 'per_block'"),
    )
    block_size: int | None = attrs.field(
        default=None, metadata=_doc("elements along the input axis sharing one scale (per_block only)")
    )
    axis: int | None = attrs.field(
        default=None, metadata=_doc("output-channel axis; None lets the backend choose (0, or 1 for ConvTranspose)")
    )
    output_block_size: int | None = attrs.field(
        default=None, metadata=_doc("per_block only: output channels sharing one scale (a 2-D block with "
                                    "block_size; None = 1, one scale row per output channel)")
    )
    observer: str = attrs.field(default="minmax", metadata=_doc("observer plugin name choosing the range: 'minmax', 'mse', 'percentile'"))
    scheme_config: Any = attrs.field(
        default=None, metadata=_doc("the scheme's options (an instance of its config_class), None for its defaults"))
    observer_config: Any = attrs.field(
        default=None, metadata=_doc("the observer's options (an instance of its config_class), None for its defaults"))
    weight_threshold: int | None = attrs.field(
        default=None, metadata=_doc("leave weights with fewer elements than this unquantized (reported per layer)")
    )

    @block_size.validator
    def _check_block_size(self, _attr, value):
        if self.granularity is Granularity.per_block:
            if value is None:
                raise ConfigError("granularity 'per_block' needs a block_size (a positive integer, e.g. 32)", "block_size")
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"block_size must be a positive integer, got {value!r}", "block_size")
        elif value is not None:
            raise ConfigError(
                f"block_size={value!r} is only allowed with granularity 'per_block' (got {self.granularity.value!r})",
                "block_size",
            )

    @output_block_size.validator
    def _check_output_block_size(self, _attr, value):
        if value is None:
            return
        if self.granularity is not Granularity.per_block:
            raise ConfigError(f"output_block_size={value!r} is only allowed with granularity 'per_block' "
                              f"(got {self.granularity.value!r})", "output_block_size")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ConfigError(f"output_block_size must be a positive integer, got {value!r}", "output_block_size")

    @weight_threshold.validator
    def _check_threshold(self, _attr, value):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0):
            raise ConfigError(f"weight_threshold must be a non-negative integer or null, got {value!r}", "weight_threshold")

    def describe(self) -> str:
        """Short human form, e.g. ``"int4 symmetric(grid=full) per_block(32) mse"``."""
        gran = f"per_block({self.block_size})" if self.granularity is Granularity.per_block else self.granularity.value
        if self.output_block_size not in (None, 1):
            gran = f"per_block({self.output_block_size}x{self.block_size})"
        obs = "" if self.observer == "minmax" and self.observer_config is None else \
            f" {self.observer}{_options_text(self.observer_config)}"
        return f"{self.dtype} {self.scheme}{_options_text(self.scheme_config)} {gran}{obs}"

    def block_sizes(self, shape: tuple[int, ...], channel_axis: int, input_axis: int, layer: str | None = None) -> list[int]:
        """Per-axis block sizes in coremltools' convention (0 = reduce the whole axis).

        Raises QuantizationError naming ``layer`` when ``block_size`` does not divide the input axis.
        """
        from quanta.errors import QuantizationError

        sizes = [0] * len(shape)
        if self.granularity is Granularity.per_tensor:
            return sizes
        axis = channel_axis if self.axis is None else self.axis
        if not -len(shape) <= axis < len(shape):
            raise QuantizationError(f"axis {axis} is out of range for a weight of shape {tuple(shape)}", layer)
        axis %= len(shape)
        sizes[axis] = 1
        if self.granularity is Granularity.per_block:
            if len(shape) < 2:
                raise QuantizationError("per_block needs a weight with an input axis (rank >= 2)", layer)
            n_in = shape[input_axis]
            if n_in % self.block_size != 0:
                divisors = [d for d in (16, 32, 64, 128, 256) if n_in % d == 0]
                hint = f"; block sizes that divide it: {divisors}" if divisors else ""
                raise QuantizationError(
                    f"block_size {self.block_size} does not divide the input axis (size {n_in}) of weight "
                    f"{tuple(shape)}{hint}; or use per_channel for this layer",
                    layer,
                )
            sizes[input_axis] = self.block_size
            n_out, out_block = shape[axis], self.output_block_size or 1
            if out_block > 1:
                if n_out % out_block != 0:
                    raise QuantizationError(
                        f"output_block_size {out_block} does not divide the output axis (size {n_out}) of weight "
                        f"{tuple(shape)}; or use per_channel for this layer", layer)
                sizes[axis] = out_block
        return sizes
