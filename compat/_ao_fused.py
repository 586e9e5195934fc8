"""Fused weighted layer + activation modules for compat's torch.ao preparation (quanta's own).

torch.ao fuses a conv/linear only with a ReLU (``ConvReLU2d``, ``LinearReLU``); coremltools
also fuses them with every other activation it lists (ReLU6, LeakyReLU, GELU, Sigmoid...) and
fuses ConvTranspose with any activation, so one activation quantizer follows the pair. These
are quanta's equivalents:

- float fused modules ``ConvAct1d/2d/3d``, ``ConvTransposeAct1d/2d/3d``, ``LinearAct``:
  ``(layer, act)`` containers (``[0]`` is the layer, ``.act`` the activation), and
  ``ConvBnAct1d/2d/3d`` ``(conv, bn, act)``;
- QAT modules (torch.ao's QAT Conv/Linear/ConvBn, or quanta's QAT ConvTranspose, with ``.act``
  applied after): ``from_float`` takes the fused module, ``to_float`` gives the ``(layer, act)`` one;
- reference modules (what ``convert_to_reference_fx`` makes of them): ``(torch.ao reference
  layer, act)`` containers, so ``converted.layer[0]`` is the reference conv/linear.

They are plain ``nn.Sequential`` containers, not torch.ao ``_FusedModule`` s: torch.ao requires
the members of a ``_FusedModule`` to share one qconfig, which a fixed-qparams activation
(sigmoid...) or a ConvTranspose (weights per channel along axis 1) does not.
"""

from __future__ import annotations

import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.nn.qat as nnqat
from torch import nn

from quanta.compat._ao_modules import QAT_CONV_TRANSPOSE
from quanta.fx.convert import _plain_copy  # the same QAT -> float copy quanta's own convert makes

__all__ = ["FUSED_ACT", "QAT_ACT", "REF_ACT", "FUSED_BN_ACT", "QAT_BN_ACT", "fuse_with_act", "fuse_bn_act"]



def _adopt(cls, base: nn.Module, act: nn.Module) -> nn.Module:
    """A ``cls`` instance holding the state of ``base`` (torch.ao's QAT module of the layer) plus ``act``."""
    qat = cls.__new__(cls)
    qat.__dict__.update(base.__dict__)
    qat._modules = dict(base._modules)
    qat._parameters = dict(base._parameters)
    qat._buffers = dict(base._buffers)
    qat.act = act
    return qat

class _Fused(nn.Sequential):
    def __init__(self, layer: nn.Module, act: nn.Module):
        super().__init__(layer, act)

    @property
    def act(self) -> nn.Module:
        """The activation after the layer."""
        return self[1]

    @property
    def weight(self):
        """The layer's weight."""
        return self[0].weight

    @property
    def bias(self):
        """The layer's bias."""
        return self[0].bias


class _Reference(_Fused):
    _REFERENCE: type

    @classmethod
    def from_float(cls, fused, weight_qparams):
        """``(torch.ao reference layer, act)`` of a float fused ``(layer, act)``."""
        return cls(cls._REFERENCE.from_float(fused[0], weight_qparams), fused[1])


def _fused(name: str) -> type:
    return type(name, (_Fused,), {"__doc__": f"``{name}``: a weighted layer and its activation, fused.",
                                  "__module__": __name__})


FUSED_ACT: dict[type, type] = {}
for _float in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear):
    FUSED_ACT[_float] = _fused(_float.__name__[:-2] + "Act" + _float.__name__[-2:] if _float is not nn.Linear
                               else "LinearAct")
globals().update({cls.__name__: cls for cls in FUSED_ACT.values()})


def _as_float(layer: nn.Module, float_cls: type) -> nn.Module:
    """``layer`` as its float class, sharing its parameters: torch.ao's QAT swap recurses into plain
    containers first, so the layer inside a fused container may already be a QAT module."""
    return layer if type(layer) is float_cls else _plain_copy(layer, float_cls)


class _ActQAT:
    """QAT: the layer's QAT forward, then ``act``."""

    _FLOAT_MODULE: type
    _QAT_BASE: type

    def forward(self, input, *args, **kwargs):  # type: ignore[override]
        return self.act(self._QAT_BASE.forward(self, input, *args, **kwargs))

    @classmethod
    def from_float(cls, mod, use_precomputed_fake_quant: bool = False):
        """The QAT module of a fused ``(layer, act)`` module."""
        layer, act = _as_float(mod[0], cls._FLOAT_LAYER), mod[1]
        layer.qconfig = mod.qconfig
        return _adopt(cls, cls._QAT_BASE.from_float(layer), act)

    def to_float(self):
        """The float fused ``(layer, act)`` module with this module's parameters."""
        layer = self._QAT_BASE.to_float(self)
        layer._modules.pop("act", None)
        fused = self._FLOAT_MODULE(layer, self.act)
        fused.train(self.training)
        return fused


def _qat(float_cls: type, qat_base: type) -> type:
    fused = FUSED_ACT[float_cls]
    attrs = {"_FLOAT_MODULE": fused, "_FLOAT_LAYER": float_cls, "_QAT_BASE": qat_base, "__module__": __name__,
             "__doc__": f"QAT ``{fused.__name__}``: the layer fake-quantizes its weight, then the activation."}
    if hasattr(qat_base, "_FLOAT_CONV_MODULE"):
        attrs["_FLOAT_CONV_MODULE"] = float_cls
    return type(f"{fused.__name__}QAT", (_ActQAT, qat_base), attrs)


#: float layer class -> the QAT class of its fused ``(layer, act)``
QAT_ACT: dict[type, type] = {
    nn.Conv1d: _qat(nn.Conv1d, nnqat.Conv1d), nn.Conv2d: _qat(nn.Conv2d, nnqat.Conv2d),
    nn.Conv3d: _qat(nn.Conv3d, nnqat.Conv3d), nn.Linear: _qat(nn.Linear, nnqat.Linear),
    **{cls: _qat(cls, QAT_CONV_TRANSPOSE[cls]) for cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)},
}
globals().update({cls.__name__: cls for cls in QAT_ACT.values()})


class _BnAct(nn.Sequential):
    def __init__(self, conv: nn.Module, bn: nn.Module, act: nn.Module):
        super().__init__(conv, bn, act)


#: conv class -> float fused ``(conv, bn, act)``
FUSED_BN_ACT: dict[type, type] = {
    cls: type(f"ConvBnAct{cls.__name__[-2:]}", (_BnAct,), {"__module__": __name__,
                                                            "__doc__": "A conv, its batch norm and activation, fused."})
    for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d)}
globals().update({cls.__name__: cls for cls in FUSED_BN_ACT.values()})


class _BnActQAT:
    """QAT: torch.ao's QAT ConvBn (bn folded into the fake-quantized weight, ``freeze_bn``), then ``act``."""

    _FLOAT_MODULE: type
    _QAT_BASE: type
    _CONV_BN: type

    def forward(self, input):  # type: ignore[override]
        return self.act(self._QAT_BASE.forward(self, input))

    @classmethod
    def from_float(cls, mod, use_precomputed_fake_quant: bool = False):
        """The QAT module of a fused ``(conv, bn, act)`` module."""
        conv_bn = cls._CONV_BN(_as_float(mod[0], cls._FLOAT_LAYER), mod[1])
        conv_bn.qconfig = mod.qconfig
        return _adopt(cls, cls._QAT_BASE.from_float(conv_bn), mod[2])

    def to_float(self):
        """The float ``(conv with bn folded, act)`` fused module."""
        conv = self._QAT_BASE.to_float(self)
        fused = FUSED_ACT[type(conv)](conv, self.act)
        fused.train(self.training)
        return fused


def _bn_qat(dims: int) -> type:
    conv = getattr(nn, f"Conv{dims}d")
    base = getattr(nniqat, f"ConvBn{dims}d")
    return type(f"ConvBnAct{dims}dQAT", (_BnActQAT, base), {
        "_FLOAT_MODULE": FUSED_BN_ACT[conv], "_FLOAT_LAYER": conv, "_QAT_BASE": base, "_CONV_BN": getattr(nni, f"ConvBn{dims}d"),
        "_FLOAT_RELU_MODULE": None, "__module__": __name__,
        "__doc__": f"QAT ``ConvBnAct{dims}d``: torch.ao's QAT ConvBn{dims}d, then the activation."})


#: conv class -> the QAT class of its fused ``(conv, bn, act)``
QAT_BN_ACT = {getattr(nn, f"Conv{d}d"): _bn_qat(d) for d in (1, 2, 3)}
globals().update({cls.__name__: cls for cls in QAT_BN_ACT.values()})


def _reference_classes() -> dict:
    import torch.ao.nn.quantized.reference as nnr

    out = {}
    for float_cls, fused in FUSED_ACT.items():
        out[float_cls] = type(f"Reference{fused.__name__}", (_Reference,), {
            "_REFERENCE": getattr(nnr, float_cls.__name__), "__module__": __name__,
            "__doc__": f"Reference ``{fused.__name__}``: torch.ao's reference {float_cls.__name__}, then the act."})
    return out


#: float layer class -> the reference class of its fused ``(layer, act)``
REF_ACT = _reference_classes()
globals().update({cls.__name__: cls for cls in REF_ACT.values()})


def fuse_bn_act(conv_cls: type):
    """The fuser method of ``(conv, bn, act)`` patterns (QAT: the fused module; else bn folded)."""
    fused = FUSED_BN_ACT[conv_cls]

    def fuse(is_qat, conv, bn, act):
        if not is_qat:
            from torch.ao.quantization.fuser_method_mappings import fuse_conv_bn

            return FUSED_ACT[conv_cls](fuse_conv_bn(is_qat, conv, bn), act)
        return fused(conv, bn, act)

    return fuse


def fuse_with_act(float_cls: type):
    """The fuser method of ``(float_cls, act)`` patterns."""
    fused = FUSED_ACT[float_cls]

    def fuse(is_qat, layer, act):
        return fused(layer, act)

    return fuse
