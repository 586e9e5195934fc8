"""coremltools' ``LinearQuantizer`` names over ``quanta.Quantizer`` (algorithm ``qat``).

The seed's calibration recipe (milestones ``[0, 1000, 1000, 0]``, one ``step()``, forwards
under no_grad, ``finalize()``) and its QAT YAML work unchanged::

    config = LinearQuantizerConfig.from_yaml("config.yaml")
    quantizer = LinearQuantizer(model, config)
    model = quantizer.prepare(example_inputs=torch.rand(1, 1, 20, 20), inplace=True)
    ...  # training loop calling quantizer.step()
    model = quantizer.finalize(inplace=True)

Defaults follow coremltools: symmetric int8 per-channel weights, ``quint8`` activations with
``moving_average_min_max`` observers. Weight observers always take the current weight's range
(``weight_observer`` is accepted for compatibility).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import attrs
import torch

from quanta.compat.convert import annotate_for_coreml
from quanta.compat.schemes import PTQ_GRID, pinned_scheme
from quanta.errors import ConfigError, did_you_mean
from quanta._run.quantizer import Quantizer
from quanta._recipes.yaml_reader import read_yaml_mapping, reject_unknown_keys, require_mapping

__all__ = ["ModuleLinearQuantizerConfig", "LinearQuantizerConfig", "LinearQuantizer"]

_OBSERVERS = {"moving_average_min_max": "moving_average_minmax", "min_max": "minmax",
              "moving_average_minmax": "moving_average_minmax", "minmax": "minmax"}
_TORCH_DTYPES = {torch.qint8: "int8", torch.quint8: "uint8", torch.float32: "float32"}


def _text(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return _TORCH_DTYPES.get(value, str(value))
    value = getattr(value, "value", value)  # enums
    return value


def _weight_dtype(value: Any) -> str:
    text = str(_text(value)).lower().removeprefix("torch.")
    return {"qint8": "int8", "quint8": "uint8"}.get(text, text)


def _observer(value: Any, key: str) -> str:
    text = str(_text(value)).lower()
    if text not in _OBSERVERS:
        raise ConfigError(f"unknown observer {value!r}{did_you_mean(text, _OBSERVERS)} "
                          f"(allowed: {', '.join(sorted(_OBSERVERS))})", key)
    return _OBSERVERS[text]


@attrs.define(kw_only=True)
class ModuleLinearQuantizerConfig:
    """coremltools' per-module QAT options.

    ``weight_dtype`` (``"qint8"``/``torch.qint8``/``"int4"``...), ``weight_per_channel``,
    ``weight_observer`` (accepted; weights always use their current min/max),
    ``activation_dtype`` (``torch.quint8`` default, ``torch.qint8``, ``torch.float32`` = weights only),
    ``activation_observer`` (``"moving_average_min_max"`` or ``"min_max"``),
    ``quantization_scheme`` (``"symmetric"``/``"affine"``, weights and activations),
    ``milestones`` (``[observers_on, fake_quant_on, observers_off, bn_frozen]`` in ``step()`` calls).
    """

    algorithm: Any = "vanilla"
    weight_dtype: Any = "qint8"
    weight_observer: Any = "moving_average_min_max"
    weight_per_channel: bool = True
    activation_dtype: Any = "quint8"
    activation_observer: Any = "moving_average_min_max"
    quantization_scheme: Any = "symmetric"
    milestones: Any = None

    @classmethod
    def from_dict(cls, config_dict: dict) -> "ModuleLinearQuantizerConfig":
        config_dict = require_mapping(config_dict, f"a {cls.__name__} dict")
        reject_unknown_keys(config_dict, [f.name for f in attrs.fields(cls)])
        return cls(**config_dict)

    def layer_dict(self) -> dict:
        """The weight part, as quanta layer keys."""
        if str(_text(self.algorithm)) != "vanilla":
            raise ConfigError(f"only the 'vanilla' QAT algorithm is supported, got {self.algorithm!r}", "algorithm")
        _observer(self.weight_observer, "weight_observer")
        return {"weight_dtype": _weight_dtype(self.weight_dtype),
                "granularity": "per_channel" if self.weight_per_channel else "per_tensor",
                "quantization_scheme": pinned_scheme(str(_text(self.quantization_scheme)), PTQ_GRID)}

    def algorithm_options(self) -> dict:
        """The activation and milestone part, as ``qat`` options."""
        milestones = self.milestones
        return {"milestones": list(milestones) if milestones is not None else None,
                "activation_dtype": _weight_dtype(self.activation_dtype),
                "activation_observer": _observer(self.activation_observer, "activation_observer")}


def _module_config(value: Any, key: str) -> ModuleLinearQuantizerConfig | None:
    if value is None or isinstance(value, ModuleLinearQuantizerConfig):
        return value
    if isinstance(value, dict):
        try:
            return ModuleLinearQuantizerConfig.from_dict(value)
        except ConfigError as exc:
            raise ConfigError(str(exc), key) from None
    raise ConfigError(f"expected a mapping or null, got {type(value).__name__}", key)


@attrs.define(kw_only=True)
class LinearQuantizerConfig:
    """``global_config``, ``module_type_configs``, ``module_name_configs`` (null = leave float),
    ``non_traceable_module_names`` (kept opaque and float) and ``preserved_attributes`` (accepted)."""

    global_config: Any = None
    module_type_configs: dict = attrs.field(factory=OrderedDict)
    module_name_configs: dict = attrs.field(factory=OrderedDict)
    non_traceable_module_names: list = attrs.field(factory=list)
    preserved_attributes: list = attrs.field(factory=list)

    def __attrs_post_init__(self):
        self.global_config = _module_config(self.global_config, "global_config")
        self.module_type_configs = {k: _module_config(v, f"module_type_configs.{getattr(k, '__name__', k)}")
                                    for k, v in (self.module_type_configs or {}).items()}
        self.module_name_configs = {k: _module_config(v, f"module_name_configs.{k}")
                                    for k, v in (self.module_name_configs or {}).items()}

    @classmethod
    def from_dict(cls, config_dict: dict) -> "LinearQuantizerConfig":
        """Build from coremltools' dict shape; unknown keys fail naming the key."""
        config_dict = require_mapping(config_dict, f"a {cls.__name__} dict")
        reject_unknown_keys(config_dict, [f.name for f in attrs.fields(cls)])
        cfg = cls(**config_dict)
        cfg.to_recipe_dict()  # validates every module config now
        return cfg

    @classmethod
    def from_yaml(cls, path) -> "LinearQuantizerConfig":
        """Read the same shape from a YAML file (the seed's config works unchanged)."""
        return cls.from_dict(read_yaml_mapping(path, what=f"{cls.__name__} file"))

    def to_recipe_dict(self) -> dict:
        """The equivalent quanta recipe dict (algorithm ``qat``)."""
        glob = self.global_config or ModuleLinearQuantizerConfig()
        options = glob.algorithm_options()
        defaults = ModuleLinearQuantizerConfig().algorithm_options()
        for key, cfg in [*self.module_type_configs.items(), *self.module_name_configs.items()]:
            if cfg is not None and cfg.algorithm_options() not in (options, defaults):
                raise ConfigError("per-module milestones or activation settings are not supported; set them "
                                  "in global_config", f"{getattr(key, '__name__', key)}")
        names = {k: (None if v is None else v.layer_dict()) for k, v in self.module_name_configs.items()}
        for name in self.non_traceable_module_names:
            names.setdefault(name, None)
        out: dict[str, Any] = {"algorithm": "qat", "global_config": glob.layer_dict(), "algorithm_config": options}
        if self.module_type_configs:
            out["module_type_configs"] = {k: (None if v is None else v.layer_dict())
                                          for k, v in self.module_type_configs.items()}
        if names:
            out["module_name_configs"] = names
        return out


class LinearQuantizer:
    """``LinearQuantizer(model, config)``: ``prepare(example_inputs, inplace)``, ``step()``,
    ``finalize(model=None, inplace=False)``, as in coremltools; built on ``quanta.Quantizer``."""

    def __init__(self, model, config: LinearQuantizerConfig | dict | None = None):
        if config is None:
            config = LinearQuantizerConfig()
        elif isinstance(config, dict):
            config = LinearQuantizerConfig.from_dict(config)
        self._config = config
        self._model = model
        self._quantizer = Quantizer(model, config.to_recipe_dict())
        self._result = None

    def prepare(self, example_inputs: Any = None, inplace: bool = False):
        """Returns the fake-quant ``torch.fx.GraphModule`` (a copy unless ``inplace``).

        ``inplace=True``: the model passed in shares the prepared model's parameters, and calling
        it runs the prepared model, so coremltools' documented calibration loop (``model(data)``
        after ``prepare(..., inplace=True)``, return value unused) feeds the observers.
        """
        prepared = self._quantizer.prepare(example_inputs=example_inputs, inplace=inplace)
        if inplace and prepared is not self._model:
            # An instance attribute wins over the class's forward in nn.Module.__call__; fx tracing
            # uses type(model).forward, so the model can still be prepared again.
            object.__setattr__(self._model, "forward", prepared.forward)
        return prepared

    def step(self) -> None:
        """One training step: applies the milestones reached."""
        self._quantizer.step()

    def finalize(self, model=None, inplace: bool = False):
        """The quantized model: quanta weight records and quantize/dequantize activations, annotated so
        that plain ``ct.convert(torch.jit.trace(model, x), minimum_deployment_target=ct.target.iOS17)``
        stores int8 weights (``constexpr_affine_dequantize``); warns naming the minimum target and
        sets ``model.coreml_minimum_deployment_target``."""
        self._result = self._quantizer.finalize(model, inplace=inplace)
        activations = self._config_activations()
        return annotate_for_coreml(self._result, activation_quantization=activations)

    def _config_activations(self) -> bool:
        glob = self._config.global_config or ModuleLinearQuantizerConfig()
        return glob.algorithm_options()["activation_dtype"] != "float32"

    @property
    def minimum_deployment_target(self):
        """The lowest ``ct.target`` that stores the last ``finalize()``'s weights compressed (or None)."""
        return getattr(self._result, "coreml_minimum_deployment_target", None)

    def report(self):
        """The quanta :class:`~quanta.Report` of the last ``finalize()``."""
        return self._quantizer.report
