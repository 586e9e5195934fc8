"""coremltools' ``LayerwiseCompressor`` (GPTQ) names over ``quanta.quantize`` (algorithm ``gptq``)."""

from __future__ import annotations

from typing import Any

import attrs

from quanta.compat.schemes import GPTQ_GRID, pinned_scheme
from quanta._recipes.recipe import load_recipe
from quanta._run.pipeline import quantize
from quanta.compat.convert import CompressorResult, annotate_for_coreml
from quanta._recipes.yaml_reader import read_yaml_mapping, reject_unknown_keys, require_mapping

__all__ = ["ModuleGPTQConfig", "LayerwiseCompressorConfig", "LayerwiseCompressor"]

#: coremltools' ModuleGPTQConfig defaults (note: uint8, symmetric, per-channel).
_GPTQ_DEFAULTS = {"weight_dtype": "uint8", "granularity": "per_channel", "quantization_scheme": "symmetric"}


@attrs.define(kw_only=True)
class ModuleGPTQConfig:
    """Per-module GPTQ options with coremltools' names and defaults. ``weight_dtype`` also
    accepts a bit count (``4``), as coremltools' documentation shows."""

    algorithm: str = "gptq"
    weight_dtype: Any = "uint8"
    granularity: Any = "per_channel"
    quantization_scheme: Any = "symmetric"
    block_size: Any = None
    enable_normal_float: bool = False
    hessian_dampening: float = 0.01
    use_activation_order_heuristic: bool = False
    processing_group_size: int = 128

    @classmethod
    def from_dict(cls, config_dict: dict) -> "ModuleGPTQConfig":
        config_dict = require_mapping(config_dict, f"a {cls.__name__} dict")
        return cls(**config_dict)

    def as_dict(self) -> dict:
        out = attrs.asdict(self)
        if out["block_size"] is None:
            del out["block_size"]
        out["quantization_scheme"] = pinned_scheme(out["quantization_scheme"], GPTQ_GRID)
        return out


def _layer(value):
    if value is None:
        return None
    if isinstance(value, ModuleGPTQConfig):
        return value.as_dict()
    out = {**_GPTQ_DEFAULTS, **dict(value)}
    out["quantization_scheme"] = pinned_scheme(out["quantization_scheme"], GPTQ_GRID)  # coremltools' 16 levels
    return out


@attrs.define(kw_only=True)
class LayerwiseCompressorConfig:
    """``global_config``, ``module_type_configs``, ``module_name_configs``, ``layers``,
    ``input_cacher`` and ``calibration_nsamples``, as in coremltools."""

    global_config: Any = None
    module_type_configs: dict = attrs.field(factory=dict)
    module_name_configs: dict = attrs.field(factory=dict)
    layers: Any = None
    input_cacher: str = "default"
    calibration_nsamples: int = 128

    @classmethod
    def from_dict(cls, config_dict: dict) -> "LayerwiseCompressorConfig":
        """Build from coremltools' dict shape; unknown keys fail naming the nearest key."""
        config_dict = require_mapping(config_dict, f"a {cls.__name__} dict")
        reject_unknown_keys(config_dict, sorted(f.name for f in attrs.fields(cls)))
        cfg = cls(**config_dict)
        cfg.to_recipe()
        return cfg

    @classmethod
    def from_yaml(cls, path) -> "LayerwiseCompressorConfig":
        return cls.from_dict(read_yaml_mapping(path, what=f"{cls.__name__} file"))

    def as_dict(self) -> dict:
        glob = _layer(self.global_config)
        if glob is None and not self.module_type_configs and not self.module_name_configs:
            glob = _layer({})
        out: dict[str, Any] = {"algorithm": "gptq", "global_config": glob,
                               "input_cacher": self.input_cacher, "calibration_nsamples": self.calibration_nsamples}
        if glob is not None:
            glob.pop("algorithm", None)
        # coremltools' GPTQ defaults, pinned: quanta's own gptq defaults to act-order with static groups.
        if glob is None or "use_activation_order_heuristic" not in glob:
            out["use_activation_order_heuristic"] = False
        out["static_groups"] = False
        if self.layers is not None:
            out["layers"] = [getattr(x, "__name__", x) if isinstance(x, str) else x for x in self.layers]
        if self.module_type_configs:
            out["module_type_configs"] = {k: _strip(_layer(v)) for k, v in self.module_type_configs.items()}
        if self.module_name_configs:
            out["module_name_configs"] = {k: _strip(_layer(v)) for k, v in self.module_name_configs.items()}
        return out

    def to_recipe(self):
        """The equivalent quanta recipe (algorithm ``gptq``; unsupported layers left float, as coremltools)."""
        return load_recipe({**self.as_dict(), "on_unsupported_layer": "skip"})


def _strip(layer):
    # Per-layer GPTQ knobs are global in quanta; keep only the layer's quantization keys.
    if layer is None:
        return None
    return {k: v for k, v in layer.items() if k in ("weight_dtype", "granularity", "quantization_scheme", "block_size")}


class LayerwiseCompressor(CompressorResult):
    """``LayerwiseCompressor(model, config).compress(dataloader, device=None, inplace=False)``.

    GPTQ on coremltools' 16-level grid; the result converts with plain ``ct.convert`` to compressed
    weights from the target ``compress()`` names (see :class:`~quanta.compat.PostTrainingQuantizer`).
    """

    def __init__(self, model, config: LayerwiseCompressorConfig | dict | None = None):
        if config is None:
            config = LayerwiseCompressorConfig()
        elif isinstance(config, dict):
            config = LayerwiseCompressorConfig.from_dict(config)
        self._model, self._config = model, config
        self._recipe = config.to_recipe()
        self._result = None

    def compress(self, dataloader, device: str | None = None, inplace: bool = False):
        """Quantize with GPTQ on ``dataloader``'s samples; ``device`` is optional here.

        As in coremltools, ``calibration_nsamples`` counts the dataloader's items (quanta's own
        recipes count samples, the rows of the batches): the first that many items are used."""
        data, rows = _first_items(dataloader, self._config.calibration_nsamples)
        recipe = self._recipe if rows is None else load_recipe(
            {**self._config.as_dict(), "on_unsupported_layer": "skip", "calibration_nsamples": rows})
        self._result = quantize(self._model, recipe, data=data, inplace=inplace, device=device)
        return annotate_for_coreml(self._result)



def _first_items(dataloader, n: int):
    """coremltools' meaning of ``calibration_nsamples`` (items of the dataloader) on quanta's (rows):
    ``(the first n items, the samples they hold)``; ``(dataloader, None)`` for what is not a
    collection of batches (quanta.quantize reports it). Warns when there are fewer items."""
    import itertools
    import warnings

    import torch

    from quanta._run.calibration import count_samples
    from quanta._run.data_checks import CalibrationWarning

    if dataloader is None or isinstance(dataloader, (torch.Tensor, dict, str, bytes)):
        return dataloader, None
    try:
        items = list(itertools.islice(iter(dataloader), n))
    except TypeError:
        return dataloader, None
    if not items:
        return items, None
    if len(items) < n:
        warnings.warn(f"calibration data has {len(items)} batch(es) but calibration_nsamples is {n} (coremltools "
                      f"counts dataloader items): using all {len(items)}", CalibrationWarning, stacklevel=3)
    return items, sum(count_samples(b) for b in items)
