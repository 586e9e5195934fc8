"""The one resolver of per-layer settings, and ``Plan``: which layer gets which spec and why.

Precedence (first match wins): exact name in ``module_name_configs``; then the first
pattern there that matches (glob such as ``"encoder.*"``, or ``"re:<regex>"``, in the order
written); then ``module_type_configs`` by the layer's class, most specific class first; then
``global_config``. A match whose value is None leaves the layer unquantized.
"""

from __future__ import annotations

import enum
import fnmatch
import re
import warnings
from typing import Any, Iterable

import attrs

from quanta._recipes.document import OnUnsupported
from quanta._recipes.recipe import Recipe
from quanta.errors import ConfigError, QuantizationError, did_you_mean
from quanta.contracts import Unit
from quanta._records.spec import QuantSpec

__all__ = ["PlannedLayer", "Plan", "Rule", "Decision", "resolve", "build_plan"]


class Rule(enum.Enum):
    """Which part of a recipe chose a layer's config (the precedence of the module docstring)."""

    name = "module_name_configs (exact name)"
    pattern = "module_name_configs (pattern)"
    type = "module_type_configs"
    global_config = "global_config"
    none = "no config applies"


class Decision(enum.Enum):
    """What the plan does with a layer; ``PlannedLayer.reason`` says it in words."""

    #: quantized with the spec the rule chose
    quantize = "quantize"
    #: no name, type or global config applies
    no_config = "no config applies"
    #: the config that applies is null
    config_null = "config is null"
    #: global_config applies, but the algorithm takes no such type from it (``global_types``)
    not_global_type = "type not taken from global_config"
    #: fewer elements than the spec's ``weight_threshold``
    below_threshold = "below weight_threshold"
    #: the spec cannot apply (``on_unsupported_layer: skip``): left float, with a warning
    unsupported = "unsupported"


@attrs.frozen(kw_only=True)
class PlannedLayer:
    """One weight in the plan: the unit, its spec (None = left float), the reason in words and
    the typed ``decision`` (what code should test, never the reason's text)."""

    unit: Unit
    spec: QuantSpec | None
    reason: str
    decision: Decision = Decision.quantize

    @property
    def name(self) -> str:
        return self.unit.name


@attrs.frozen(kw_only=True)
class Plan:
    """The dry-run result of a recipe on a model: one PlannedLayer per quantizable weight."""

    algorithm: str
    backend: str
    layers: tuple[PlannedLayer, ...]
    #: for a recipe with ``stages``: every stage's plan, in order (this plan is the last one's).
    stages: tuple["Plan", ...] = ()

    @property
    def selected(self) -> list[PlannedLayer]:
        """Layers that will be quantized."""
        return [p for p in self.layers if p.spec is not None]

    def table(self) -> str:
        """A text table: layer, type, shape, spec, reason (one table per stage for a staged recipe)."""
        if self.stages:
            return "\n\n".join(f"stage {i + 1} of {len(self.stages)}: {p.algorithm}\n{p._table()}"
                                for i, p in enumerate(self.stages))
        return self._table()

    def _table(self) -> str:
        rows = [("layer", "type", "shape", "spec", "why")]
        for p in self.layers:
            rows.append((p.name, p.unit.module_type, "x".join(map(str, p.unit.shape)),
                         p.spec.describe() if p.spec else "float (skipped)", p.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"{len(self.selected)} of {len(self.layers)} weights would be quantized with {self.algorithm!r} "
                     f"({self.backend} backend)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def bound_to(self, units: Iterable[Unit]) -> "Plan":
        """This plan on another copy of the model: each layer's unit replaced by the unit with the
        same name and parameter among ``units`` (what the backend enumerates on the copy). Specs
        and reasons stay as planned. Raises QuantizationError naming a layer the copy lacks or
        whose weight changed shape."""
        by_key = {(u.name, u.param): u for u in units}
        layers = []
        for layer in self.layers:
            unit = by_key.get((layer.unit.name, layer.unit.param))
            if unit is None or tuple(unit.shape) != tuple(layer.unit.shape):
                raise QuantizationError(f"the model being quantized no longer has the planned weight "
                                        f"{layer.unit.param!r} of shape {tuple(layer.unit.shape)} (an earlier "
                                        f"stage changed it)", layer.name)
            layers.append(attrs.evolve(layer, unit=unit))
        return attrs.evolve(self, layers=tuple(layers))


def _name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _type_name(key: Any) -> str:
    return key.__name__ if isinstance(key, type) else str(key)


def _match(unit: Unit, recipe: Recipe) -> tuple[QuantSpec | None, Rule, str]:
    """The spec for ``unit``, the rule that chose it and its words (``"module_name_configs['x']"``)."""
    names = recipe.module_name_configs
    if unit.name in names:
        return names[unit.name], Rule.name, f"module_name_configs[{unit.name!r}]"
    for pattern, spec in names.items():
        if pattern != unit.name and _name_matches(pattern, unit.name):
            return spec, Rule.pattern, f"module_name_configs[{pattern!r}]"
    by_type = {_type_name(k): v for k, v in recipe.module_type_configs.items()}
    for cls_name in unit.type_mro:
        if cls_name in by_type:
            return by_type[cls_name], Rule.type, f"module_type_configs[{cls_name!r}]"
    if recipe.global_config is not None:
        return recipe.global_config, Rule.global_config, "global_config"
    return None, Rule.none, Rule.none.value


def resolve(unit: Unit, recipe: Recipe) -> tuple[QuantSpec | None, str]:
    """The spec for ``unit`` under ``recipe`` and a short reason (see the module docstring)."""
    spec, _rule, reason = _match(unit, recipe)
    return spec, reason


def _check_keys(recipe: Recipe, units: list[Unit], all_module_names: Iterable[str], all_type_names: Iterable[str]):
    """Refuse a name or type key that matches nothing in the model, naming the nearest."""
    known_names = set(all_module_names) | {u.name for u in units}
    for pattern in recipe.module_name_configs:
        if pattern in known_names:
            continue
        if not any(_name_matches(pattern, n) for n in known_names):
            raise ConfigError(f"matches no module of the model{did_you_mean(pattern, sorted(known_names))}",
                              f"module_name_configs[{pattern!r}]")
    known_types = set(all_type_names) | {t for u in units for t in u.type_mro}
    for key in recipe.module_type_configs:
        tname = _type_name(key)
        if tname not in known_types:
            message = f"no module of type {tname!r} in the model{did_you_mean(tname, sorted(known_types))}"
            if _is_torch_module_type(tname):  # a real type this model lacks: the config is simply unused
                warnings.warn(f"module_type_configs[{tname!r}]: {message}; the key is ignored", stacklevel=4)
                continue
            raise ConfigError(message, f"module_type_configs[{tname!r}]")


def _plan_layer(unit: Unit, recipe: Recipe, global_types: tuple[str, ...] | None) -> PlannedLayer:
    spec, rule, reason = _match(unit, recipe)
    if spec is None:
        decision = Decision.no_config if rule is Rule.none else Decision.config_null
        return PlannedLayer(unit=unit, spec=None, reason=reason if rule is Rule.none else f"{reason} is null",
                            decision=decision)
    if rule is Rule.global_config and global_types is not None and not set(unit.type_mro) & set(global_types):
        return PlannedLayer(unit=unit, spec=None, decision=Decision.not_global_type, reason=(
            f"{unit.module_type} is not quantized by global_config under {recipe.algorithm!r} (its types: "
            f"{', '.join(global_types)}); name it in module_type_configs to quantize it"))
    if spec.weight_threshold is not None and unit.numel < spec.weight_threshold:
        return PlannedLayer(unit=unit, spec=None, decision=Decision.below_threshold,
                            reason=f"{unit.numel} elements < weight_threshold {spec.weight_threshold}")
    try:
        spec.block_sizes(unit.shape, unit.channel_axis, unit.input_axis, unit.name)
    except QuantizationError as exc:
        why = f"{exc.detail} (spec from {reason})"
        if recipe.on_unsupported_layer == OnUnsupported.skip:
            return PlannedLayer(unit=unit, spec=None, decision=Decision.unsupported,
                                reason=f"unsupported, left float: {why}")
        raise QuantizationError(why + "; set on_unsupported_layer: skip to leave such layers float",
                                unit.name) from None
    return PlannedLayer(unit=unit, spec=spec, reason=reason)


def _is_torch_module_type(name: str) -> bool:
    """Whether ``name`` is a module class of ``torch.nn`` (``Conv1d``): a recipe naming one that the
    model lacks is portable across models, not a typo."""
    import sys

    nn = getattr(sys.modules.get("torch"), "nn", None)  # a torch model means torch is imported already
    cls = getattr(nn, name, None) if nn is not None else None
    return isinstance(cls, type) and issubclass(cls, nn.Module)


def build_plan(units: Iterable[Unit], recipe: Recipe, backend: str, all_module_names: Iterable[str] = (),
               all_type_names: Iterable[str] = (), global_types: tuple[str, ...] | None = None) -> Plan:
    """Resolve every unit and validate it; raise before anything is modified.

    ``global_types`` (the algorithm's declared ``global_types``) limits which module types
    ``global_config`` applies to; other types are quantized only when a type or name config
    names them.

    Raises ConfigError for a name/type key that matches nothing in the model (with the
    nearest name; a ``torch.nn`` type the model lacks, such as ``Conv1d``, only warns), and QuantizationError naming the layer for a spec that cannot apply
    (e.g. a block size that does not divide the input axis).
    """
    units = list(units)
    _check_keys(recipe, units, all_module_names, all_type_names)
    layers = tuple(_plan_layer(unit, recipe, global_types) for unit in units)
    return Plan(algorithm=recipe.algorithm, backend=backend, layers=layers)
