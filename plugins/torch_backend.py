"""Backend ``torch``: quantizable weights of a ``torch.nn.Module``.

Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d (output axis 1), Embedding, and the input
projections of MultiheadAttention (its ``out_proj`` is a Linear). Records are stored on
the modules as buffers (see ``quanta.record``).
"""

from __future__ import annotations

from typing import Any

import copy

import torch
from torch import nn

import quanta
from quanta.contracts import Backend, Unit
from quanta.errors import ConfigError
from quanta.record import attach_record, declare_state, declare_transform, records, remove_state

__all__ = ["TorchBackend", "SUPPORTED_TYPES"]

_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
SUPPORTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *_CONV_T, nn.Embedding, nn.MultiheadAttention)
_MHA_PARAMS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
#: What quanta keeps on a module besides tensors and hooks: records' metadata, declared state, transforms.
_QUANTA_ATTRS = ("_quanta_meta", "_quanta_state", "_quanta_transforms")


def _mro_names(module: nn.Module) -> list[str]:
    return [c.__name__ for c in type(module).__mro__ if c not in (nn.Module, object)]


class TorchBackend(Backend):
    """Enumerates and rewrites the weights of PyTorch modules."""

    name = "torch"
    description = "PyTorch nn.Module: Linear, Conv*, ConvTranspose*, Embedding, MultiheadAttention"
    priority = 10  # asked first: an isinstance check, and most models are torch models
    grids = frozenset({"affine", "lut"})  # records are buffers; the parameter holds the dequantized values
    #: A subclass (another name, other activation rules) still holds torch models: the algorithms
    #: that serve the torch backend serve it.
    family = "torch"

    def accepts(self, model) -> bool:
        return isinstance(model, nn.Module)

    def units(self, model: nn.Module) -> list[Unit]:
        out = []
        for name, module in model.named_modules():
            if not isinstance(module, SUPPORTED_TYPES):
                continue
            mro = _mro_names(module)
            if isinstance(module, nn.MultiheadAttention):
                for param in _MHA_PARAMS:
                    w = getattr(module, param, None)
                    if isinstance(w, torch.Tensor):
                        out.append(Unit(f"{name}.{param}" if name else param, type(module).__name__, mro, param,
                                        w.shape, 0, 1, module))
                continue
            w = getattr(module, "weight", None)
            if not isinstance(w, torch.Tensor):
                continue
            if isinstance(module, _CONV_T):
                out.append(Unit(name, type(module).__name__, mro, "weight", w.shape, 1, 0, module))
            else:
                out.append(Unit(name, type(module).__name__, mro, "weight", w.shape, 0, 1, module))
        return out

    def activation_rules(self) -> Any:
        """What this backend quantizes for activations (``quanta.fx.rules.ActivationRules``):
        Linear/Conv outputs and inputs, add/mul/matmul/cat; conv+bn(+relu), linear+relu and add+relu
        fuse; activations are int8 or uint8, per tensor."""
        from quanta.fx.rules import default_torch_rules

        return default_torch_rules()

    def module_names(self, model: nn.Module) -> list[str]:
        return [n for n, _ in model.named_modules() if n]

    def type_names(self, model: nn.Module) -> set[str]:
        return {t for _, m in model.named_modules() for t in _mro_names(m)}

    def copy(self, model: nn.Module, share: tuple = ()) -> nn.Module:
        """A deep copy. Parameters of the units in ``share`` are new Parameter objects over the
        *same* storage (no copy of weights about to be replaced; records always replace storage)."""
        memo = {}
        for unit in share:
            p = getattr(unit.handle, unit.param)
            memo[id(p)] = nn.Parameter(p.data, requires_grad=p.requires_grad)
        return copy.deepcopy(model, memo)

    def module_of(self, model: nn.Module, unit: Unit) -> nn.Module:
        return unit.handle

    def read_weight(self, model, unit: Unit) -> torch.Tensor:
        return getattr(unit.handle, unit.param).detach()

    def write(self, model, unit: Unit, record, values=None) -> None:
        attach_record(unit.handle, unit.param, record, values)

    @property
    def writes_later(self) -> bool:
        """Whether core may call :meth:`write_later` instead of :meth:`write`: not for a subclass
        that overrides ``write`` alone (a wrapper whose ``write`` does more, such as
        ``quanta.testing``'s failing backend, must see every layer written)."""
        cls = type(self)
        return cls.write is TorchBackend.write or cls.write_later is not TorchBackend.write_later

    def write_later(self, model, unit: Unit, record) -> torch.Tensor:
        """Store ``record`` on the unit's module and leave the parameter's float storage as it is;
        returns the tensor (that storage) the caller writes the dequantized values into once the
        run can no longer fail (``RunContext.quantize_layer(..., values_later=True)`` in an inplace
        run: no new float buffer, and nothing of the float weight lost if the run fails before)."""
        attach_record(unit.handle, unit.param, record, keep_storage=True)
        return getattr(unit.handle, unit.param).detach()

    def add_state(self, model: nn.Module, module: str, name: str, value: torch.Tensor) -> None:
        """Register ``value`` as buffer ``name`` of submodule ``module`` (``quanta.record.declare_state``)."""
        try:
            target = model.get_submodule(module) if module else model
        except AttributeError:
            raise ConfigError(f"no module named {module!r} in the model", "module") from None
        declare_state(target, name, value)

    def records(self, model: nn.Module) -> dict:
        """Every record on the model's modules (``quanta.record.records``)."""
        return records(model)

    def save(self, model: nn.Module, path, *, overwrite: bool = False, **options) -> Any:
        """``quanta._files.saving.save``: safetensors + ``quanta_config.json``."""
        from quanta._files.saving import save

        return save(model, path, overwrite=overwrite, **options)

    def remove_state(self, model: nn.Module, module: str, name: str) -> None:
        """Remove declared state ``name`` of submodule ``module`` (``quanta.record.remove_state``)."""
        try:
            target = model.get_submodule(module) if module else model
        except AttributeError:
            raise ConfigError(f"no module named {module!r} in the model", "module") from None
        remove_state(target, name)

    def add_transform(self, model: nn.Module, module: str, kind: str, name: str, value: torch.Tensor) -> None:
        """Declare ``value`` as state ``name`` of submodule ``module`` and the forward transform
        ``kind`` using it (``quanta.record.declare_transform``: a hook save and load recreate)."""
        try:
            target = model.get_submodule(module) if module else model
        except AttributeError:
            raise ConfigError(f"no module named {module!r} in the model", "module") from None
        declare_transform(target, kind, name, value)

    def snapshot(self, model, units, everything: bool = False, share: tuple = ()) -> Any:
        """Clones of what may change: the weights of ``units`` and their records; with
        ``everything``, every parameter, buffer, hook, submodule and record of the model.

        A weight of a unit in ``share`` is only ever replaced (``write`` gives the parameter new
        storage), so the snapshot keeps a reference to it: no copy, and ``inplace=True`` costs
        what copy mode costs."""
        if not everything:
            shared = {id(getattr(u.handle, u.param)) for u in share}
            saved = []
            for u in units:
                m = u.handle
                weight = getattr(m, u.param)
                kept = weight.detach() if id(weight) in shared else weight.detach().clone()
                buffers = {k: v for k, v in m._buffers.items() if k.startswith(u.param + "_quanta_")}
                saved.append((m, u.param, kept, dict(buffers), dict(getattr(m, "_quanta_meta", {}))))
            return ("weights", saved)
        modules = []
        for m in model.modules():
            modules.append((m, {k: (p, None if p is None else p.detach().clone()) for k, p in m._parameters.items()},
                            {k: None if b is None else b.clone() for k, b in m._buffers.items()},
                            dict(m._modules), dict(m._forward_hooks), dict(m._forward_pre_hooks),
                            {k: m.__dict__[k] for k in _QUANTA_ATTRS if k in m.__dict__}))
        return ("everything", modules)

    def restore(self, model, snapshot) -> None:
        kind, saved = snapshot
        if kind == "weights":
            for m, param, weight, buffers, meta in saved:
                getattr(m, param).data = weight
                for k in [k for k in m._buffers if k.startswith(param + "_quanta_")]:
                    del m._buffers[k]
                m._buffers.update(buffers)
                if meta:
                    m._quanta_meta = meta
                elif "_quanta_meta" in m.__dict__:
                    del m._quanta_meta
            return
        for m, params, buffers, children, hooks, pre_hooks, attrs_ in saved:
            m._parameters.clear()
            for k, (p, value) in params.items():
                if p is not None:
                    p.data = value
                m._parameters[k] = p
            m._buffers.clear()
            m._buffers.update(buffers)
            m._modules.clear()
            m._modules.update(children)
            m._forward_hooks.clear()
            m._forward_hooks.update(hooks)
            m._forward_pre_hooks.clear()
            m._forward_pre_hooks.update(pre_hooks)
            for k in _QUANTA_ATTRS:
                m.__dict__.pop(k, None)
            m.__dict__.update(attrs_)


@quanta.hookimpl
def register_backends(register) -> None:
    register(TorchBackend())
