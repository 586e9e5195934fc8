"""The one boundary between coremltools' config objects and quanta: config object -> recipe dict.

Each function reads a coremltools config (see :mod:`quanta.compat.configs`) and returns a plain
quanta recipe dict, loaded with the public :func:`quanta.load_recipe`. Nothing else in
``quanta.compat`` reads coremltools' config fields, so a change of either side is a change here.
What quanta cannot do the way coremltools does is refused here with a :class:`quanta.ConfigError`
naming the key and what is supported, never substituted.
"""

from __future__ import annotations

from typing import Any

import torch

from quanta.compat.schemes import GPTQ_GRID, PTQ_GRID, pinned_scheme
from quanta.errors import ConfigError

__all__ = ["ptq_recipe", "gptq_recipe", "qat_recipe", "effective_global", "dtype_name", "type_key", "block_sizes_2d"]

_UNSIGNED = {torch.uint8, torch.quint8}
_FLOATS = {torch.float32, torch.float16}


def dtype_name(dtype: Any, n_bits: int | None, key: str) -> str | None:
    """coremltools' (torch dtype, weight_n_bits) -> quanta's ``"int4"``/``"uint8"``...; None for float."""
    if dtype in _FLOATS or (n_bits is not None and n_bits >= 16):
        return None
    if dtype in (torch.int8, torch.qint8) or dtype in _UNSIGNED:
        return f"{'u' if dtype in _UNSIGNED else ''}int{n_bits}"
    raise ConfigError(f"weight dtype {dtype} is not supported by quanta (supported: int2..int8, uint2..uint8, "
                      "float32 to leave the weight float)", key)


def type_key(key: Any) -> Any:
    """A module_type_configs key as quanta takes it (the class, or its name)."""
    return key


def _value(x: Any) -> Any:
    return getattr(x, "value", x)


def block_sizes_2d(block_size: tuple | None) -> tuple[int | None, int | None]:
    """coremltools' ``block_size`` tuple -> (output-axis block, input-axis block); 0/None = whole axis.

    ``(b,)`` blocks the input axis; ``(a, b)`` blocks the output axis by ``a`` and the input axis by ``b``.
    """
    if block_size is None:
        return None, None
    sizes = tuple(block_size)
    if len(sizes) == 1:
        return None, sizes[0]
    return sizes[0], sizes[1]


# ------------------------------------------------------------------ PostTrainingQuantizer


def _ptq_layer(cfg, key: str) -> dict | None:
    if cfg is None:
        return None
    dtype = dtype_name(cfg.weight_dtype, cfg.weight_n_bits, f"{key}.weight_dtype")
    if dtype is None:
        return None
    out: dict[str, Any] = {"weight_dtype": dtype, "granularity": _value(cfg.granularity),
                           "quantization_scheme": pinned_scheme(_value(cfg.quantization_scheme), PTQ_GRID)}
    if out["granularity"] == "per_block":
        out_block, in_block = block_sizes_2d(cfg.block_size)
        out["block_size"] = in_block if out_block in (None, 0, 1) else (out_block, in_block or 0)
    return out


def _sections(config, layer) -> dict:
    out: dict[str, Any] = {"global_config": layer(config.global_config, "global_config")}
    if config.module_type_configs:
        out["module_type_configs"] = {
            type_key(k): layer(v, f"module_type_configs.{getattr(k, '__name__', k)}")
            for k, v in config.module_type_configs.items()}
    if config.module_name_configs:
        out["module_name_configs"] = {k: layer(v, f"module_name_configs.{k}")
                                      for k, v in config.module_name_configs.items()}
    return out


def ptq_recipe(config) -> dict:
    """``PostTrainingQuantizerConfig`` -> a quanta ``rtn`` recipe dict on coremltools' restricted grid."""
    return {"algorithm": "rtn", **_sections(config, _ptq_layer), "on_unsupported_layer": "skip"}


# ------------------------------------------------------------------ LayerwiseCompressor (GPTQ)

_GPTQ_KNOBS = ("hessian_dampening", "use_activation_order_heuristic", "processing_group_size")


def _gptq_layer(cfg, key: str) -> dict | None:
    if cfg is None:
        return None
    algorithm = getattr(cfg, "algorithm", None)
    if algorithm != "gptq":
        raise ConfigError(f"algorithm {algorithm!r} is not supported by quanta.compat's LayerwiseCompressor "
                          "(supported: 'gptq'; quanta has no pruning, so 'sparse_gpt' is refused rather than "
                          "replaced by GPTQ)", f"{key}.algorithm")
    if cfg.enable_normal_float:
        raise ConfigError("enable_normal_float (a normal-float palette) is not supported by quanta "
                          "(supported: linear int/uint codes)", f"{key}.enable_normal_float")
    dtype = dtype_name(cfg.weight_dtype, cfg.weight_n_bits, f"{key}.weight_dtype")
    if dtype is None:
        return None
    out: dict[str, Any] = {"weight_dtype": dtype, "granularity": _value(cfg.granularity),
                           "quantization_scheme": pinned_scheme(_value(cfg.quantization_scheme), GPTQ_GRID)}
    if out["granularity"] == "per_block":
        if cfg.block_size is None:  # coremltools' GPTQ: per_block without a block size is per-channel
            out["granularity"] = "per_channel"
        else:
            out["block_size"] = cfg.block_size
    return out


def _input_cacher_name(value: Any) -> str:
    if isinstance(value, str):
        return value
    registry = getattr(value, "_registry", None) or {}
    for name, cls in dict(registry).items():
        if cls is value:
            return name
    name = getattr(value, "__name__", str(value))
    return {"DefaultInputCacher": "default", "GPTFirstLayerInputCacher": "gpt"}.get(name, name)


def gptq_recipe(config) -> dict:
    """``LayerwiseCompressorConfig`` -> a quanta ``gptq`` recipe dict (coremltools' 16-level grid and
    its blocking: act-order with static groups when ``use_activation_order_heuristic`` is set)."""
    sections = _sections(config, _gptq_layer)
    glob = config.global_config
    knobs_from = glob if glob is not None else next(
        (v for v in [*config.module_type_configs.values(), *config.module_name_configs.values()] if v is not None), None)
    out: dict[str, Any] = {"algorithm": "gptq", **sections, "input_cacher": _input_cacher_name(config.input_cacher),
                           "calibration_nsamples": config.calibration_nsamples, "on_unsupported_layer": "skip"}
    if knobs_from is not None:
        for knob in _GPTQ_KNOBS:
            out[knob] = getattr(knobs_from, knob)
        # coremltools' GPTQ computes a block's scales from the permuted columns' original groups when it
        # reorders by activation (its "static" blocking); quanta's static_groups is that.
        out["static_groups"] = bool(knobs_from.use_activation_order_heuristic)
    if config.layers is not None:
        out["layers"] = [x if isinstance(x, str) else x for x in config.layers]
    return out


# ------------------------------------------------------------------ LinearQuantizer (QAT)

_OBSERVERS = {"moving_average_min_max": "moving_average_minmax", "min_max": "minmax",
              "ema_min_max": "moving_average_minmax"}
#: averaging constant of each observer: torch's MovingAverageMinMaxObserver 0.01; coremltools'
#: EMAMinMaxObserver (ema_ratio 0.9) weighs each new batch by 0.1 (the first batch sets the range in both).
_AVERAGING = {"ema_min_max": 0.1}


def _observer(value: Any, key: str) -> str:
    text = str(_value(value))
    if text not in _OBSERVERS:
        raise ConfigError(f"observer {text!r} is not supported by quanta (supported: {', '.join(_OBSERVERS)})", key)
    return _OBSERVERS[text]


def _activation_dtype(value: Any) -> str:
    return {torch.quint8: "uint8", torch.qint8: "int8", torch.float32: "float32"}.get(value, str(value))


def qat_layer(cfg, key: str) -> dict | None:
    """A ``ModuleLinearQuantizerConfig``'s weight part as a quanta layer dict (None: leave float)."""
    if cfg is None:
        return None
    _observer(cfg.weight_observer, f"{key}.weight_observer")
    dtype = dtype_name(cfg.weight_dtype, cfg.weight_n_bits, f"{key}.weight_dtype")
    if dtype is None:
        return None
    return {"weight_dtype": dtype, "granularity": "per_channel" if cfg.weight_per_channel else "per_tensor",
            "quantization_scheme": pinned_scheme(_value(cfg.quantization_scheme), PTQ_GRID)}


def qat_options(cfg, key: str) -> dict:
    """A ``ModuleLinearQuantizerConfig``'s activation and milestone part as ``qat`` options."""
    return {"milestones": list(cfg.milestones) if cfg.milestones is not None else None,
            "activation_dtype": _activation_dtype(cfg.activation_dtype),
            "activation_observer": _observer(cfg.activation_observer, f"{key}.activation_observer"),
            "averaging_constant": _AVERAGING.get(str(_value(cfg.activation_observer)), 0.01),
            "learnable": cfg.algorithm == "learnable"}


def _module_names_of_type(model, key: Any) -> list[str]:
    name = key if isinstance(key, str) else getattr(key, "__name__", str(key))
    return [n for n, m in model.named_modules() if n and (type(m).__name__ == name or type(m) is key)]


def effective_global(config):
    """The module config whose activation settings and milestones apply to the whole model, as
    coremltools picks it: ``global_config``, else the first module type config, else the first
    module name config (None: coremltools' defaults)."""
    if config.global_config is not None:
        return config.global_config
    for cfg in [*config.module_type_configs.values(), *config.module_name_configs.values()]:
        if cfg is not None:
            return cfg
    return None


def qat_recipe(config, model=None) -> dict:
    """``LinearQuantizerConfig`` -> a quanta ``qat`` recipe dict.

    Module configs may differ from ``global_config`` in their weight settings and in
    ``activation_dtype: float32`` (that module's activations stay float: quanta's
    ``float_activation_modules``; a ``module_type_configs`` key needs ``model`` to name its modules).
    A module's ``milestones`` are ignored, as coremltools ignores them (it steps with the global
    config's). Other per-module differences (observers, algorithm) are refused."""
    from coremltools.optimize.torch.quantization.quantization_config import ModuleLinearQuantizerConfig

    glob = effective_global(config) or ModuleLinearQuantizerConfig()
    options = qat_options(glob, "global_config")
    float_modules: list[str] = []
    sections = [(k, v, "module_type_configs") for k, v in config.module_type_configs.items()]
    sections += [(k, v, "module_name_configs") for k, v in config.module_name_configs.items()]
    for key, cfg, section in sections:
        name = str(getattr(key, "__name__", key))
        if cfg is None:
            continue
        mine = qat_options(cfg, f"{section}.{name}")
        mine["milestones"] = options["milestones"]  # coremltools steps with the global config's milestones only
        if mine["activation_dtype"] == "float32" and options["activation_dtype"] != "float32":
            # this module's activations stay float: its activation observer does not matter
            for knob in ("activation_dtype", "activation_observer", "averaging_constant"):
                mine[knob] = options[knob]
            if section == "module_name_configs":
                float_modules.append(name)
            elif model is not None:
                float_modules += _module_names_of_type(model, key)
            else:
                raise ConfigError("activation_dtype float32 in module_type_configs needs the model to name its "
                                  "modules (use LinearQuantizer(model, config))", f"{section}.{name}")
        if mine != options:
            raise ConfigError("per-module activation observers, activation dtypes or algorithms are not supported by "
                              "quanta (supported per module: weight settings and activation_dtype float32); set them "
                              "in global_config",
                              f"{section}.{name}")
    names = {k: qat_layer(v, f"module_name_configs.{k}") for k, v in config.module_name_configs.items()}
    for name in config.non_traceable_module_names:
        names.setdefault(name, None)
    if float_modules:
        options["float_activation_modules"] = float_modules
    out: dict[str, Any] = {"algorithm": "qat", "global_config": qat_layer(config.global_config or glob, "global_config"),
                           "algorithm_config": options}
    if config.global_config is None and (config.module_type_configs or config.module_name_configs):
        out["global_config"] = None
    if config.module_type_configs:
        out["module_type_configs"] = {type_key(k): qat_layer(v, f"module_type_configs.{getattr(k, '__name__', k)}")
                                      for k, v in config.module_type_configs.items()}
    if names:
        out["module_name_configs"] = names
    return out


# ------------------------------------------------------------------ coremltools.optimize.coreml


def coreml_layer(cfg, key: str = "config") -> dict | None:
    """coremltools' ``OpLinearQuantizerConfig`` -> a quanta layer dict for the ``coreml`` backend."""
    if cfg is None:
        return None
    from coremltools.converters.mil.mil import types as mil_types

    mode = str(cfg.mode).lower()
    if mode not in ("linear_symmetric", "linear"):
        raise ConfigError(f"mode {cfg.mode!r} is not supported (supported: linear_symmetric, linear)", f"{key}.mode")
    dtype = cfg.dtype if isinstance(cfg.dtype, str) else mil_types.builtin_to_string(cfg.dtype)
    granularity = getattr(cfg.granularity, "name", cfg.granularity)
    out: dict[str, Any] = {
        "scheme": pinned_scheme("symmetric", PTQ_GRID) if mode == "linear_symmetric" else "affine",
        "dtype": dtype, "granularity": str(granularity).lower()}
    if out["granularity"] == "per_block":
        block = cfg.block_size
        if isinstance(block, (tuple, list)):
            sizes = [int(b) for b in block]
            # coremltools' per-axis form on a rank-2 weight: (output block, input block); 0 = whole axis.
            block = sizes[1] if len(sizes) == 2 and sizes[0] in (0, 1) else tuple(sizes)
        out["block_size"] = block
    if cfg.weight_threshold is not None:
        # coremltools quantizes weights with *more* than weight_threshold elements;
        # quanta skips weights with *fewer* than its threshold.
        out["weight_threshold"] = int(cfg.weight_threshold) + 1
    return out
