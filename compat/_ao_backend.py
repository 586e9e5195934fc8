"""The torch.ao ``BackendConfig`` compat's ``LinearQuantizer`` prepares with (coremltools' choices).

coremltools prepares QAT models with ``torch.ao.quantization.quantize_fx.prepare_qat_fx`` and a
backend config of its own. This module writes quanta's equivalent with torch.ao's *public*
backend-config classes (``BackendConfig``, ``BackendPatternConfig``, ``DTypeConfig``,
``ObservationType``) and torch's own fused/QAT/reference modules: the same patterns, observation
types and dtype configs as coremltools 9.0 for

- Linear / Conv1d-3d (alone, + ReLU, + BatchNorm, + BatchNorm + ReLU: torch.ao's ``LinearReLU``,
  ``ConvReLU2d``, ``ConvBn2d``, ``ConvBnReLU2d``...), ConvTranspose1d-3d (quanta's QAT module,
  :mod:`quanta.compat._ao_modules`), Embedding (``nn.qat.Embedding``, inputs/outputs not observed);
- binary ops (add, mul, sub, matmul, einsum, alone or followed by an activation), ops that share
  their input's observer (cat, pooling, flatten, identity), activations and batch norm (their own
  observer), fixed-qparams activations (sigmoid, tanh, softmax, hardsigmoid).

Not mirrored: coremltools' private fused ``ConvAct`` / ``LinearAct`` modules for activations other
than ReLU (an activation after a conv/linear gets its own observer here; see docs/compat.md).
"""

from __future__ import annotations

import copy
import operator
from functools import lru_cache

import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.nn.qat as nnqat
import torch.ao.nn.quantized.reference as nnr
import torch.nn.functional as F
from torch import nn
from quanta.compat._ao_fused import (FUSED_ACT, FUSED_BN_ACT, QAT_ACT, QAT_BN_ACT, REF_ACT, fuse_bn_act,
                                     fuse_with_act)
from torch.ao.quantization.backend_config import (
    BackendConfig,
    BackendPatternConfig,
    DTypeConfig,
    DTypeWithConstraints,
    ObservationType,
)

__all__ = ["backend_config", "FIXED_QPARAMS_OPS", "MODULE_ACTIVATIONS", "share_qparams_ops"]

_DIFFERENT = ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT
_SHARE = ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT

#: activations (and their dtype configs) as coremltools lists them
MODULE_ACTIVATIONS = (nn.PReLU, nn.RReLU, nn.ReLU6, nn.LeakyReLU, nn.Sigmoid, nn.LogSigmoid, nn.Hardsigmoid, nn.SiLU,
                      nn.ELU, nn.CELU, nn.SELU, nn.GLU, nn.Mish, nn.GELU, nn.Tanh, nn.Hardtanh, nn.Softmax,
                      nn.LogSoftmax, nn.Hardswish)
_FUNC_ACTIVATIONS = (F.prelu, F.rrelu_, F.rrelu, F.relu6, F.leaky_relu, F.leaky_relu_, F.logsigmoid, F.silu, F.elu,
                     F.elu_, F.celu, F.celu_, F.selu, F.selu_, F.glu, F.mish, F.gelu, F.hardtanh, F.hardtanh_,
                     F.log_softmax, F.hardswish, torch.exp2)
#: activations whose output quantizer has fixed qparams (torch.ao's defaults for them)
FIXED_QPARAMS_OPS = {nn.Hardsigmoid, F.hardsigmoid, "hardsigmoid", "hardsigmoid_", nn.Sigmoid, torch.sigmoid,
                     "sigmoid", "sigmoid_", nn.Softmax, nn.Tanh, torch.tanh, "tanh", "tanh_"}

_ACT_DTYPES = [DTypeConfig(input_dtype=torch.quint8, output_dtype=torch.quint8),
               DTypeConfig(input_dtype=torch.quint8, output_dtype=torch.float),
               DTypeConfig(input_dtype=torch.float, output_dtype=torch.quint8)]
_WEIGHTED_DTYPES = [DTypeConfig(input_dtype=a, output_dtype=a, weight_dtype=w, bias_dtype=torch.float)
                    for a in (torch.float, torch.quint8) for w in (torch.qint8, torch.quint8)]


def _fuser(constructor):
    def fuse(is_qat, *mods):
        return constructor(*mods)

    return fuse


def _conv_bn_fuser(constructor):
    """conv + bn (+ relu): the fused module in QAT (torch.ao's ConvBn*), the folded conv otherwise."""
    def fuse(is_qat, conv, bn, *rest):
        if not is_qat:
            from torch.ao.quantization.fuser_method_mappings import fuse_conv_bn, fuse_conv_bn_relu

            return fuse_conv_bn(is_qat, conv, bn) if not rest else fuse_conv_bn_relu(is_qat, conv, bn, *rest)
        return constructor(conv, bn, *rest)

    return fuse


def _weighted(root, qat_mod, ref, fused=None, observed: bool = True) -> list[BackendPatternConfig]:
    """The pattern configs of a (fused) weighted module and its QAT module."""
    fused = fused or root
    main = (BackendPatternConfig(fused).set_observation_type(_DIFFERENT).set_dtype_configs(_WEIGHTED_DTYPES)
            .set_root_module(root).set_reference_quantized_module(ref))
    if qat_mod is not None:
        main.set_qat_module(qat_mod)
    if not observed:
        main.set_observation_type(ObservationType.INPUT_OUTPUT_NOT_OBSERVED)
    out = [main]
    if qat_mod is not None:
        out.append(BackendPatternConfig(qat_mod).set_observation_type(_DIFFERENT).set_dtype_configs(_WEIGHTED_DTYPES)
                   .set_root_module(root).set_reference_quantized_module(ref))
    return out


def _fusion(pattern, fused, fuser) -> BackendPatternConfig:
    return (BackendPatternConfig(pattern).set_dtype_configs(_WEIGHTED_DTYPES).set_fuser_method(fuser)
            .set_fused_module(fused))


def _conv_configs(dims: int) -> list[BackendPatternConfig]:
    conv, bn = getattr(nn, f"Conv{dims}d"), getattr(nn, f"BatchNorm{dims}d")
    func = getattr(F, f"conv{dims}d")
    conv_relu, conv_bn, conv_bn_relu = (getattr(nni, f"ConvReLU{dims}d"), getattr(nni, f"ConvBn{dims}d"),
                                        getattr(nni, f"ConvBnReLU{dims}d"))
    ref = getattr(nnr, f"Conv{dims}d")
    out = []
    for act in (nn.ReLU, F.relu):
        out.append(_fusion((conv, act), conv_relu, _fuser(conv_relu)))
        out.append(BackendPatternConfig((func, act)).set_observation_type(_DIFFERENT)
                   .set_dtype_configs(_WEIGHTED_DTYPES))
        out.append(_fusion((conv, bn, act), conv_bn_relu, _conv_bn_fuser(conv_bn_relu)))
    out.append(_fusion((conv, bn), conv_bn, _conv_bn_fuser(conv_bn)))
    out += _weighted(conv, getattr(nniqat, f"ConvReLU{dims}d"), ref, conv_relu)
    out += _weighted(conv, getattr(nniqat, f"ConvBn{dims}d"), ref, conv_bn)
    out += _weighted(conv, getattr(nniqat, f"ConvBnReLU{dims}d"), ref, conv_bn_relu)
    out += _weighted(conv, getattr(nnqat, f"Conv{dims}d"), ref)
    out += _act_fusions(conv, func, ref, MODULE_ACTIVATIONS)
    for act in MODULE_ACTIVATIONS:  # conv + bn + act (other than ReLU)
        out.append(_fusion((conv, bn, act), FUSED_BN_ACT[conv], fuse_bn_act(conv)))
    out += _weighted(FUSED_ACT[conv], QAT_BN_ACT[conv], REF_ACT[conv], FUSED_BN_ACT[conv])
    out.append(BackendPatternConfig(func).set_observation_type(_DIFFERENT).set_dtype_configs(_WEIGHTED_DTYPES)
               ._set_input_type_to_index({"weight": 1, "bias": 2}))
    return out


def _act_fusions(root, func, ref, acts) -> list[BackendPatternConfig]:
    """``(root, act)`` fused into quanta's ``ConvAct``/``LinearAct`` (one quantizer after the act)."""
    out = []
    for act in acts:
        out.append(_fusion((root, act), FUSED_ACT[root], fuse_with_act(root)))
        if func is not None:
            out.append(BackendPatternConfig((func, act)).set_observation_type(_DIFFERENT)
                       .set_dtype_configs(_WEIGHTED_DTYPES))
    return out + _weighted(FUSED_ACT[root], QAT_ACT[root], REF_ACT[root])


def _conv_transpose_configs(dims: int) -> list[BackendPatternConfig]:
    from quanta.compat._ao_modules import QAT_CONV_TRANSPOSE

    from quanta.compat._ao_convt_bn import FUSED_BN, FUSED_BN_ACT_T, QAT_BN, QAT_BN_ACT_T, fuse_bn, fuse_bn_act_t

    root, bn = getattr(nn, f"ConvTranspose{dims}d"), getattr(nn, f"BatchNorm{dims}d")
    ref = getattr(nnr, f"ConvTranspose{dims}d")
    acts = (*MODULE_ACTIVATIONS, nn.ReLU)
    out = _weighted(root, QAT_CONV_TRANSPOSE[root], ref) + _act_fusions(root, None, ref, acts)
    out.append(_fusion((root, bn), FUSED_BN[root], fuse_bn(root)))
    out += _weighted(root, QAT_BN[root], ref, FUSED_BN[root])
    out += [_fusion((root, bn, act), FUSED_BN_ACT_T[root], fuse_bn_act_t(root)) for act in acts]
    return out + _weighted(FUSED_ACT[root], QAT_BN_ACT_T[root], REF_ACT[root], FUSED_BN_ACT_T[root])


def _linear_configs() -> list[BackendPatternConfig]:
    out = []
    for act in (nn.ReLU, F.relu):
        out.append(_fusion((nn.Linear, act), nni.LinearReLU, _fuser(nni.LinearReLU)))
        out.append(BackendPatternConfig((F.linear, act)).set_observation_type(_DIFFERENT)
                   .set_dtype_configs(_WEIGHTED_DTYPES))
    out.append(_fusion((nn.Linear, nn.BatchNorm1d), nni.LinearBn1d, _fuser(nni.LinearBn1d)))
    out += _weighted(nn.Linear, nniqat.LinearReLU, nnr.Linear, nni.LinearReLU)
    out += _weighted(nn.Linear, nniqat.LinearBn1d, nnr.Linear, nni.LinearBn1d)
    out += _weighted(nn.Linear, nnqat.Linear, nnr.Linear)
    out += _act_fusions(nn.Linear, F.linear, nnr.Linear, MODULE_ACTIVATIONS)
    out.append(BackendPatternConfig(F.linear).set_observation_type(_DIFFERENT).set_dtype_configs(_WEIGHTED_DTYPES)
               ._set_input_type_to_index({"weight": 1, "bias": 2}))
    return out


def _act_configs(ops, constraints: DTypeWithConstraints | None = None, observation=_DIFFERENT):
    dtypes = []
    for d in _ACT_DTYPES:
        d = copy.deepcopy(d)
        if constraints is not None and d.output_dtype == torch.quint8:
            d.output_dtype_with_constraints = constraints
        dtypes.append(d)
    return [BackendPatternConfig(op).set_observation_type(observation).set_dtype_configs(dtypes) for op in ops]


def _fixed(scale: float, zero_point: int) -> DTypeWithConstraints:
    return DTypeWithConstraints(dtype=torch.quint8, quant_min_lower_bound=0, quant_max_upper_bound=255,
                                scale_exact_match=scale, zero_point_exact_match=zero_point)


#: ops whose output shares its input's observer (coremltools' list)
_SHARED = [nn.Identity, torch.cat, nn.MaxPool1d, F.max_pool1d, nn.MaxPool2d, F.max_pool2d, nn.MaxPool3d, F.max_pool3d,
           nn.AdaptiveAvgPool1d, F.adaptive_avg_pool1d, torch.adaptive_avg_pool1d, nn.AdaptiveAvgPool2d,
           F.adaptive_avg_pool2d, nn.AdaptiveAvgPool3d, F.adaptive_avg_pool3d, nn.AvgPool1d, F.avg_pool1d,
           torch.avg_pool1d, torch.mean, nn.AvgPool2d, F.avg_pool2d, torch._C._nn.avg_pool2d, nn.AvgPool3d,
           F.avg_pool3d, torch._C._nn.avg_pool3d, nn.Flatten, torch.flatten]


@lru_cache(maxsize=1)
def backend_config() -> BackendConfig:
    """The backend config (built once)."""
    configs: list[BackendPatternConfig] = []
    for dims in (1, 2, 3):
        configs += _conv_configs(dims) + _conv_transpose_configs(dims)
    configs += _linear_configs()
    configs += _weighted(nn.Embedding, nnqat.Embedding, nnr.Embedding, observed=False)
    configs += _weighted(nn.EmbeddingBag, nnqat.EmbeddingBag, nnr.EmbeddingBag, observed=False)
    acts = list(MODULE_ACTIVATIONS) + list(_FUNC_ACTIVATIONS) + [nn.ReLU, F.relu, torch.relu]
    for op in (operator.add, torch.add, operator.mul, torch.mul, torch.matmul, torch.einsum):
        configs += _act_configs([(op, act) for act in acts])
    configs += _act_configs([operator.sub, torch.sub, operator.add, torch.add, operator.mul, torch.mul, torch.matmul,
                             torch.einsum])
    configs += _act_configs(_SHARED, observation=_SHARE)
    configs += _act_configs([nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d])
    for bn, fused in ((nn.BatchNorm2d, nni.BNReLU2d), (nn.BatchNorm3d, nni.BNReLU3d)):
        for act in (nn.ReLU, F.relu):
            configs.append(_fusion((bn, act), fused, _fuser(fused)))
        configs += _act_configs([fused])
    configs += _act_configs([nn.Softmax], _fixed(1.0 / 256.0, 0))
    configs += _act_configs([nn.Sigmoid, F.sigmoid], _fixed(1.0 / 256.0, 0))
    configs += _act_configs([nn.Hardsigmoid, F.hardsigmoid], _fixed(1.0 / 256.0, 0))
    configs += _act_configs([nn.Tanh, F.tanh], _fixed(2.0 / 256.0, 128))
    plain = [op for op in MODULE_ACTIVATIONS if op not in FIXED_QPARAMS_OPS]
    configs += _act_configs(plain + [nn.ReLU, F.relu, F.relu_] + list(_FUNC_ACTIVATIONS))
    return BackendConfig("quanta_coreml").set_backend_pattern_configs(configs)


def share_qparams_ops() -> set:
    """The ops whose output shares its input's observer."""
    return {c.pattern for c in backend_config().configs if c.observation_type == _SHARE}


def supported_modules() -> list:
    """The module types the backend config quantizes (single-module patterns)."""
    return [c.pattern for c in backend_config().configs if isinstance(c.pattern, type)]
