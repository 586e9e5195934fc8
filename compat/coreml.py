"""coremltools.optimize.coreml's names over quanta's ``coreml`` backend.

``import quanta.compat as cto`` then ``cto.coreml.OpLinearQuantizerConfig``,
``cto.coreml.OptimizationConfig``, ``cto.coreml.linear_quantize_weights(model, config)``,
``cto.coreml.decompress_weights(model)`` and ``cto.coreml.get_weights_metadata(model)``.
``OpLinearQuantizerConfig`` is coremltools' own class (its fields, defaults, ``nbits`` and
validation); it becomes a quanta layer config in :func:`quanta.compat.recipes.coreml_layer`.
For the built-in modes the result's stored weights equal coremltools' own output: the same
ops are selected (coremltools' eligibility and axes, ``weight_threshold`` counted the same
way) and codes are computed in the weights' own dtype (fp16), as coremltools does.
"""

from __future__ import annotations

import types as _pytypes
from typing import Any

import attrs
import numpy as np

from coremltools.optimize.coreml import OpLinearQuantizerConfig

from quanta.compat.recipes import coreml_layer
from quanta.errors import ConfigError, did_you_mean

__all__ = ["OpLinearQuantizerConfig", "OptimizationConfig", "linear_quantize_weights", "decompress_weights",
           "get_weights_metadata", "experimental"]


def _layer(value: Any, key: str = "config"):
    if value is None:
        return None
    if isinstance(value, dict):
        try:
            value = OpLinearQuantizerConfig(**value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc), key) from None
    if all(hasattr(value, f) for f in ("mode", "dtype", "granularity", "block_size", "weight_threshold")):
        return coreml_layer(value, key)
    raise ConfigError(f"expected an OpLinearQuantizerConfig, got {type(value).__name__}", key)


@attrs.define(kw_only=True)
class OptimizationConfig:
    """coremltools' ``OptimizationConfig``: a global op config, per op type (``"linear"``, ``"conv"``,
    ``"matmul"``...) and per op name (the const's name or the consuming op's name)."""

    global_config: Any = None
    op_type_configs: dict = attrs.field(factory=dict, converter=lambda v: dict(v or {}))
    op_name_configs: dict = attrs.field(factory=dict, converter=lambda v: dict(v or {}))

    def set_global(self, op_config) -> None:
        self.global_config = op_config

    def set_op_type(self, op_type: str, op_config) -> None:
        self.op_type_configs[op_type] = op_config

    def set_op_name(self, op_name: str, op_config) -> None:
        self.op_name_configs[op_name] = op_config

    @classmethod
    def from_dict(cls, config_dict: dict) -> "OptimizationConfig":
        def conv(v):
            return None if v is None else OpLinearQuantizerConfig(**dict(v))

        return cls(global_config=conv(config_dict.get("global_config")),
                   op_type_configs={k: conv(v) for k, v in (config_dict.get("op_type_configs") or {}).items()},
                   op_name_configs={k: conv(v) for k, v in (config_dict.get("op_name_configs") or {}).items()})


def _as_config(config) -> OptimizationConfig:
    if config is None:
        return OptimizationConfig(global_config=OpLinearQuantizerConfig())
    if isinstance(config, OptimizationConfig):
        return config
    if isinstance(config, dict):
        return OptimizationConfig.from_dict(config)
    if hasattr(config, "global_config") and hasattr(config, "op_type_configs"):
        return OptimizationConfig(global_config=config.global_config, op_type_configs=config.op_type_configs,
                                  op_name_configs=config.op_name_configs)
    raise ConfigError(f"expected an OptimizationConfig, got {type(config).__name__}", "config")


def _recipe(config: OptimizationConfig, backend, model) -> dict:
    consumers = backend.consumer_names(model)
    names = {}
    for name, op_config in config.op_name_configs.items():
        for const_name in consumers.get(name, [name]):
            names[const_name] = _layer(op_config)
    return {"global_config": _layer(config.global_config),
            "module_type_configs": {k: _layer(v) for k, v in config.op_type_configs.items()},
            "module_name_configs": names, "on_unsupported_layer": "skip"}


def linear_quantize_weights(mlmodel, config=None, joint_compression: bool = False):
    """Quantize the weights of a Core ML model (MLModel or ``.mlpackage`` path); returns a new MLModel.

    Same contract as ``coremltools.optimize.coreml.linear_quantize_weights``; the model is not modified.
    """
    import quanta
    from quanta import registry

    if joint_compression:
        raise ConfigError("joint_compression is not supported by quanta", "joint_compression")
    backend = registry.get("backend", "coreml").obj
    work = backend.copy(mlmodel)
    _refuse_multifunction(work.source, "linear_quantize_weights")
    result = quanta.quantize(work, _recipe(_as_config(config), backend, work), backend="coreml")
    return result.to_mlmodel()


# ---------------------------------------------------------------- experimental: activations (W8A8)

_ACTIVATION_MODES = ("linear_symmetric", "linear")
_ACTIVATION_DTYPES = ("int8", "uint8")
_GRANULARITIES = ("per_tensor", "per_channel", "per_block")
_ACTIVATION_CONFIG_KEYS = ("mode", "dtype", "granularity", "block_size", "weight_threshold")
_OPTIMIZATION_CONFIG_KEYS = ("config_type", "global_config", "op_type_configs", "op_name_configs")


def _lower(value: Any) -> Any:
    value = getattr(value, "value", value)  # enums such as CompressionGranularity
    return value.lower() if isinstance(value, str) else value


def _activation_dtype(value: Any) -> Any:
    """"int8", np.int8, np.dtype("uint8") or a MIL builtin (types.int8) -> "int8"/"uint8"."""
    if isinstance(value, str):
        return value.lower()
    from coremltools.converters.mil.mil import types as mil_types

    if mil_types.is_builtin(value):
        return mil_types.builtin_to_string(value)
    try:
        return np.dtype(value).name
    except TypeError:
        return value


def _one_of(field: str, allowed: tuple):
    def check(instance, attribute, value):
        if value not in allowed:
            raise ConfigError(f"must be one of {list(allowed)}, got {value!r}", field)

    return check


def _check_threshold(instance, attribute, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(f"must be a non-negative int or None, got {value!r}", "weight_threshold")


@attrs.frozen(kw_only=True)
class OpActivationLinearQuantizerConfig:
    """coremltools' experimental ``OpActivationLinearQuantizerConfig``: how activations are quantized.

    ``mode``: "linear_symmetric" (scale = max(|min|, |max|) / 127, no zero point for int8) or
    "linear" (range widened to contain 0, with a zero point); ``dtype``: "int8" or "uint8"
    (also np.int8 or a MIL type). ``granularity``, ``block_size`` and ``weight_threshold`` are
    accepted and checked, as coremltools does, but do not apply to activations: each tensor has
    one scale. Invalid values raise ``ConfigError`` (a ``ValueError``) naming the field.
    """

    mode: str = attrs.field(default="linear_symmetric", converter=_lower, validator=_one_of("mode", _ACTIVATION_MODES))
    dtype: Any = attrs.field(default="int8", converter=_activation_dtype,
                             validator=_one_of("dtype", _ACTIVATION_DTYPES))
    granularity: Any = attrs.field(default="per_channel", converter=_lower,
                                   validator=_one_of("granularity", _GRANULARITIES))
    block_size: Any = 32
    weight_threshold: int | None = attrs.field(default=2048, validator=_check_threshold)

    @classmethod
    def from_dict(cls, config_dict: dict, key: str = "config") -> "OpActivationLinearQuantizerConfig":
        """Build from a dict; unknown keys raise ``ConfigError`` naming them."""
        if not isinstance(config_dict, dict):
            raise ConfigError(f"expected a dict, got {type(config_dict).__name__}", key)
        for name in config_dict:
            if name not in _ACTIVATION_CONFIG_KEYS:
                raise ConfigError(f"unknown key {name!r}{did_you_mean(str(name), _ACTIVATION_CONFIG_KEYS)} "
                                  f"(allowed: {list(_ACTIVATION_CONFIG_KEYS)})", f"{key}.{name}")
        return cls(**config_dict)

    def to_coremltools(self):
        """The equivalent ``coremltools.optimize.coreml.experimental.OpActivationLinearQuantizerConfig``."""
        from coremltools.optimize.coreml.experimental import OpActivationLinearQuantizerConfig as CtConfig

        return CtConfig(mode=self.mode, dtype=self.dtype, weight_threshold=self.weight_threshold)


def _activation_op_config(value: Any, key: str):
    if value is None:
        return None
    if isinstance(value, OpActivationLinearQuantizerConfig):
        return value.to_coremltools()
    if isinstance(value, dict):
        return OpActivationLinearQuantizerConfig.from_dict(value, key).to_coremltools()
    if all(hasattr(value, f) for f in ("mode", "dtype")):  # the weight config, ours or coremltools'
        try:
            config = OpActivationLinearQuantizerConfig(mode=value.mode, dtype=value.dtype)
        except ConfigError as e:
            raise ConfigError(str(e), f"{key}.{e.key}") from None
        return config.to_coremltools()
    raise ConfigError(f"expected an OpActivationLinearQuantizerConfig, got {type(value).__name__}", key)


def _activation_config(config: Any):
    """quanta's or coremltools' OptimizationConfig, or a dict -> coremltools' OptimizationConfig."""
    from coremltools.optimize.coreml import OptimizationConfig as CtOptimizationConfig

    if config is None:
        config = {"global_config": {}}
    if isinstance(config, dict):
        for name in config:
            if name not in _OPTIMIZATION_CONFIG_KEYS:
                raise ConfigError(f"unknown key {name!r}{did_you_mean(str(name), _OPTIMIZATION_CONFIG_KEYS)} "
                                  f"(allowed: {list(_OPTIMIZATION_CONFIG_KEYS)})", f"config.{name}")
        kind = config.get("config_type", "OpActivationLinearQuantizerConfig")
        if kind not in ("OpActivationLinearQuantizerConfig", "OpLinearQuantizerConfig"):
            raise ConfigError(f"must be 'OpActivationLinearQuantizerConfig', got {kind!r}", "config.config_type")
        parts = (config.get("global_config"), config.get("op_type_configs") or {}, config.get("op_name_configs") or {})
    elif all(hasattr(config, f) for f in ("global_config", "op_type_configs", "op_name_configs")):
        parts = (config.global_config, config.op_type_configs or {}, config.op_name_configs or {})
    else:
        raise ConfigError(f"expected an OptimizationConfig, got {type(config).__name__}", "config")
    global_config, type_configs, name_configs = parts
    return CtOptimizationConfig(
        global_config=_activation_op_config(global_config, "global_config"),
        op_type_configs={k: _activation_op_config(v, f"op_type_configs.{k}") for k, v in dict(type_configs).items()},
        op_name_configs={k: _activation_op_config(v, f"op_name_configs.{k}") for k, v in dict(name_configs).items()},
    )


def _linear_quantize_activations(mlmodel, config, sample_data, calibration_op_group_size: int = -1):
    """coremltools' ``experimental.linear_quantize_activations`` on any OS: a new MLModel with 8-bit activations.

    ``mlmodel``: an ML program ``MLModel`` or ``.mlpackage`` path (not modified). ``config``: an
    ``OptimizationConfig`` (quanta's or coremltools') of ``OpActivationLinearQuantizerConfig``
    (``OpLinearQuantizerConfig`` is accepted too; only mode and dtype apply), or the same as a
    dict. ``sample_data``: a list of input dicts (input name, or ``None`` for a single-input
    model, -> array). Calibration runs the program with quanta's numpy runner instead of
    ``MLModel.predict``; the quantize/dequantize insertion is coremltools' own graph passes
    (:mod:`quanta.plugins.coreml.activations`). ``calibration_op_group_size`` is accepted for
    compatibility and has no effect (it splits coremltools' temporary models on macOS).
    Follow with ``linear_quantize_weights`` for W8A8.
    """
    from quanta.plugins.coreml import activations

    if isinstance(calibration_op_group_size, bool) or not isinstance(calibration_op_group_size, int) or (
            calibration_op_group_size < 1 and calibration_op_group_size != -1):
        raise ConfigError(f"must be -1 or a positive int, got {calibration_op_group_size!r}",
                          "calibration_op_group_size")
    return activations.linear_quantize_activations(mlmodel, _activation_config(config), sample_data)


experimental = _pytypes.SimpleNamespace(linear_quantize_activations=_linear_quantize_activations,
                                        OpActivationLinearQuantizerConfig=OpActivationLinearQuantizerConfig)


def decompress_weights(mlmodel):
    """coremltools' ``decompress_weights``: a new MLModel whose linearly quantized weights are float
    consts again (quanta's dequantization; palettized or sparse weights are refused naming the op)."""
    from quanta.plugins.coreml.decompress import decompress_weights as _decompress

    return _decompress(_refuse_multifunction(mlmodel, "decompress_weights"))


def get_weights_metadata(mlmodel, weight_threshold: int = 2048):
    """coremltools' ``get_weights_metadata``: ``{const name: CoreMLWeightMetaData}`` for the float weights
    with more than ``weight_threshold`` elements (value, sparsity, unique values, consuming ops)."""
    from quanta.plugins.coreml.decompress import weights_metadata

    if isinstance(weight_threshold, bool) or not isinstance(weight_threshold, int) or weight_threshold < 0:
        raise ConfigError(f"must be a non-negative int, got {weight_threshold!r}", "weight_threshold")
    return weights_metadata(_refuse_multifunction(mlmodel, "get_weights_metadata"), weight_threshold)


def _refuse_multifunction(mlmodel, api: str):
    """The loaded MLModel; a ConfigError (a ValueError, as coremltools raises) for a multifunction model,
    which coremltools' compression APIs refuse."""
    from quanta.plugins.coreml.backend import load_mlmodel

    model = load_mlmodel(mlmodel)
    is_multi = getattr(model, "_is_multifunction", None)
    if callable(is_multi) and is_multi():
        raise ConfigError(f"{api} is not supported for a multifunction model (as in coremltools); "
                          "quantize each function's model before combining them", "mlmodel")
    return model
