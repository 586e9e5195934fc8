"""coremltools.optimize.coreml's names over quanta's ``coreml`` backend.

``import quanta.compat as cto`` then ``cto.coreml.OpLinearQuantizerConfig``,
``cto.coreml.OptimizationConfig``, ``cto.coreml.linear_quantize_weights(model, config)``.
For the built-in modes the result's stored weights equal coremltools' own output: the same
ops are selected (coremltools' eligibility and axes, ``weight_threshold`` counted the same
way) and codes are computed in the weights' own dtype (fp16), as coremltools does.
"""

from __future__ import annotations

import types as _pytypes
from typing import Any

import attrs

from ..errors import ConfigError, QuantaError

__all__ = ["OpLinearQuantizerConfig", "OptimizationConfig", "linear_quantize_weights", "experimental"]


def _text(value: Any) -> Any:
    if value is None:
        return None
    value = getattr(value, "value", value)
    if isinstance(value, type):
        try:
            from coremltools.converters.mil.mil import types as mil_types

            return mil_types.builtin_to_string(value)
        except Exception:  # not a MIL builtin: numpy/torch dtypes are parsed by quanta
            return value
    return value


@attrs.define(kw_only=True)
class OpLinearQuantizerConfig:
    """coremltools' ``OpLinearQuantizerConfig``: ``mode`` ("linear_symmetric" or "linear"), ``dtype``
    ("int8", "uint8", "int4", "uint4"), ``granularity`` ("per_tensor", "per_channel", "per_block"),
    ``block_size`` and ``weight_threshold`` (weights with at most this many elements stay float)."""

    mode: str = "linear_symmetric"
    dtype: Any = "int8"
    granularity: Any = "per_channel"
    block_size: Any = None
    weight_threshold: int | None = 2048

    @classmethod
    def from_dict(cls, config_dict: dict) -> "OpLinearQuantizerConfig":
        return cls(**config_dict)

    def as_layer_dict(self) -> dict:
        out = {"mode": str(_text(self.mode)).lower(), "dtype": _text(self.dtype),
               "granularity": str(_text(self.granularity)).lower()}
        if out["granularity"] == "per_block":
            out["block_size"] = self.block_size
        if self.weight_threshold is not None:
            # coremltools quantizes weights with *more* than weight_threshold elements;
            # quanta skips weights with *fewer* than its threshold.
            out["weight_threshold"] = int(self.weight_threshold) + 1
        return out


def _layer(value: Any):
    if value is None:
        return None
    if isinstance(value, OpLinearQuantizerConfig):
        return value.as_layer_dict()
    if isinstance(value, dict):
        return OpLinearQuantizerConfig(**value).as_layer_dict()
    fields = ("mode", "dtype", "granularity", "block_size", "weight_threshold")
    if all(hasattr(value, f) for f in fields):  # coremltools' own config object
        return OpLinearQuantizerConfig(**{f: getattr(value, f) for f in fields}).as_layer_dict()
    raise ConfigError(f"expected an OpLinearQuantizerConfig, got {type(value).__name__}", "config")


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
            return None if v is None else OpLinearQuantizerConfig.from_dict(dict(v))

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
    result = quanta.quantize(work, _recipe(_as_config(config), backend, work), backend="coreml")
    return result.to_mlmodel()


def _linear_quantize_activations(mlmodel, config, sample_data, calibration_op_group_size: int = -1):
    """coremltools' ``experimental.linear_quantize_activations`` (W8A8 calibration on Linux): not yet in quanta."""
    raise QuantaError("linear_quantize_activations is not implemented yet in quanta (issue #4, part 5); "
                      "use coremltools.optimize.coreml.experimental.linear_quantize_activations on macOS")


experimental = _pytypes.SimpleNamespace(linear_quantize_activations=_linear_quantize_activations,
                                        OpActivationLinearQuantizerConfig=OpLinearQuantizerConfig)
