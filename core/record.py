"""The quantized-weight record: integer codes, scale, zero point and the spec that made them.

A record is backend-neutral. On a torch module it lives beside the parameter as buffers
(``<param>_quanta_codes``, ``<param>_quanta_scale``, ``<param>_quanta_zero_point``) so it
follows ``.to(device)``, ``state_dict()`` and ``copy.deepcopy``; the parameter itself holds
exactly ``record.dequantize()``, so the module computes with the quantized values.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import attrs
import torch

from quanta._records.qmath import empty, from_groups, to_groups
from quanta._records.spec import QuantSpec

__all__ = ["QuantizedWeight", "attach_record", "read_record", "records", "declare_state", "extra_state",
           "remove_state", "TRANSFORMS", "DeclaredTransform", "declare_transform", "transforms", "undeclared_hooks"]


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
        grouped = to_groups(self.codes, sizes)
        # One fresh float buffer that
        # the scheme dequantizes in place; the built-ins make no other allocation.
        codes = empty(grouped.shape, torch.float32, grouped.device)
        codes.copy_(grouped)
        scale = self.scale.reshape(-1, 1).to(torch.float32)
        with plugin_code(scheme, None):
            if self.lut is not None:
                values = scheme.dequantize_lut(codes, self.lut.reshape(scale.shape[0], -1), scale)
            else:
                zp = None if self.zero_point is None else self.zero_point.reshape(-1, 1).to(torch.float32)
                values = scheme.dequantize_(codes, scale, zp)
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
                  values: torch.Tensor | None = None, *, keep_storage: bool = False) -> None:
    """Store ``record`` on ``module`` beside parameter ``param`` and set the parameter to its values.

    ``values`` may pass ``record.dequantize()`` when the caller already has it. With
    ``keep_storage=True`` the parameter is left as it is: the caller writes the values into its
    storage itself (an in-place run, when it can no longer fail).
    """
    if not keep_storage:
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
    """Every record in ``model``, keyed ``"<module name>.<param>"``. A model that is not a torch
    module is asked through its backend (``Backend.records``; a backend that cannot list records
    says so with a ``quanta.ConfigError``)."""
    if isinstance(model, torch.nn.Module):
        return dict(_iter_records(model))
    from quanta.registry.guard import plugin_code
    from quanta.registry.lookup import backend_for

    backend = backend_for(model).obj
    with plugin_code(backend):
        return dict(backend.records(model))


def _iter_records(model: torch.nn.Module) -> Iterator[tuple[str, QuantizedWeight]]:
    for name, module in model.named_modules():
        for param in getattr(module, "_quanta_meta", {}):
            rec = read_record(module, param)
            if rec is not None:
                yield (f"{name}.{param}" if name else param), rec


def declare_state(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Store extra state an algorithm adds besides the weights (an input scale, a smoothing vector)
    as buffer ``name`` of ``module``, and declare it, so that ``inplace`` restore removes it,
    ``quanta.save``/``quanta.load`` carry it and exporters can find it (:func:`extra_state`).

    A parameter slot the module has but leaves empty (``bias`` of ``Linear(bias=False)``) is filled
    with a new ``nn.Parameter`` instead (the module then computes with it), and an existing
    parameter of the same shape takes ``value``; both are declared, so ``quanta.load`` recreates
    them on a fresh model. Any other existing attribute of that name is refused with a
    ``quanta.ConfigError`` naming it."""
    from quanta.errors import ConfigError

    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"declared state {name!r} must be a torch.Tensor, got {type(value).__name__}", name)
    if name in module._parameters:
        old = module._parameters[name]
        if old is not None and tuple(old.shape) != tuple(value.shape):
            raise ConfigError(f"{type(module).__name__} already has a parameter {name!r} of shape "
                              f"{tuple(old.shape)}; declared state of shape {tuple(value.shape)} cannot replace it "
                              "(declare it under a new name)", name)
        if old is None:
            module._parameters[name] = torch.nn.Parameter(value.detach().clone())
        else:
            old.data = value.detach().to(old.device, old.dtype)
    elif name in module._buffers or not hasattr(module, name):
        module.register_buffer(name, value)
    else:
        raise ConfigError(f"{type(module).__name__} already has an attribute {name!r} (a "
                          f"{type(getattr(module, name)).__name__}) that is neither a parameter nor a buffer; "
                          "declare the state under another name", name)
    declared = tuple(getattr(module, "_quanta_state", ()))
    if name not in declared:
        setattr(module, "_quanta_state", declared + (name,))


def remove_state(module: torch.nn.Module, name: str) -> None:
    """Remove state ``name`` declared on ``module`` with :func:`declare_state`, and every declared
    transform using it (``context.add_state(..., temporary=True)`` state at the end of a run).
    A parameter an algorithm added to an empty slot leaves the slot empty again."""
    from quanta.errors import ConfigError

    declared = tuple(getattr(module, "_quanta_state", ()))
    if name not in declared:
        raise ConfigError(f"{type(module).__name__} has no declared state {name!r} (declared: "
                          f"{', '.join(declared) or 'none'})", name)
    for kind, state in tuple(getattr(module, "_quanta_transforms", ())):
        if state == name:
            for attr in ("_forward_pre_hooks", "_forward_hooks"):
                hooks = getattr(module, attr)
                for key in [k for k, h in hooks.items() if isinstance(h, DeclaredTransform) and h.state == name]:
                    del hooks[key]
    setattr(module, "_quanta_transforms", tuple(t for t in getattr(module, "_quanta_transforms", ()) if t[1] != name))
    if name in module._parameters:
        module._parameters[name] = None
    else:
        module._buffers.pop(name, None)
    setattr(module, "_quanta_state", tuple(n for n in declared if n != name))


def _state_tensor(module: torch.nn.Module, name: str) -> torch.Tensor:
    tensor = module._buffers.get(name)
    found = module._parameters[name] if tensor is None and name in module._parameters else tensor
    return found  # type: ignore[return-value]  # declared state: present by construction


def extra_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor declared with :func:`declare_state` in ``model`` (buffers, and parameters an
    algorithm added), keyed ``"<module>.<name>"``."""
    out = {}
    for mname, module in model.named_modules():
        for name in getattr(module, "_quanta_state", ()):
            out[f"{mname}.{name}" if mname else name] = _state_tensor(module, name)
    return out


# ----------------------------------------------------------------------------- declared transforms

#: The forward transforms an algorithm can declare on a module (:func:`declare_transform`), by
#: kind. Each uses one declared state tensor ``s`` (broadcast as torch broadcasts); it is data, so
#: ``quanta.save``/``quanta.load`` recreate it and a traced export (Core ML) emits it as one op.
TRANSFORMS = {
    "input_mul": "the module's first input times s, before the module runs (an input scale: x * s)",
    "input_add": "s added to the module's first input, before the module runs (a shift: x + s)",
    "output_mul": "the module's output times s (y * s)",
    "output_add": "s added to the module's output (a bias correction: y + s)",
}


class DeclaredTransform:
    """The forward hook (``output_*``) or pre-hook (``input_*``) quanta registers for a declared
    transform: it reads the declared state ``state`` of its module on every call. Save and load
    recognise it by its class; any other hook on a model is refused by ``quanta.save``."""

    def __init__(self, kind: str, state: str) -> None:
        self.kind, self.state = kind, state

    def __call__(self, module, args, output=None) -> Any:
        s = getattr(module, self.state)
        if self.kind.startswith("input"):
            x = args[0]
            return ((x * s) if self.kind == "input_mul" else (x + s),) + tuple(args[1:])
        return output * s if self.kind == "output_mul" else output + s

    def __repr__(self) -> str:
        return f"DeclaredTransform({self.kind!r}, {self.state!r})"


def declare_transform(module: torch.nn.Module, kind: str, state: str, value: torch.Tensor | None = None) -> None:
    """Make ``module`` compute transform ``kind`` (a key of :data:`TRANSFORMS`) with its declared
    state ``state`` (declared here when ``value`` is given, see :func:`declare_state`).

    The transform is part of the model's state: ``inplace`` restore removes it, ``quanta.save``
    records it and ``quanta.load`` registers it again, and tracing exporters emit it. Declaring
    the same ``(kind, state)`` twice adds it once. Raises ``quanta.ConfigError`` for an unknown
    kind (naming the kinds and the nearest) or a state that is not declared."""
    from quanta.errors import ConfigError, did_you_mean

    if kind not in TRANSFORMS:
        raise ConfigError(f"unknown transform kind {kind!r} (kinds: {', '.join(TRANSFORMS)})"
                          f"{did_you_mean(str(kind), TRANSFORMS)}", "kind")
    if value is not None:
        declare_state(module, state, value)
    if state not in getattr(module, "_quanta_state", ()):
        raise ConfigError(f"transform {kind!r} uses state {state!r}, which is not declared on this "
                          f"{type(module).__name__}: pass value=... or declare it with declare_state first", state)
    entries = tuple(getattr(module, "_quanta_transforms", ()))
    if (kind, state) in entries:
        return
    hook = DeclaredTransform(kind, state)
    if kind.startswith("input"):
        module.register_forward_pre_hook(hook)
    else:
        module.register_forward_hook(hook)
    setattr(module, "_quanta_transforms", entries + ((kind, state),))


def transforms(model: torch.nn.Module) -> dict[str, tuple[tuple[str, str], ...]]:
    """Every declared transform of ``model``: ``{"<module>": ((kind, state), ...)}`` in the order declared."""
    return {name: tuple(module._quanta_transforms) for name, module in model.named_modules()
            if getattr(module, "_quanta_transforms", ())}


#: The per-module hook dictionaries of ``torch.nn.Module`` that change what a model computes.
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def undeclared_hooks(model: torch.nn.Module) -> list[tuple[str, str, str]]:
    """Hooks on ``model`` that are not declared transforms: ``[(module name, hook kind, hook)]``
    (``hook`` is the function's qualified name). A saved directory holds data, not code, so
    ``quanta.save`` refuses a model that has any (they would be lost on load)."""
    found = []
    for mname, module in model.named_modules():
        for attr in _HOOK_DICTS:
            for hook in getattr(module, attr, {}).values():
                if not isinstance(hook, DeclaredTransform):
                    label = getattr(hook, "__qualname__", None) or type(hook).__qualname__
                    found.append((mname or "<model>", attr.strip("_")[:-1].replace("_", " "),
                                  f"{getattr(hook, '__module__', '?')}.{label}"))
    return found
