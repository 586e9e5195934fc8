"""Layer configs: one mapping of a recipe (``global_config``, a ``module_type_configs`` value...)
to a :class:`~quanta.QuantSpec` (``quanta._recipes.layers``).

The coremltools names are read as quanta's (``weight_dtype`` is ``dtype``, ``mode:
linear_symmetric`` is ``scheme: symmetric``); a scheme or observer written as a mapping
(``{name: mse, grid: 200}``) gets its options structured by the plugin's ``config_class``.
Registered as the :data:`~quanta._recipes.structure.converter`'s hook for ``QuantSpec``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from typing import Any, NewType

import attrs
from cattrs.errors import ClassValidationError

from quanta._recipes.structure import (config_error, converter, join_key, option_names, plugin_config,
                                       structure_as_written)
from quanta._records.spec import QuantSpec
from quanta.errors import ConfigError, PluginNotFoundError, did_you_mean

__all__ = ["LAYER_KEYS", "GlobalConfig", "structure_layer", "algorithm_options"]

#: ``global_config``'s type: a layer config that may also hold the algorithm's options (hoisted
#: out before structuring), so an unknown key there is compared with them too.
GlobalConfig = NewType("GlobalConfig", QuantSpec)
#: The option names of the algorithm whose stage is being structured (set by the stage's hook).
algorithm_options: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("algorithm_options",
                                                                                    default=())

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
#: Keys that set a plugin's options directly (an instance of its config_class).
_OPTION_FIELDS = ("scheme_config", "observer_config")
_FLOAT_DTYPES = ("float32", "torch.float32", "fp32")


def _registry():
    from quanta import registry

    return registry


def structure_layer(raw: Any, type_: Any = QuantSpec) -> QuantSpec | None:
    """A QuantSpec from one layer config (a mapping, a QuantSpec, a coremltools config object, or
    None). ``weight_dtype: float32`` gives None (the layer stays float, as in coremltools).
    Raises ConfigError with the key as written, relative to the layer config."""
    if raw is None or isinstance(raw, QuantSpec):
        return raw
    if attrs.has(type(raw)):
        raw = {f.name: getattr(raw, f.name) for f in attrs.fields(type(raw)) if f.init}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"expected a mapping of layer options or null, got {type(raw).__name__}")
    fields: dict[str, Any] = {}
    written: dict[str, str] = {}
    for k, v in raw.items():
        field = LAYER_KEYS.get(k) if isinstance(k, str) else None
        if k in _IGNORED_LAYER_KEYS:
            continue
        if field is None:
            fields[k] = v  # an option field, or an unknown key the structuring refuses below
            continue
        if k == "mode":
            v = _mode(v)
        if field in ("scheme", "observer") and isinstance(v, Mapping):
            v, fields[f"{field}_config"] = _plugin_ref(field, v, k)
        elif field == "scheme":
            v = str(getattr(v, "value", v))  # coremltools' QuantizationScheme enum
        if field == "block_size" and isinstance(v, (tuple, list)):
            v = _block_size_from_tuple(v, k)
        if field in fields and fields[field] != v:
            raise ConfigError(f"conflicts with another key setting {field!r} ({fields[field]!r})", k)
        fields[field], written[field] = v, k
    if str(fields.get("dtype", "")).lower() in _FLOAT_DTYPES:
        return None
    try:
        spec = structure_as_written(fields, QuantSpec)
    except ClassValidationError as exc:
        error = config_error(exc, None, {QuantSpec: lambda k, where: _unknown_layer_key(k, raw, type_ is GlobalConfig)})
        # Name the key as the user wrote it (weight_dtype, quantization_scheme, ...).
        raise ConfigError(error.detail, written.get(error.key, error.key)) from None
    _check_plugin("scheme", spec.scheme, written.get("scheme", "scheme"))
    _check_plugin("observer", spec.observer, written.get("observer", "observer"))
    return spec


def _mode(value: Any) -> str:
    if str(value) not in _MODES:
        raise ConfigError(f"unknown mode {value!r}{did_you_mean(str(value), _MODES)} (allowed: {', '.join(_MODES)})",
                          "mode")
    return _MODES[str(value)]


def _plugin_ref(kind: str, value: Mapping, key: str) -> tuple[str, Any]:
    """``(name, options)`` from ``{name: <plugin>, <option>: <value>, ...}``."""
    options = dict(value)
    name = options.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"a {kind} given as a mapping needs 'name' (e.g. {{name: ..., option: value}})", key)
    try:
        return name, plugin_config(kind, name, options)
    except PluginNotFoundError as exc:
        raise ConfigError(str(exc), key) from None
    except ConfigError as exc:
        raise ConfigError(exc.detail, join_key(key, exc.key)) from None


def _unknown_layer_key(k: str, raw: Mapping, in_global: bool) -> ConfigError:
    options = algorithm_options.get()
    if k in options:  # not hoisted: an algorithm option in a type or name config
        return ConfigError("algorithm options can only be set in global_config or at the top level", k)
    allowed = sorted(set(LAYER_KEYS) | (set(options) if in_global else set()))
    return ConfigError(f"unknown key {k!r}{_plugin_option_hint(k, raw)}{did_you_mean(str(k), allowed)} "
                       f"(allowed: {', '.join(allowed)})", k)


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


def _block_size_from_tuple(value: Any, key: str) -> int:
    # coremltools' tuple form (output_block, input_block); quanta blocks the input axis only.
    vals = list(value)
    if len(vals) == 1:
        return vals[0]
    if len(vals) == 2 and vals[0] in (0, 1):
        return vals[1]
    raise ConfigError(f"block_size {tuple(value)!r}: only blocks along the input axis are supported (an int, or (1, n))",
                      key)


def _check_plugin(kind: str, name: str, key: str) -> None:
    try:
        _registry().get(kind, name)
    except PluginNotFoundError as exc:
        raise ConfigError(str(exc), key) from None


converter.register_structure_hook(QuantSpec, structure_layer)
converter.register_structure_hook(GlobalConfig, structure_layer)
