"""Recipes: one config format from a dict, a YAML file or attrs objects.

Also reads coremltools.optimize's config shapes unchanged (``PostTrainingQuantizerConfig``,
``LayerwiseCompressorConfig``, ``LinearQuantizerConfig`` and ``OptimizationConfig`` /
``OpLinearQuantizerConfig`` dicts). A recipe is read once: YAML through the one strict reader
(:mod:`quanta._recipes.yaml_reader`), the data put in canonical shape and structured by the one
cattrs converter (:mod:`quanta._recipes.structure`) into the typed classes of
:mod:`quanta._recipes.document`, validated against the registry: unknown keys and plugin names
fail with the nearest match, before any weight is touched.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import attrs

from quanta._recipes.document import (ExportConfig, OnUnsupported, RecipeDocument, StageDocument, canonical)
from quanta._recipes.layers import LAYER_KEYS
from quanta._recipes.structure import structure, unstructure_options
from quanta._records.spec import QuantSpec
from quanta.errors import ConfigError

__all__ = ["Recipe", "load_recipe", "LAYER_KEYS", "recipe_to_dict", "ExportConfig", "OnUnsupported"]


def _export(value: Any) -> ExportConfig | None:
    # Recipe(export={"format": ...}) written by hand goes through the same structuring as a file.
    return value if value is None or isinstance(value, ExportConfig) else structure(value, ExportConfig, "export")


@attrs.frozen(kw_only=True)
class Recipe:
    """A validated quantization recipe.

    Attributes:
        algorithm: algorithm plugin name (``"rtn"``, ``"gptq"``, ...).
        global_config: spec for every supported layer, or None (only typed/named layers).
        module_type_configs: class or class name -> spec, or None to leave that type float.
        module_name_configs: exact name, glob (``"encoder.*"``) or ``"re:<regex>"`` -> spec or None.
        algorithm_config: instance of the algorithm's ``config_class`` (or None: its defaults).
        export: the recipe's ``export:`` as an :class:`ExportConfig` (``format``, ``path``, and
            ``config``: the exporter's options object), or None.
        on_unsupported_layer: :class:`OnUnsupported` (a ``str`` enum): ``"error"`` (default) fails
            when a spec cannot apply to a layer (e.g. a block size that does not divide it);
            ``"skip"`` leaves such layers float, with a warning and a line in the report
            (coremltools' behaviour, used by quanta.compat).
        model / data: what the CLI loads (an example name or a path), or None.
        checkpoint_dir: where an out-of-core run (``quanta.quantize_checkpoint``, ``quanta quantize
            --out-of-core``) keeps finished blocks so a rerun resumes, or None.
        stages: for a recipe that chains algorithms (``stages:``), one Recipe per stage, in order
            (each with its algorithm, options and layer configs); empty for a single algorithm.
    """

    algorithm: str = "rtn"
    global_config: QuantSpec | None = None
    module_type_configs: Mapping[Any, QuantSpec | None] = attrs.field(factory=dict)
    module_name_configs: Mapping[str, QuantSpec | None] = attrs.field(factory=dict)
    algorithm_config: Any = None
    on_unsupported_layer: OnUnsupported = attrs.field(default=OnUnsupported.error, converter=OnUnsupported)
    export: ExportConfig | None = attrs.field(default=None, converter=_export)
    model: Any = None
    data: Any = None
    checkpoint_dir: str | None = None
    stages: tuple["Recipe", ...] = ()

    @property
    def is_empty(self) -> bool:
        """True when no layer config applies to anything."""
        return self.global_config is None and not self.module_type_configs and not self.module_name_configs

    def stage_recipes(self) -> tuple["Recipe", ...]:
        """The stages to run, in order: ``stages``, or this recipe alone."""
        return self.stages or (self,)


def _stage(doc: StageDocument) -> Recipe:
    return Recipe(algorithm=doc.algorithm, global_config=doc.global_config,
                  module_type_configs=dict(doc.module_type_configs), module_name_configs=dict(doc.module_name_configs),
                  algorithm_config=doc.algorithm_config, on_unsupported_layer=doc.on_unsupported_layer)


def from_document(doc: RecipeDocument) -> Recipe:
    """The Recipe a structured document describes (a staged one mirrors its last stage's fields)."""
    stages = tuple(_stage(s) for s in doc.stages)
    base = stages[-1] if stages else _stage(doc)
    return attrs.evolve(base, stages=stages, export=doc.export, model=doc.model, data=doc.data,
                        checkpoint_dir=doc.checkpoint_dir)


def load_recipe(source: Any, *, algorithm: str | None = None, default_algorithm: str = "rtn") -> Recipe:
    """Load a recipe from a Recipe, a dict, a YAML file path, or a coremltools config object.

    ``algorithm`` overrides the recipe's (the coremltools adapters use it); ``default_algorithm``
    is the one a recipe naming none gets (``quanta.Quantizer``: ``qat``).
    """
    if isinstance(source, Recipe):
        return source if algorithm is None or algorithm == source.algorithm else attrs.evolve(source, algorithm=algorithm)
    if isinstance(source, (str, os.PathLike)):
        from quanta._recipes.yaml_reader import read_yaml_mapping  # yaml only for recipe files

        data = read_yaml_mapping(source)
        if not data:  # an empty file is a mistake (a wrong path, a failed write), never "all defaults"
            raise ConfigError(f"recipe file {os.fspath(source)!r} is empty; write at least one setting, e.g. "
                              "`global_config: {weight_dtype: int8}` (pass {} in Python for all defaults)")
    elif source is None:
        data = {}
    elif hasattr(source, "as_dict") and callable(source.as_dict):
        data = dict(source.as_dict())
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        raise ConfigError(f"cannot read a recipe from {type(source).__name__}; pass a dict, a YAML path or a Recipe")
    return from_document(structure(canonical(data, algorithm, default_algorithm), RecipeDocument))


def _spec_to_dict(spec: QuantSpec | None) -> dict | None:
    if spec is None:
        return None
    out: dict[str, Any] = {}
    for f in attrs.fields(QuantSpec):
        v = getattr(spec, f.name)
        if f.name in ("scheme_config", "observer_config"):
            continue
        if v != f.default:
            out[f.name] = str(v) if f.name in ("dtype", "granularity") else v
    for field in ("scheme", "observer"):
        cfg = getattr(spec, f"{field}_config")
        if cfg is not None:
            out[field] = {"name": getattr(spec, field), **unstructure_options(cfg)}
    return out


def _export_to_dict(export: ExportConfig) -> dict:
    out: dict[str, Any] = {"format": export.format}
    if export.path is not None:
        out["path"] = export.path
    if export.config is not None:
        out.update(unstructure_options(export.config))
    return out


def recipe_to_dict(recipe: Recipe) -> dict:
    """A plain dict that :func:`load_recipe` reads back to an equal Recipe (YAML-safe for named
    types). Plugin options carry their ``version`` so a later quanta can read them."""
    out: dict[str, Any] = {"algorithm": recipe.algorithm, "global_config": _spec_to_dict(recipe.global_config)}
    if recipe.module_type_configs:
        out["module_type_configs"] = {getattr(k, "__name__", k): _spec_to_dict(v) for k, v in recipe.module_type_configs.items()}
    if recipe.module_name_configs:
        out["module_name_configs"] = {k: _spec_to_dict(v) for k, v in recipe.module_name_configs.items()}
    if recipe.algorithm_config is not None:
        out["algorithm_config"] = unstructure_options(recipe.algorithm_config)
    if recipe.on_unsupported_layer is not OnUnsupported.error:
        out["on_unsupported_layer"] = recipe.on_unsupported_layer.value
    if recipe.export is not None:
        out["export"] = _export_to_dict(recipe.export)
    for k in ("model", "data", "checkpoint_dir"):
        if getattr(recipe, k) is not None:
            out[k] = getattr(recipe, k)
    if recipe.stages:
        stages = [recipe_to_dict(attrs.evolve(stage, stages=(), export=None, model=None, data=None,
                                              checkpoint_dir=None))
                  for stage in recipe.stages]
        return {"stages": stages, **{k: out[k] for k in ("export", "model", "data", "checkpoint_dir") if k in out}}
    return out
