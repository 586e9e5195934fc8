"""Recipes: one config format from a dict, a YAML file or attrs objects.

Also reads coremltools.optimize's config shapes unchanged (``PostTrainingQuantizerConfig``,
``LayerwiseCompressorConfig``, ``LinearQuantizerConfig`` and ``OptimizationConfig`` /
``OpLinearQuantizerConfig`` dicts). Everything is validated against the registry when
loaded: unknown keys and plugin names fail with the nearest match, before any weight is
touched.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import attrs

from quanta.errors import ConfigError, PluginNotFoundError, did_you_mean
from quanta._recipes.options import make_config, option_names, parse_plugin_ref
from quanta._recipes.yaml_reader import read_yaml_mapping
from quanta._records.spec import QuantSpec

__all__ = ["Recipe", "load_recipe", "parse_layer_config", "LAYER_KEYS", "recipe_to_dict"]

#: Keys of a layer config and the QuantSpec field each maps to (coremltools names included).
LAYER_KEYS = {
    "dtype": "dtype", "weight_dtype": "dtype",
    "scheme": "scheme", "quantization_scheme": "scheme", "mode": "scheme",
    "granularity": "granularity", "block_size": "block_size", "axis": "axis",
    "observer": "observer", "weight_threshold": "weight_threshold",
}
#: coremltools' ``mode`` values (OpLinearQuantizerConfig) -> scheme names.
_MODES = {"linear_symmetric": "symmetric", "linear": "affine"}
#: Layer-config keys coremltools accepts that quanta ignores (they have one meaning only).
_IGNORED_LAYER_KEYS = {"weight_n_bits"}

_TOP_KEYS = ("algorithm", "global_config", "module_type_configs", "module_name_configs",
             "algorithm_config", "on_unsupported_layer", "export", "model", "data", "stages")
#: Keys a stage of ``stages:`` may set for itself (besides its algorithm's options).
_STAGE_KEYS = ("algorithm", "global_config", "module_type_configs", "module_name_configs", "algorithm_config",
               "on_unsupported_layer")
_ON_UNSUPPORTED = ("error", "skip")
_TOP_ALIASES = {"op_type_configs": "module_type_configs", "op_name_configs": "module_name_configs",
                "calibration": "algorithm_config"}


@attrs.frozen(kw_only=True)
class Recipe:
    """A validated quantization recipe.

    Attributes:
        algorithm: algorithm plugin name (``"rtn"``, ``"gptq"``, ...).
        global_config: spec for every supported layer, or None (only typed/named layers).
        module_type_configs: class or class name -> spec, or None to leave that type float.
        module_name_configs: exact name, glob (``"encoder.*"``) or ``"re:<regex>"`` -> spec or None.
        algorithm_config: instance of the algorithm's ``config_class`` (or None).
        export: export options (``{"format": "coreml", ...}``) or None.
        on_unsupported_layer: ``"error"`` (default) fails when a spec cannot apply to a layer
            (e.g. a block size that does not divide it); ``"skip"`` leaves such layers float,
            with a warning and a line in the report (coremltools' behaviour, used by quanta.compat).
        model / data: what the CLI loads (an example name or a path), or None.
        stages: for a recipe that chains algorithms (``stages:``), one Recipe per stage, in order
            (each with its algorithm, options and layer configs); empty for a single algorithm.
    """

    algorithm: str = "rtn"
    global_config: QuantSpec | None = None
    module_type_configs: Mapping[Any, QuantSpec | None] = attrs.field(factory=dict)
    module_name_configs: Mapping[str, QuantSpec | None] = attrs.field(factory=dict)
    algorithm_config: Any = None
    on_unsupported_layer: str = "error"
    export: Mapping[str, Any] | None = None
    model: Any = None
    data: Any = None
    stages: tuple["Recipe", ...] = ()

    @property
    def is_empty(self) -> bool:
        """True when no layer config applies to anything."""
        return self.global_config is None and not self.module_type_configs and not self.module_name_configs

    def stage_recipes(self) -> tuple["Recipe", ...]:
        """The stages to run, in order: ``stages``, or this recipe alone."""
        return self.stages or (self,)


def _registry():
    from quanta import registry

    return registry


def _algorithm_config_class(name: str):
    try:
        return _registry().get("algorithm", name).config_class
    except PluginNotFoundError as exc:
        raise ConfigError(str(exc), "algorithm") from None


def parse_layer_config(raw: Any, key: str, algo_fields: set[str] | None = None, hoisted: dict | None = None) -> QuantSpec | None:
    """Turn one layer config (dict, QuantSpec, coremltools config object or None) into a QuantSpec.

    Keys that belong to the algorithm's options are moved into ``hoisted`` (only allowed when
    ``hoisted`` is given, i.e. in ``global_config``). Raises ConfigError naming ``key``.
    """
    if raw is None or isinstance(raw, QuantSpec):
        return raw
    if attrs.has(type(raw)):
        raw = {f.name: getattr(raw, f.name) for f in attrs.fields(type(raw)) if f.init}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"expected a mapping of layer options or null, got {type(raw).__name__}", key)
    algo_fields = algo_fields or set()
    kwargs: dict[str, Any] = {}
    for k, v in raw.items():
        path = f"{key}.{k}"
        if k in LAYER_KEYS:
            field = LAYER_KEYS[k]
            if k == "mode":
                if str(v) not in _MODES:
                    raise ConfigError(f"unknown mode {v!r}{did_you_mean(str(v), _MODES)} (allowed: {', '.join(_MODES)})", path)
                v = _MODES[str(v)]
            elif field in ("scheme", "observer") and isinstance(v, Mapping):
                v, options = parse_plugin_ref(v, field, path)
                kwargs[f"{field}_config"] = options
            elif field == "scheme":
                v = str(getattr(v, "value", v))
            if field == "block_size" and isinstance(v, (tuple, list)):
                out_block, v = _block_sizes_from_tuple(v, path)
                if out_block is not None:
                    kwargs["output_block_size"] = out_block
            if field in kwargs and kwargs[field] != v:
                raise ConfigError(f"conflicts with another key setting {field!r} ({kwargs[field]!r})", path)
            kwargs[field] = v
        elif k in _IGNORED_LAYER_KEYS:
            continue
        elif k in ("scheme_config", "observer_config"):
            kwargs[k] = v
        elif k == "algorithm" or k in algo_fields:
            if hoisted is None:
                raise ConfigError("algorithm options can only be set in global_config or at the top level", path)
            hoisted[k] = v
        else:
            allowed = sorted(set(LAYER_KEYS) | algo_fields)
            raise ConfigError(f"unknown key {k!r}{_plugin_option_hint(k, raw)}{did_you_mean(k, allowed)} "
                              f"(allowed: {', '.join(allowed)})", path)
    if str(kwargs.get("dtype", "")).lower() in ("float32", "torch.float32", "fp32"):
        return None  # coremltools: weight_dtype float32 leaves the layer unquantized
    try:
        spec = QuantSpec(**kwargs)
    except ConfigError as exc:
        # Name the key as the user wrote it (weight_dtype, quantization_scheme, ...).
        field = exc.key or ""
        written = next((k for k in raw if LAYER_KEYS.get(k) == field), field)
        message = str(exc).split(": ", 1)[1] if exc.key else str(exc)
        raise ConfigError(message, f"{key}.{written}" if written else key) from None
    _check_plugin("scheme", spec.scheme, f"{key}.scheme")
    _check_plugin("observer", spec.observer, f"{key}.observer")
    return spec


def _plugin_option_hint(k: str, raw: Mapping) -> str:
    # "percentile: 99.9" next to "observer: percentile" is an observer option written flat.
    for field in ("observer", "scheme"):
        name = next((raw[w] for w, f in LAYER_KEYS.items() if f == field and isinstance(raw.get(w), str)), None)
        if name is None:
            continue
        try:
            if k in option_names(field, name):
                return (f" (it is an option of the {field} {name!r}: write "
                        f"{field}: {{name: {name}, {k}: {raw[k]!r}}})")
        except PluginNotFoundError:
            pass
    return ""


def _block_sizes_from_tuple(value, path):
    # coremltools' tuple form: (input_block,) or (output_block, input_block); 0/1 on the output axis = one
    # scale row per output channel. Returns (output_block_size or None, block_size).
    vals = list(value)
    if len(vals) == 1:
        return None, vals[0]
    if len(vals) == 2:
        return (None if vals[0] in (0, 1) else vals[0]), vals[1]
    raise ConfigError(f"block_size {tuple(value)!r}: give an int, (input_block,) or (output_block, input_block)", path)


def _check_plugin(kind: str, name: str, key: str) -> None:
    try:
        _registry().get(kind, name)
    except PluginNotFoundError as exc:
        raise ConfigError(str(exc), key) from None


def _type_key(k: Any, key: str) -> Any:
    if isinstance(k, type):
        return k
    if isinstance(k, str) and k:
        return k.rsplit(".", 1)[-1] if k.startswith("torch.nn.") else k
    raise ConfigError(f"module type keys must be classes or class names, got {k!r}", key)


def load_recipe(source: Any, *, algorithm: str | None = None) -> Recipe:
    """Load a recipe from a Recipe, a dict, a YAML file path, or a coremltools config object.

    ``algorithm`` overrides the recipe's (the coremltools adapters use it).
    """
    if isinstance(source, Recipe):
        return source if algorithm is None or algorithm == source.algorithm else attrs.evolve(source, algorithm=algorithm)
    if isinstance(source, (str, os.PathLike)):
        return _from_dict(read_yaml_mapping(source), algorithm)
    if source is None:
        return _from_dict({}, algorithm)
    if hasattr(source, "as_dict") and callable(source.as_dict):
        return _from_dict(dict(source.as_dict()), algorithm)
    if isinstance(source, Mapping):
        return _from_dict(dict(source), algorithm)
    raise ConfigError(f"cannot read a recipe from {type(source).__name__}; pass a dict, a YAML path or a Recipe")


def _from_dict(data: dict, algorithm: str | None) -> Recipe:
    if data.get("stages") is not None:
        return _staged(data, algorithm)
    data.pop("stages", None)
    for alias, key in _TOP_ALIASES.items():
        if alias in data:
            if key in data:
                raise ConfigError(f"both {alias!r} and {key!r} given; use one", alias)
            data[key] = data.pop(alias)
    hoisted: dict[str, Any] = {}
    raw_global = data.get("global_config")
    if isinstance(raw_global, Mapping) and "algorithm" in raw_global:
        hoisted["algorithm"] = raw_global["algorithm"]
    algo = algorithm or data.get("algorithm") or hoisted.get("algorithm") or "rtn"
    if not isinstance(algo, str):
        raise ConfigError(f"expected an algorithm name, got {algo!r}", "algorithm")
    if data.get("algorithm") and hoisted.get("algorithm") and data["algorithm"] != hoisted["algorithm"]:
        raise ConfigError(f"global_config says {hoisted['algorithm']!r} but the recipe says {data['algorithm']!r}", "algorithm")
    config_class = _algorithm_config_class(algo)
    algo_fields = {f.name for f in attrs.fields(config_class) if f.init} if config_class else set()

    algo_options: dict[str, Any] = {}
    for k in list(data):
        if k in _TOP_KEYS:
            continue
        if k in algo_fields:
            algo_options[k] = data.pop(k)
        else:
            allowed = sorted(set(_TOP_KEYS) | set(_TOP_ALIASES) | algo_fields)
            raise ConfigError(f"unknown key {k!r}{did_you_mean(k, allowed)} (allowed: {', '.join(allowed)})", k)

    global_config = parse_layer_config(raw_global, "global_config", algo_fields, hoisted)
    hoisted.pop("algorithm", None)
    type_configs = {}
    for k, v in _mapping(data.get("module_type_configs"), "module_type_configs").items():
        type_configs[_type_key(k, "module_type_configs")] = parse_layer_config(v, f"module_type_configs.{getattr(k, '__name__', k)}")
    name_configs = {}
    for k, v in _mapping(data.get("module_name_configs"), "module_name_configs").items():
        if not isinstance(k, str):
            raise ConfigError(f"module names must be strings, got {k!r}", "module_name_configs")
        name_configs[k] = parse_layer_config(v, f"module_name_configs.{k}")
    if global_config is None and not type_configs and not name_configs and "global_config" not in data:
        global_config = QuantSpec()  # coremltools: an empty config quantizes everything with defaults

    explicit = data.get("algorithm_config") or {}
    if attrs.has(type(explicit)):
        explicit = attrs.asdict(explicit, recurse=False)
    if not isinstance(explicit, Mapping):
        raise ConfigError("expected a mapping", "algorithm_config")
    options = {**hoisted, **algo_options, **explicit}
    algorithm_config = None
    if config_class is not None:
        unknown = [k for k in options if k not in algo_fields]
        if unknown:
            k = unknown[0]
            raise ConfigError(f"unknown option {k!r} for algorithm {algo!r}{did_you_mean(k, algo_fields)} "
                              f"(allowed: {', '.join(sorted(algo_fields))})", f"algorithm_config.{k}")
        try:
            algorithm_config = config_class(**options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc), "algorithm_config") from None
    elif options:
        raise ConfigError(f"algorithm {algo!r} takes no options (got {', '.join(options)})", "algorithm_config")

    export = _export_options(data.get("export"))
    on_unsupported = data.get("on_unsupported_layer", "error")
    if on_unsupported not in _ON_UNSUPPORTED:
        raise ConfigError(f"must be one of {', '.join(_ON_UNSUPPORTED)}, got {on_unsupported!r}", "on_unsupported_layer")
    return Recipe(algorithm=algo, global_config=global_config, module_type_configs=type_configs,
                  module_name_configs=name_configs, algorithm_config=algorithm_config,
                  on_unsupported_layer=on_unsupported, export=export,
                  model=data.get("model"), data=data.get("data"))


def _export_options(export: Any) -> dict | None:
    """The recipe's ``export:`` mapping, checked against the exporter's ``config_class`` now,
    so a typo fails before quantizing. Keys: ``format`` (default ``coreml``), ``path``, options."""
    if export is None:
        return None
    if not isinstance(export, Mapping):
        raise ConfigError("expected a mapping such as {format: coreml}", "export")
    export = dict(export)
    fmt = export.get("format", "coreml")
    options = {k: v for k, v in export.items() if k not in ("format", "path")}
    if not isinstance(fmt, str):
        raise ConfigError(f"expected an exporter name, got {fmt!r}", "export.format")
    try:
        _registry().get("exporter", fmt)
    except PluginNotFoundError as exc:
        raise ConfigError(str(exc), "export.format") from None
    make_config("exporter", fmt, options, "export")
    return export


def _staged(data: dict, algorithm: str | None) -> Recipe:
    """A recipe with ``stages:``: each stage inherits the top-level layer configs unless it sets
    its own, and carries its own algorithm and options."""
    stages_raw = data.pop("stages")
    if not isinstance(stages_raw, (list, tuple)) or not stages_raw:
        raise ConfigError("expected a non-empty list of stages, e.g. [{algorithm: rtn}]", "stages")
    if algorithm is not None or data.get("algorithm") is not None or data.get("algorithm_config") is not None:
        raise ConfigError("a recipe with stages names its algorithms inside the stages; remove the top-level "
                          "'algorithm'/'algorithm_config'", "stages")
    inherited = {k: data[k] for k in ("global_config", "module_type_configs", "module_name_configs",
                                      "on_unsupported_layer") if k in data}
    stages = []
    for i, raw in enumerate(stages_raw):
        key = f"stages[{i}]"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"expected a mapping with an 'algorithm', got {raw!r}", key)
        if not isinstance(raw.get("algorithm"), str):
            raise ConfigError("each stage names its algorithm (e.g. {algorithm: gptq, ...})", f"{key}.algorithm")
        if "stages" in raw:
            raise ConfigError("stages do not nest", f"{key}.stages")
        stage = {**inherited, **dict(raw)}
        try:
            stages.append(_from_dict(stage, None))
        except ConfigError as exc:
            raise ConfigError(str(exc), key) from None
    top = {k: v for k, v in data.items() if k not in ("global_config", "module_type_configs",
                                                      "module_name_configs", "on_unsupported_layer")}
    unknown = [k for k in top if k not in ("export", "model", "data")]
    if unknown:
        allowed = ["stages", "export", "model", "data", "global_config", "module_type_configs",
                   "module_name_configs", "on_unsupported_layer"]
        k = unknown[0]
        raise ConfigError(f"unknown key {k!r} beside stages{did_you_mean(k, allowed)}; algorithm options go "
                          f"inside their stage (allowed: {', '.join(allowed)})", k)
    last = stages[-1]
    return attrs.evolve(last, stages=tuple(stages), export=_export_options(top.get("export")),
                        model=top.get("model"), data=top.get("data"))


def _mapping(value: Any, key: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a mapping, got {type(value).__name__}", key)
    return value


def _spec_to_dict(spec: QuantSpec | None):
    if spec is None:
        return None
    out = {}
    for f in attrs.fields(QuantSpec):
        v = getattr(spec, f.name)
        if f.name in ("scheme_config", "observer_config"):
            continue
        if v != f.default:
            out[f.name] = str(v) if f.name in ("dtype", "granularity") else v
    for field in ("scheme", "observer"):
        cfg = getattr(spec, f"{field}_config")
        if cfg is not None:
            out[field] = {"name": getattr(spec, field), **attrs.asdict(cfg)}
    return out


def recipe_to_dict(recipe: Recipe) -> dict:
    """A plain dict that :func:`load_recipe` reads back to an equal Recipe (YAML-safe for named types)."""
    out: dict[str, Any] = {"algorithm": recipe.algorithm, "global_config": _spec_to_dict(recipe.global_config)}
    if recipe.module_type_configs:
        out["module_type_configs"] = {getattr(k, "__name__", k): _spec_to_dict(v) for k, v in recipe.module_type_configs.items()}
    if recipe.module_name_configs:
        out["module_name_configs"] = {k: _spec_to_dict(v) for k, v in recipe.module_name_configs.items()}
    if recipe.algorithm_config is not None:
        out["algorithm_config"] = attrs.asdict(recipe.algorithm_config)
    if recipe.on_unsupported_layer != "error":
        out["on_unsupported_layer"] = recipe.on_unsupported_layer
    for k in ("export", "model", "data"):
        if getattr(recipe, k) is not None:
            out[k] = getattr(recipe, k)
    if recipe.stages:
        stages = []
        for stage in recipe.stages:
            d = recipe_to_dict(attrs.evolve(stage, stages=(), export=None, model=None, data=None))
            stages.append(d)
        return {"stages": stages, **{k: out[k] for k in ("export", "model", "data") if k in out}}
    return out
