"""coremltools' ``PostTrainingQuantizer`` names over ``quanta.quantize`` (algorithm ``rtn``)."""

from __future__ import annotations

import enum
from collections import OrderedDict
from typing import Any

import attrs

from quanta.compat.convert import CompressorResult, annotate_for_coreml
from quanta.compat.schemes import PTQ_GRID, pinned_scheme
from quanta._recipes.recipe import load_recipe
from quanta._run.pipeline import quantize
from quanta._recipes.yaml_reader import read_yaml_mapping, require_mapping

__all__ = ["QuantizationScheme", "ModulePostTrainingQuantizerConfig", "PostTrainingQuantizerConfig",
           "PostTrainingQuantizer", "annotate_for_coreml"]


class QuantizationScheme(str, enum.Enum):
    """coremltools' scheme enum: ``symmetric`` or ``affine``."""

    symmetric = "symmetric"
    affine = "affine"


def _scheme(value: Any) -> str:
    return str(getattr(value, "value", value))


@attrs.define(kw_only=True)
class ModulePostTrainingQuantizerConfig:
    """Per-module options, as coremltools names them (``weight_dtype``, ``granularity``,
    ``quantization_scheme``, ``block_size``). Validated when the quantizer builds its recipe."""

    weight_dtype: Any = "int8"
    granularity: Any = "per_channel"
    quantization_scheme: Any = attrs.field(default="symmetric", converter=_scheme)
    block_size: Any = None

    @classmethod
    def from_dict(cls, config_dict: dict) -> "ModulePostTrainingQuantizerConfig":
        config_dict = require_mapping(config_dict, f"a {cls.__name__} dict")
        return cls(**config_dict)

    def as_layer_dict(self) -> dict:
        out = {"weight_dtype": self.weight_dtype, "granularity": self.granularity,
               "quantization_scheme": pinned_scheme(self.quantization_scheme, PTQ_GRID)}
        if self.block_size is not None:
            out["block_size"] = self.block_size
        return out


def _layer(value: Any):
    if value is None:
        return None
    if isinstance(value, ModulePostTrainingQuantizerConfig):
        return value.as_layer_dict()
    out = dict(value)
    if "mode" not in out and "scheme" not in out:  # coremltools' restricted grid, also when not written
        out["quantization_scheme"] = pinned_scheme(out.get("quantization_scheme", "symmetric"), PTQ_GRID)
    return out


@attrs.define(kw_only=True)
class PostTrainingQuantizerConfig:
    """``global_config``, ``module_type_configs`` (class or class name keys) and ``module_name_configs``."""

    global_config: Any = None
    module_type_configs: dict = attrs.field(factory=OrderedDict)
    module_name_configs: dict = attrs.field(factory=OrderedDict)

    @classmethod
    def from_dict(cls, config_dict: dict) -> "PostTrainingQuantizerConfig":
        """Build from coremltools' dict shape. Unknown keys fail (with the nearest key) when the
        recipe is loaded; this checks the top level at once."""
        config_dict = require_mapping(config_dict, f"a {cls.__name__} dict")
        data = dict(config_dict)
        cfg = cls(global_config=data.pop("global_config", None),
                  module_type_configs=dict(data.pop("module_type_configs", {}) or {}),
                  module_name_configs=dict(data.pop("module_name_configs", {}) or {}))
        if data:
            load_recipe({**data, **cfg.as_dict()})  # raises ConfigError naming the unknown key
        cfg.to_recipe()
        return cfg

    @classmethod
    def from_yaml(cls, path) -> "PostTrainingQuantizerConfig":
        """Read the same shape from a YAML file."""
        return cls.from_dict(read_yaml_mapping(path, what=f"{cls.__name__} file"))

    def as_dict(self) -> dict:
        out: dict[str, Any] = {"global_config": _layer(self.global_config)}
        if self.global_config is None and not self.module_type_configs and not self.module_name_configs:
            out["global_config"] = _layer({})
        if self.module_type_configs:
            out["module_type_configs"] = {k: _layer(v) for k, v in self.module_type_configs.items()}
        if self.module_name_configs:
            out["module_name_configs"] = {k: _layer(v) for k, v in self.module_name_configs.items()}
        return out

    def to_recipe(self):
        """The equivalent quanta :class:`~quanta.Recipe` (algorithm ``rtn``)."""
        # coremltools leaves layers a spec cannot apply to in float (with a warning): so does compat.
        return load_recipe({**self.as_dict(), "on_unsupported_layer": "skip"}, algorithm="rtn")


class PostTrainingQuantizer(CompressorResult):
    """``PostTrainingQuantizer(model, config).compress(inplace=False)``, as in coremltools.

    The returned model computes with the dequantized weights, carries quanta records and
    coremltools' converter metadata: plain ``ct.convert(torch.jit.trace(model, x),
    minimum_deployment_target=...)`` stores them compressed from the target that
    ``compress()`` names (a warning, and ``model.coreml_minimum_deployment_target``; iOS18 for
    int4 or per-block weights, else iOS16).
    """

    def __init__(self, model, config: PostTrainingQuantizerConfig | dict | None = None):
        if config is None:
            config = PostTrainingQuantizerConfig()
        elif isinstance(config, dict):
            config = PostTrainingQuantizerConfig.from_dict(config)
        self._model = model
        self._config = config
        self._recipe = config.to_recipe()
        self._result = None

    def compress(self, inplace: bool = False, **_ignored):
        """Quantize and return the model (a copy unless ``inplace``), annotated for ``ct.convert``."""
        self._result = quantize(self._model, self._recipe, inplace=inplace)
        return annotate_for_coreml(self._result)

