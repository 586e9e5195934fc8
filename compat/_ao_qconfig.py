"""coremltools' ``LinearQuantizerConfig`` -> a torch.ao ``QConfigMapping`` (coremltools' choices).

The mapping compat's ``LinearQuantizer`` hands to ``prepare_qat_fx``, built with torch.ao's public
``QConfig`` / ``QConfigMapping`` / ``FakeQuantize`` and quanta's :mod:`quanta.compat._ao_modules`:

- activations: ``FakeQuantize`` (``algorithm: vanilla``) or quanta's ``LearnableFakeQuantize``
  (``learnable``) with the configured observer, per tensor, ``quint8`` by default; float
  activations (``activation_dtype: float32``) get a no-op observer;
- weights: per channel (axis 0; ConvTranspose axis 1) or per tensor, ``qint8``/``quint8`` and the
  ``weight_n_bits`` range (4-bit: ``[-8, 7]`` / ``[0, 15]``); Embedding weights per channel;
- sigmoid/tanh/softmax/hardsigmoid outputs: torch.ao's fixed qparams;
- ``module_type_configs`` / ``module_name_configs`` as coremltools sets them (a module name also
  names the ``.conv`` / ``.linear`` of a fused module; ``None`` leaves it float).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.ao.quantization as aoq
from torch import nn

from quanta.compat._ao_backend import FIXED_QPARAMS_OPS, supported_modules
from quanta.compat._ao_modules import (
    EMAMinMaxObserver,
    EMAPerChannelMinMaxObserver,
    FloatObserver,
    LearnableFakeQuantize,
)

__all__ = ["qconfig_mapping", "quant_range", "observer_class"]

_OBSERVERS = {
    ("moving_average_min_max", False): aoq.MovingAverageMinMaxObserver,
    ("moving_average_min_max", True): aoq.MovingAveragePerChannelMinMaxObserver,
    ("min_max", False): aoq.MinMaxObserver,
    ("min_max", True): aoq.PerChannelMinMaxObserver,
    ("ema_min_max", False): EMAMinMaxObserver,
    ("ema_min_max", True): EMAPerChannelMinMaxObserver,
}
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _value(x: Any) -> Any:
    return getattr(x, "value", x)


def observer_class(observer: Any, per_channel: bool):
    """coremltools' ``ObserverType`` -> the torch.ao-compatible observer class."""
    return _OBSERVERS[(str(_value(observer)), per_channel)]


def quant_range(n_bits: int, dtype: torch.dtype) -> tuple[int, int]:
    """The integer range of ``n_bits`` codes of ``dtype`` (unsigned for quint8/uint8)."""
    top = 2 ** n_bits
    if dtype in (torch.quint8, torch.uint8):
        return 0, top - 1
    return -top // 2, top // 2 - 1


def _qscheme(scheme: Any, per_channel: bool):
    symmetric = str(_value(scheme)) == "symmetric"
    if per_channel:
        return torch.per_channel_symmetric if symmetric else torch.per_channel_affine
    return torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine


def _fq_class(cfg):
    return LearnableFakeQuantize if cfg is not None and cfg.algorithm == "learnable" else aoq.FakeQuantize


def _weight_fq(cfg, qscheme=None, ch_axis: int | None = None):
    if cfg.weight_dtype == torch.float32:
        return FloatObserver.with_args(dtype=torch.float)
    kwargs: dict[str, Any] = {"observer": observer_class(cfg.weight_observer, cfg.weight_per_channel),
                              "dtype": cfg.weight_dtype,
                              "qscheme": qscheme or _qscheme(cfg.quantization_scheme, cfg.weight_per_channel)}
    if cfg.weight_per_channel:
        kwargs["ch_axis"] = 0 if ch_axis is None else ch_axis
    if cfg.weight_n_bits < 8:
        kwargs["quant_min"], kwargs["quant_max"] = quant_range(cfg.weight_n_bits, cfg.weight_dtype)
    return _fq_class(cfg).with_args(**kwargs)


def _activation_fq(cfg):
    if cfg.activation_dtype == torch.float32:
        return FloatObserver.with_args(dtype=torch.float)
    return _fq_class(cfg).with_args(observer=observer_class(cfg.activation_observer, False),
                                    dtype=cfg.activation_dtype, qscheme=_qscheme(cfg.quantization_scheme, False))


def _qconfig(cfg) -> aoq.QConfig:
    return aoq.QConfig(activation=_activation_fq(cfg), weight=_weight_fq(cfg))


def _adjust(mod_type: Any, qconfig: aoq.QConfig | None, cfg) -> aoq.QConfig | None:
    """Embedding: per-channel weights, float activations; ConvTranspose: per-channel axis 1."""
    if qconfig is None or cfg is None or cfg.weight_dtype == torch.float32:
        return qconfig
    if mod_type is nn.Embedding:
        return aoq.QConfig(activation=FloatObserver.with_args(dtype=torch.float),
                           weight=_weight_fq(_per_channel(cfg), torch.per_channel_affine_float_qparams, 0))
    if mod_type in _CONV_TRANSPOSE and cfg.weight_per_channel:
        return aoq.QConfig(activation=qconfig.activation, weight=_weight_fq(cfg, ch_axis=1))
    return qconfig


def _per_channel(cfg):
    import attrs

    return attrs.evolve(cfg, weight_per_channel=True) if not cfg.weight_per_channel else cfg


def _names_for(model: nn.Module, name: str) -> tuple[str, ...]:
    try:
        sub = model.get_submodule(name)
    except AttributeError:
        return (name,)
    if isinstance(sub, (nn.Conv2d, nn.ConvTranspose2d)):
        return name, f"{name}.conv"
    if isinstance(sub, nn.Linear):
        return name, f"{name}.linear"
    return (name,)


def qconfig_mapping(model: nn.Module, config, glob) -> aoq.QConfigMapping:
    """The ``QConfigMapping`` of ``config`` for ``model`` (``glob``: the effective global module config)."""
    mapping = aoq.QConfigMapping()
    defaults = aoq.get_default_qat_qconfig_mapping()
    for key, qc in defaults.object_type_qconfigs.items():
        if key in FIXED_QPARAMS_OPS:
            mapping.set_object_type(key, qc)
    base = _qconfig(config.global_config) if config.global_config is not None else _qconfig(glob)
    gcfg = config.global_config if config.global_config is not None else glob
    mapping.set_global(base)
    # coremltools also maps its quantizer types (convert compares a fused module's children's qconfigs)
    for mod_type in [*supported_modules(), aoq.FakeQuantize, FloatObserver, LearnableFakeQuantize]:
        if mod_type in FIXED_QPARAMS_OPS:
            continue
        mapping.set_object_type(mod_type, _adjust(mod_type, base, gcfg))
    for mod_type, cfg in config.module_type_configs.items():
        key = mod_type if not isinstance(mod_type, str) else getattr(nn, mod_type, mod_type)
        mapping.set_object_type(key, _adjust(key, _qconfig(cfg), cfg) if cfg is not None else None)
    for name, cfg in config.module_name_configs.items():
        qc = _qconfig(cfg) if cfg is not None else None
        try:
            qc = _adjust(type(model.get_submodule(name)), qc, cfg)
        except AttributeError:
            pass
        for n in _names_for(model, name):
            mapping.set_module_name(n, qc)
    return mapping
