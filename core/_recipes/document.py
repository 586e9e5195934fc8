"""The typed shape of a recipe as written (``quanta._recipes.document``).

:class:`RecipeDocument` (the top level), :class:`StageDocument` (one algorithm with its layer
configs: a recipe without ``stages:``, or one item of ``stages:``), :class:`ExportConfig`
(``export:``) and :class:`OnUnsupported`; layer configs structure to ``QuantSpec``
(:mod:`quanta._recipes.layers`), a plugin's options to its ``config_class``. Every class refuses
keys it does not have. :func:`canonical` first turns coremltools' shapes and quanta's aliases
into this shape (``op_type_configs``, ``calibration:``, algorithm options at the top level or
in ``global_config``, ``stages:`` inheriting the layer configs).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, NewType

import attrs
from cattrs.errors import ClassValidationError
from cattrs.gen import make_dict_structure_fn, override

import quanta._recipes.layers  # noqa: F401  (registers the QuantSpec hook)
from quanta._recipes.layers import LAYER_KEYS, GlobalConfig, algorithm_options
from quanta._recipes.structure import config_error, converter, join_key, option_names, plugin_config
from quanta._records.spec import QuantSpec
from quanta.errors import ConfigError, PluginNotFoundError, did_you_mean

__all__ = ["OnUnsupported", "ExportConfig", "StageDocument", "RecipeDocument", "ModuleType", "canonical",
           "TOP_ALIASES"]

#: coremltools' names for recipe keys.
TOP_ALIASES = {"op_type_configs": "module_type_configs", "op_name_configs": "module_name_configs",
               "calibration": "algorithm_config"}
_INHERITED = ("global_config", "module_type_configs", "module_name_configs", "on_unsupported_layer")
_TOP_ONLY = ("export", "model", "data", "stages")

#: A ``module_type_configs`` key: a class, or a class name (``"Linear"``, ``"torch.nn.Linear"``).
ModuleType = NewType("ModuleType", object)


class OnUnsupported(str, enum.Enum):
    """What to do with a layer a spec cannot apply to (``on_unsupported_layer``)."""

    #: fail, naming the layer (default)
    error = "error"
    #: leave it float, with a warning and a line in the report (coremltools' behaviour)
    skip = "skip"

    def __str__(self) -> str:
        return self.value


@attrs.frozen(kw_only=True)
class ExportConfig:
    """A recipe's ``export:`` (``{format: coreml, path: ..., <option>: ...}``).

    Attributes:
        format: the exporter plugin's name (default ``coreml``).
        path: where the CLI writes the export, or None (beside the saved model).
        config: the exporter's options, an instance of its ``config_class`` (None: its defaults);
            what the exporter receives as ``self.config``.
    """

    format: str = "coreml"
    path: str | None = None
    config: Any = None


@attrs.frozen(kw_only=True)
class StageDocument:
    """One algorithm and its layer configs, as written (after :func:`canonical`)."""

    algorithm: str = "rtn"
    algorithm_config: Any = None
    global_config: GlobalConfig | None = None
    module_type_configs: dict[ModuleType, QuantSpec | None] = attrs.field(factory=dict)
    module_name_configs: dict[str, QuantSpec | None] = attrs.field(factory=dict)
    on_unsupported_layer: OnUnsupported = OnUnsupported.error


@attrs.frozen(kw_only=True)
class RecipeDocument(StageDocument):
    """A whole recipe as written: one stage's keys (unless ``stages``), plus the run's own keys."""

    export: ExportConfig | None = None
    model: Any = None
    data: Any = None
    checkpoint_dir: str | None = None
    stages: tuple[StageDocument, ...] = ()


# -- canonical shape ------------------------------------------------------------------------------

def _algorithm_options(name: Any) -> list[str]:
    try:
        return option_names("algorithm", name) if isinstance(name, str) else []
    except PluginNotFoundError:
        return []  # the structuring names the unknown algorithm


def _canonical_stage(data: dict, algorithm: str | None, default_algorithm: str = "rtn") -> dict:
    """Aliases renamed; the algorithm hoisted out of ``global_config``; algorithm options found at
    the top level or in ``global_config`` moved into ``algorithm_config``."""
    for alias, key in TOP_ALIASES.items():
        if alias in data:
            if key in data:
                raise ConfigError(f"both {alias!r} and {key!r} given; use one", alias)
            data[key] = data.pop(alias)
    glob = data.get("global_config")
    glob = dict(glob) if isinstance(glob, Mapping) else glob
    named_in_global = glob.pop("algorithm", None) if isinstance(glob, dict) else None
    if data.get("algorithm") and named_in_global and data["algorithm"] != named_in_global:
        raise ConfigError(f"global_config says {named_in_global!r} but the recipe says {data['algorithm']!r}",
                          "algorithm")
    algo = algorithm or data.get("algorithm") or named_in_global or default_algorithm
    fields = set(_algorithm_options(algo))
    options: dict[str, Any] = {}
    if isinstance(glob, dict):
        options.update({k: glob.pop(k) for k in list(glob) if k in fields and k not in LAYER_KEYS})
        data["global_config"] = glob
    known = {f.name for f in attrs.fields(RecipeDocument)}
    options.update({k: data.pop(k) for k in list(data) if k not in known and k in fields})
    explicit = data.get("algorithm_config")
    if attrs.has(type(explicit)):
        explicit = {f.name: getattr(explicit, f.name) for f in attrs.fields(type(explicit)) if f.init}
    if isinstance(explicit, Mapping):
        options.update(explicit)
    elif explicit is not None:
        options = explicit  # refused when structured, naming algorithm_config
    data["algorithm"] = algo
    data["algorithm_config"] = options if options != {} else None
    if "global_config" not in data and not data.get("module_type_configs") and not data.get("module_name_configs"):
        data["global_config"] = {}  # coremltools: an empty config quantizes everything with defaults
    return data


def canonical(data: Mapping, algorithm: str | None = None, default_algorithm: str = "rtn") -> dict:
    """``data`` (a recipe dict, any accepted shape) in :class:`RecipeDocument`'s shape;
    ``algorithm`` overrides the recipe's, ``default_algorithm`` is used when it names none."""
    data = dict(data)
    if data.get("stages") is None:
        data.pop("stages", None)
        return _canonical_stage(data, algorithm, default_algorithm)
    stages = data["stages"]
    if not isinstance(stages, (list, tuple)) or not stages:
        raise ConfigError("expected a non-empty list of stages, e.g. [{algorithm: rtn}] or [act_scale, gptq]", "stages")
    if algorithm is not None or data.get("algorithm") is not None or data.get("algorithm_config") is not None:
        raise ConfigError("a recipe with stages names its algorithms inside the stages; remove the top-level "
                          "'algorithm'/'algorithm_config'", "stages")
    for alias, key in TOP_ALIASES.items():
        if alias in data and key != "algorithm_config":
            data[key] = data.pop(alias)
    inherited = {k: data.pop(k) for k in _INHERITED if k in data}
    out = []
    for i, raw in enumerate(stages):
        if isinstance(raw, str):  # a plain name: the algorithm with its defaults (stages: [rtn, bias_correction])
            raw = {"algorithm": raw}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"expected a mapping with an 'algorithm', got {raw!r}", f"stages[{i}]")
        if not isinstance(raw.get("algorithm"), str):
            raise ConfigError("each stage names its algorithm (e.g. {algorithm: gptq, ...})", f"stages[{i}].algorithm")
        out.append(_canonical_stage({**inherited, **raw}, None))
    data["stages"] = out
    return data


# -- structure hooks ------------------------------------------------------------------------------

def _unknown_key(cls: type, algorithm: Any, staged: bool):
    """How an unknown key of a stage or recipe is worded (allowed keys include the algorithm's options)."""
    own = [f.name for f in attrs.fields(cls) if f.init]
    allowed = sorted(set(own) | set(TOP_ALIASES) | set(_algorithm_options(algorithm)))

    def describe(k: str, where: str | None) -> ConfigError:
        key = join_key(where, k)
        if cls is StageDocument and k in _TOP_ONLY:
            return ConfigError(f"{k!r} belongs at the top level of the recipe, not in a stage", key)
        if staged:
            return ConfigError(f"unknown key {k!r} beside stages{did_you_mean(str(k), allowed)}; algorithm options "
                               f"go inside their stage (allowed: {', '.join(allowed)})", key)
        return ConfigError(f"unknown key {k!r}{did_you_mean(str(k), allowed)} (allowed: {', '.join(allowed)})", key)
    return describe


def _algorithm_name(value: Any, _type: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"expected an algorithm name, got {value!r}")
    from quanta import registry

    registry.get("algorithm", value)  # PluginNotFoundError names the nearest
    return value


def _document_hook(cls: type):
    base = make_dict_structure_fn(cls, converter, _cattrs_forbid_extra_keys=True,
                                  algorithm=override(struct_hook=_algorithm_name),
                                  algorithm_config=override(struct_hook=lambda v, _t: v))

    def structure_document(data: Any, _type: Any) -> Any:
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping, got {type(data).__name__}")
        token = algorithm_options.set(tuple(_algorithm_options(data.get("algorithm"))))
        try:
            doc = base(data, cls)
        except ClassValidationError as exc:
            staged = cls is RecipeDocument and bool(data.get("stages"))
            raise config_error(exc, None, {cls: _unknown_key(cls, data.get("algorithm"), staged)}) from None
        finally:
            algorithm_options.reset(token)
        try:
            options = plugin_config("algorithm", doc.algorithm, doc.algorithm_config)
        except ConfigError as exc:
            raise ConfigError(exc.detail, join_key("algorithm_config", exc.key)) from None
        return attrs.evolve(doc, algorithm_config=options)
    return structure_document


def _export_config(value: Any, _type: Any) -> ExportConfig:
    if isinstance(value, ExportConfig):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError("expected a mapping such as {format: coreml}")
    options = dict(value)
    fmt, path = options.pop("format", "coreml"), options.pop("path", None)
    if not isinstance(fmt, str):
        raise ConfigError(f"expected an exporter name, got {fmt!r}", "format")
    if path is not None and not isinstance(path, str):
        raise ConfigError(f"expected a path, got {path!r}", "path")
    try:
        config = plugin_config("exporter", fmt, options)
    except PluginNotFoundError as exc:
        raise ConfigError(str(exc), "format") from None
    return ExportConfig(format=fmt, path=path, config=config)


def _module_type(value: Any, _type: Any) -> Any:
    if isinstance(value, type):
        return value
    if isinstance(value, str) and value:
        return value.rsplit(".", 1)[-1] if value.startswith("torch.nn.") else value
    raise ConfigError(f"module type keys must be classes or class names, got {value!r}")


def _string(value: Any, _type: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"expected a string, got {value!r}")
    return value


def _enum_hook(cls: type):
    def structure_enum(value: Any, _type: Any) -> Any:
        allowed = [m.value for m in cls]
        if isinstance(value, cls):
            return value
        if value not in allowed:
            raise ConfigError(f"must be one of {', '.join(map(str, allowed))}, got {value!r}"
                              f"{did_you_mean(str(value), map(str, allowed))}")
        return cls(value)
    return structure_enum


def _mapping_hook(type_: Any):
    base = converter.gen_structure_mapping(type_)

    def structure_mapping(value: Any, t: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a mapping, got {type(value).__name__}")
        return base(value, t)
    return structure_mapping


converter.register_structure_hook(ModuleType, _module_type)
converter.register_structure_hook(str, _string)
converter.register_structure_hook(ExportConfig, _export_config)
converter.register_structure_hook(OnUnsupported, _enum_hook(OnUnsupported))
converter.register_structure_hook_factory(
    lambda t: getattr(t, "__origin__", None) is dict, _mapping_hook)
for _cls in (StageDocument, RecipeDocument):
    converter.register_structure_hook(_cls, _document_hook(_cls))
