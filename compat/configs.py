"""coremltools' config classes, exactly: fields, defaults, validation and errors are coremltools' own.

``quanta.compat`` does not re-implement coremltools' configuration: the module-level configs
(``ModulePostTrainingQuantizerConfig``, ``ModuleLinearQuantizerConfig``, ``ModuleGPTQConfig``,
``ModuleSparseGPTConfig``, ``LayerwiseCompressionAlgorithmConfig`` with its ``get_class`` /
``register`` registry) and the enums (``QuantizationScheme``, ``QuantizationGranularity``,
``ObserverType``) *are* coremltools' classes, so ``from_dict`` nests config objects,
``global_config`` defaults are filled, ``set_global`` / ``set_module_type`` / ``set_module_name``
exist and a config compares equal to coremltools' own. The top-level configs are thin
subclasses whose ``from_dict`` / ``from_yaml`` add quanta's error contract on top of
coremltools': every error is still the class coremltools raises (cattrs'
``ClassValidationError``, ``ValueError``, ``AssertionError``, ``TypeError``) *and* a
:class:`quanta.ConfigError` naming the key and the nearest allowed key.

The configs meet quanta at one boundary, :mod:`quanta.compat.recipes`, which turns a config
object into a quanta recipe dict for the public :func:`quanta.load_recipe`.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any

import attrs
import cattrs
from coremltools.optimize.torch.layerwise_compression.algorithms import (
    LayerwiseCompressionAlgorithmConfig,
    ModuleGPTQConfig,
    ModuleSparseGPTConfig,
)
from coremltools.optimize.torch.layerwise_compression.layerwise_compressor import (
    LayerwiseCompressorConfig as _CtLayerwiseCompressorConfig,
)
from coremltools.optimize.torch.optimization_config import QuantizationGranularity
from coremltools.optimize.torch.quantization.post_training_quantization import (
    ModulePostTrainingQuantizerConfig,
)
from coremltools.optimize.torch.quantization.post_training_quantization import (
    PostTrainingQuantizerConfig as _CtPostTrainingQuantizerConfig,
)
from coremltools.optimize.torch.quantization.quantization_config import (
    LinearQuantizerConfig as _CtLinearQuantizerConfig,
)
from coremltools.optimize.torch.quantization.quantization_config import (
    ModuleLinearQuantizerConfig,
    ObserverType,
    QuantizationScheme,
)

from quanta.errors import ConfigError, did_you_mean

__all__ = [
    "QuantizationScheme", "QuantizationGranularity", "ObserverType",
    "ModulePostTrainingQuantizerConfig", "PostTrainingQuantizerConfig",
    "ModuleLinearQuantizerConfig", "LinearQuantizerConfig",
    "LayerwiseCompressionAlgorithmConfig", "ModuleGPTQConfig", "ModuleSparseGPTConfig", "LayerwiseCompressorConfig",
    "ConfigValidationError", "ConfigValueError", "ConfigAssertionError", "ConfigTypeError",
]


class ConfigValidationError(cattrs.ClassValidationError, ConfigError):
    """cattrs' ``ClassValidationError`` (what coremltools' ``from_dict`` raises) that is also a
    :class:`quanta.ConfigError`: its message names the key, the nearest allowed key and the allowed keys."""

    def __new__(cls, message: str, exceptions, cl, key: str | None = None):
        return super().__new__(cls, f"{key}: {message}" if key else message, exceptions, cl)

    def __init__(self, message: str, exceptions, cl, key: str | None = None):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message, exceptions, cl)


class ConfigValueError(ConfigError):
    """coremltools' ``ValueError`` for a bad config value, as a :class:`quanta.ConfigError`."""


class ConfigAssertionError(ConfigError, AssertionError):
    """coremltools' ``AssertionError`` for a bad config value, also a :class:`quanta.ConfigError`."""


class ConfigTypeError(ConfigError, TypeError):
    """coremltools' ``TypeError`` for a config value of the wrong type, also a :class:`quanta.ConfigError`."""


def _field_names(cl) -> list[str]:
    try:
        return [f.name for f in attrs.fields(cl) if f.init]
    except (TypeError, attrs.exceptions.NotAnAttrsClassError):
        return []


def _leaves(exc: BaseException, path: str):
    """(dotted path, leaf exception) pairs of a cattrs error tree."""
    if isinstance(exc, cattrs.errors.ForbiddenExtraKeysError):
        yield path, exc
        return
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            note = next((n for n in getattr(sub, "__notes__", []) if "@ attribute" in n or "@ key" in n), None)
            name = None
            if note is not None:
                name = getattr(note, "name", None)
                if name is None:
                    name = note.split("attribute", 1)[-1].split("key", 1)[-1].strip().split()[0].strip("'\"")
            yield from _leaves(sub, f"{path}.{name}" if name is not None and path else (name or path))
        return
    yield path, exc


def _describe(exc: cattrs.ClassValidationError) -> tuple[str, str | None]:
    """A one-line message for a cattrs error tree, naming the first offending key."""
    parts, first_key = [], None
    for path, leaf in _leaves(exc, ""):
        if isinstance(leaf, cattrs.errors.ForbiddenExtraKeysError):
            allowed = _field_names(leaf.cl)
            for extra in sorted(leaf.extra_fields):
                key = f"{path}.{extra}" if path else str(extra)
                first_key = first_key or key
                parts.append(f"unknown key {extra!r} in {leaf.cl.__name__}{did_you_mean(str(extra), allowed)} "
                             f"(allowed: {', '.join(allowed)})")
        else:
            first_key = first_key or (path or None)
            parts.append(f"{path or 'value'}: {type(leaf).__name__}: {leaf}")
    return "; ".join(parts) or str(exc), first_key


def _translated(exc: BaseException, what: str) -> BaseException | None:
    if isinstance(exc, ConfigError):
        return None
    if isinstance(exc, cattrs.ClassValidationError):
        message, key = _describe(exc)
        return ConfigValidationError(f"invalid {what}: {message}", exc.exceptions, exc.cl, key)
    for base, cls in ((AssertionError, ConfigAssertionError), (TypeError, ConfigTypeError),
                      (ValueError, ConfigValueError)):
        if isinstance(exc, base):
            return cls(f"invalid {what}: {exc}")
    return None


@contextlib.contextmanager
def coremltools_errors(what: str):
    """Re-raise coremltools' config errors as the same class plus :class:`quanta.ConfigError`."""
    try:
        yield
    except (cattrs.ClassValidationError, ValueError, AssertionError, TypeError) as exc:
        new = _translated(exc, what)
        if new is None:
            raise
        raise new from exc


def _require_mapping(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigValueError(f"{what} must be a mapping (dict), got a {type(value).__name__}")
    return value


def _read_yaml(source, what: str) -> dict:
    """coremltools' ``from_yaml`` source (a path or an open stream) -> the mapping, checked by quanta's reader."""
    from quanta._recipes.yaml_reader import read_yaml_mapping

    if isinstance(source, (str, os.PathLike)):
        return read_yaml_mapping(source, what=what)
    if isinstance(source, io.IOBase) or hasattr(source, "read"):
        import yaml

        data = yaml.safe_load(source)
        return _require_mapping(data, what)
    raise ConfigTypeError(f"{what}: expected a path or an open YAML stream, got {type(source).__name__}")


class _QuantaErrors:
    """``from_dict`` / ``from_yaml`` with quanta's error contract over coremltools' own."""

    @classmethod
    def from_dict(cls, config_dict):
        """coremltools' ``from_dict``; errors are coremltools' classes and :class:`quanta.ConfigError`."""
        config_dict = _require_mapping(config_dict, f"a {cls.__name__} dict")
        allowed = _field_names(cls)
        for key in config_dict:
            if key not in allowed:  # coremltools raises ValueError here too ("Found unrecognized key")
                raise ConfigValueError(f"unknown key {key!r} in {cls.__name__}{did_you_mean(str(key), allowed)} "
                                       f"(allowed: {', '.join(allowed)})", str(key))
        with coremltools_errors(cls.__name__):
            return super().from_dict(config_dict)

    @classmethod
    def from_yaml(cls, yml):
        """Read a YAML file (path) or stream, then :meth:`from_dict`."""
        return cls.from_dict(_read_yaml(yml, f"{cls.__name__} file"))


class PostTrainingQuantizerConfig(_QuantaErrors, _CtPostTrainingQuantizerConfig):
    """coremltools' ``PostTrainingQuantizerConfig`` (``global_config``, ``module_type_configs``,
    ``module_name_configs`` of :class:`ModulePostTrainingQuantizerConfig`)."""

    def to_recipe(self):
        """The equivalent quanta :class:`~quanta.Recipe` (algorithm ``rtn``)."""
        from quanta.compat.recipes import ptq_recipe
        from quanta import load_recipe

        return load_recipe(ptq_recipe(self))


class LinearQuantizerConfig(_QuantaErrors, _CtLinearQuantizerConfig):
    """coremltools' ``LinearQuantizerConfig`` (module configs of :class:`ModuleLinearQuantizerConfig`,
    ``non_traceable_module_names``, ``preserved_attributes``)."""

    def to_recipe_dict(self) -> dict:
        """The equivalent quanta recipe dict (algorithm ``qat``)."""
        from quanta.compat.recipes import qat_recipe

        return qat_recipe(self)


class LayerwiseCompressorConfig(_QuantaErrors, _CtLayerwiseCompressorConfig):
    """coremltools' ``LayerwiseCompressorConfig`` (module configs of :class:`ModuleGPTQConfig`,
    ``layers``, ``input_cacher``, ``calibration_nsamples``)."""

    @classmethod
    def from_dict(cls, config_dict):
        """coremltools' ``from_dict``, plus two things coremltools 9.0 rejects: ``weight_dtype`` as a bit
        count (``4``, as coremltools' documentation writes it) means ``"uint4"`` (GPTQ's 16-level grid),
        and a module config without ``algorithm`` (a KeyError in coremltools) is ``"gptq"``."""
        config_dict = _require_mapping(config_dict, f"a {cls.__name__} dict")

        def bits(layer):
            if isinstance(layer, dict):
                layer = {"algorithm": "gptq", **layer}
                if type(layer.get("weight_dtype")) is int:
                    layer["weight_dtype"] = f"uint{layer['weight_dtype']}"
            return layer

        data = dict(config_dict)
        if "global_config" in data:
            data["global_config"] = bits(data["global_config"])
        for section in ("module_type_configs", "module_name_configs"):
            if isinstance(data.get(section), dict):
                data[section] = {k: bits(v) for k, v in data[section].items()}
        return super().from_dict(data)

    def to_recipe(self):
        """The equivalent quanta :class:`~quanta.Recipe` (algorithm ``gptq``)."""
        from quanta.compat.recipes import gptq_recipe
        from quanta import load_recipe

        return load_recipe(gptq_recipe(self))
