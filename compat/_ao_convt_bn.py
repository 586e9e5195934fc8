"""ConvTranspose + BatchNorm (+ activation) for compat's torch.ao preparation (quanta's own).

torch.ao fuses Conv + BatchNorm into QAT modules that fold the batch norm into the fake-quantized
weight (``ConvBn2d``); it has nothing for ConvTranspose, which coremltools also fuses. These do
the same for ConvTranspose1d/2d/3d (groups 1): ``ConvTransposeBn{d}dQAT`` (``.conv``: quanta's QAT
ConvTranspose, ``.bn``, ``freeze_bn``) folds ``gamma / sqrt(running_var + eps)`` into the weight
along its output-channel axis (1) before fake quantization, as torch.ao's ``ConvBn`` does;
``ConvTransposeBnAct{d}dQAT`` adds ``.act``. ``to_float`` gives the folded ConvTranspose (with the act:
quanta's fused ``ConvTransposeAct``), which the reference conversion quantizes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from quanta.compat._ao_fused import FUSED_ACT, _as_float
from quanta.compat._ao_modules import QAT_CONV_TRANSPOSE

__all__ = ["FUSED_BN", "FUSED_BN_ACT_T", "QAT_BN", "QAT_BN_ACT_T", "fuse_bn", "fuse_bn_act_t"]

_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _container(name: str, doc: str) -> type:
    return type(name, (nn.Sequential,), {"__module__": __name__, "__doc__": doc})


#: ConvTranspose class -> float fused (convt, bn) / (convt, bn, act)
FUSED_BN = {c: _container(f"ConvTransposeBn{c.__name__[-2:]}", "A ConvTranspose and its batch norm, fused.")
            for c in _TRANSPOSES}
FUSED_BN_ACT_T = {c: _container(f"ConvTransposeBnAct{c.__name__[-2:]}",
                                "A ConvTranspose, its batch norm and activation, fused.") for c in _TRANSPOSES}


class _ConvWeight:
    """``weight`` and ``weight_fake_quant`` of the ``.conv`` inside (where coremltools' tests read them)."""

    conv: nn.Module

    @property
    def weight(self):
        """The ConvTranspose's weight."""
        return self.conv.weight

    @property
    def weight_fake_quant(self):
        """The ConvTranspose's weight quantizer (with a BatchNorm, it sees the bn-folded weight)."""
        return self.conv.weight_fake_quant


class _ConvTransposeBnQAT(_ConvWeight, nn.Module):
    """QAT ConvTranspose + BatchNorm: bn folded into the fake-quantized weight (torch.ao's ConvBn way)."""

    _FLOAT_MODULE: type
    _FLOAT_LAYER: type

    def __init__(self, conv: nn.Module, bn: nn.Module, qconfig):
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.qconfig = qconfig
        self.freeze_bn = False

    def freeze_bn_stats(self):
        """Stop updating the batch norm statistics (coremltools' milestone 3)."""
        self.freeze_bn = True
        self.bn.training = False
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_bn:
            self.bn.training = False
        return self

    def forward(self, x):
        conv, bn = self.conv, self.bn
        std = torch.sqrt(bn.running_var + bn.eps)
        factor = (bn.weight if bn.affine else torch.ones_like(std)) / std
        shape = [1] * conv.weight.dim()
        shape[1] = -1
        weight = conv.weight_fake_quant(conv.weight * factor.reshape(shape))
        out_shape = [1] * x.dim()
        out_shape[1] = -1
        output_padding = conv._output_padding(x, None, conv.stride, conv.padding, conv.kernel_size,
                                              conv.weight.dim() - 2, conv.dilation)
        fn = (nn.functional.conv_transpose1d, nn.functional.conv_transpose2d,
              nn.functional.conv_transpose3d)[conv.weight.dim() - 3]
        y = fn(x, weight, None, conv.stride, conv.padding, output_padding, conv.groups, conv.dilation)
        y = y / factor.reshape(out_shape)
        if conv.bias is not None:
            y = y + conv.bias.reshape(out_shape)
        return bn(y)

    @classmethod
    def from_float(cls, mod, use_precomputed_fake_quant: bool = False):
        """The QAT module of a fused ``(convt, bn)``."""
        conv = _as_float(mod[0], cls._FLOAT_LAYER)
        conv.qconfig = mod.qconfig
        qat_conv = QAT_CONV_TRANSPOSE[cls._FLOAT_LAYER].from_float(conv)
        return cls(qat_conv, mod[1], mod.qconfig)

    def to_float(self):
        """The ConvTranspose with the batch norm folded in."""
        conv = self.conv.to_float()
        return fuse_conv_bn_eval(conv.eval(), self.bn.eval(), transpose=True).train(self.training)


class _ConvTransposeBnActQAT(_ConvWeight, nn.Module):
    """QAT ConvTranspose + BatchNorm + activation: ``.conv`` (the ConvTransposeBn QAT module), ``.act``."""

    _FLOAT_MODULE: type
    _FLOAT_LAYER: type
    _BN_QAT: type

    def __init__(self, conv: nn.Module, act: nn.Module, qconfig):
        super().__init__()
        self.conv = conv
        self.act = act
        self.qconfig = qconfig

    def forward(self, x):
        return self.act(self.conv(x))

    @classmethod
    def from_float(cls, mod, use_precomputed_fake_quant: bool = False):
        """The QAT module of a fused ``(convt, bn, act)``."""
        pair = FUSED_BN[cls._FLOAT_LAYER](mod[0], mod[1])
        pair.qconfig = mod.qconfig
        return cls(cls._BN_QAT.from_float(pair), mod[2], mod.qconfig)

    def to_float(self):
        """quanta's fused ``(folded ConvTranspose, act)``."""
        return FUSED_ACT[self._FLOAT_LAYER](self.conv.to_float(), self.act)


QAT_BN = {c: type(f"ConvTransposeBn{c.__name__[-2:]}QAT", (_ConvTransposeBnQAT,), {
    "_FLOAT_MODULE": FUSED_BN[c], "_FLOAT_LAYER": c, "__module__": __name__,
    "__doc__": "QAT ConvTranspose + BatchNorm (folded)."}) for c in _TRANSPOSES}
QAT_BN_ACT_T = {c: type(f"ConvTransposeBnAct{c.__name__[-2:]}QAT", (_ConvTransposeBnActQAT,), {
    "_FLOAT_MODULE": FUSED_BN_ACT_T[c], "_FLOAT_LAYER": c, "_BN_QAT": QAT_BN[c], "__module__": __name__,
    "__doc__": "QAT ConvTranspose + BatchNorm (folded) + activation."}) for c in _TRANSPOSES}
globals().update({cls.__name__: cls for d in (FUSED_BN, FUSED_BN_ACT_T, QAT_BN, QAT_BN_ACT_T) for cls in d.values()})


def fuse_bn(convt_cls: type):
    """Fuser of ``(convt, bn)``: the fused pair in QAT, else the folded ConvTranspose."""
    def fuse(is_qat, conv, bn):
        if not is_qat:
            return fuse_conv_bn_eval(conv.eval(), bn.eval(), transpose=True)
        return FUSED_BN[convt_cls](conv, bn)

    return fuse


def fuse_bn_act_t(convt_cls: type):
    """Fuser of ``(convt, bn, act)``."""
    def fuse(is_qat, conv, bn, act):
        if not is_qat:
            return FUSED_ACT[convt_cls](fuse_conv_bn_eval(conv.eval(), bn.eval(), transpose=True), act)
        return FUSED_BN_ACT_T[convt_cls](conv, bn, act)

    return fuse
