"""The one place plain data (YAML, dicts) becomes quanta's typed config classes (``quanta._recipes.structure``).

One cattrs :data:`converter` structures every class a recipe holds: the recipe and its stages
(:mod:`quanta._recipes.document`), layer configs (``QuantSpec``) and every plugin's
``config_class``. It refuses extra keys (``forbid_extra_keys``) and collects every problem of a
class in cattrs' exception groups; :func:`config_error` walks that tree (the ``__notes__`` name
each attribute, mapping key and list index) and gives one :class:`~quanta.errors.ConfigError`
naming the dotted key path, the allowed keys and the nearest one.

Field values are taken as written and checked by the class itself (its attrs converters and
validators), so a plugin's config class is its contract: cattrs never coerces ``3.7`` to an
``int`` behind its back.

Plugin configs carry a version: a ``config_class`` may set ``version`` (an int class attribute,
default 1). A recipe's options may say which version they were written for (``version: 1``);
older ones load (through the class's optional ``upgrade(options, version)`` classmethod), a
newer one is refused naming both versions.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import cattrs
from cattrs.errors import (AttributeValidationNote, ClassValidationError, ForbiddenExtraKeysError,
                           IterableValidationNote)
from cattrs.gen import make_dict_structure_fn, override

from quanta.errors import ConfigError, PluginNotFoundError, QuantaError, did_you_mean

try:
    BaseExceptionGroup
except NameError:  # Python 3.10: cattrs depends on the backport
    from exceptiongroup import BaseExceptionGroup

__all__ = ["converter", "structure", "structure_as_written", "config_error", "join_key", "plugin_config",
           "config_version", "option_names", "unstructure_options"]

#: The converter every recipe class is structured with.
converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True, prefer_attrib_converters=True)


def _as_is(value: Any, _type: Any) -> Any:
    return value


_written_hooks: dict[type, Callable] = {}


def structure_as_written(data: Mapping, cls: type) -> Any:
    """An instance of attrs class ``cls`` from ``data``: extra keys refused, each value passed as
    written to ``cls`` (its converters and validators check it). Raises cattrs' exception group."""
    hook = _written_hooks.get(cls)
    if hook is None:
        hook = make_dict_structure_fn(cls, converter, _cattrs_forbid_extra_keys=True,
                                      **{f.name: override(struct_hook=_as_is) for f in attrs.fields(cls) if f.init})
        _written_hooks[cls] = hook
    return hook(data, cls)


def join_key(*parts: Any) -> str | None:
    """``"global_config.scheme.grid"`` from its parts (list indexes as ``[i]``; empty parts dropped)."""
    out = ""
    for part in parts:
        if part is None or part == "":
            continue
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
            continue
        if isinstance(part, type):  # a module_type_configs key given as a class
            part = part.__name__
        out += f".{part}" if out else str(part)
    return out or None


#: How an unknown key of a class is described: ``cls -> (key, path) -> ConfigError``.
UnknownKey = Callable[[str, "str | None"], ConfigError]


def _note_key(exc: BaseException) -> Any:
    for note in getattr(exc, "__notes__", ()):
        if isinstance(note, AttributeValidationNote):
            return note.name
        if isinstance(note, IterableValidationNote):
            return note.index
    return None


def _leaves(exc: BaseException, path: tuple) -> list[tuple[tuple, BaseException]]:
    """Every non-group exception in cattrs' tree, with the key path the notes give it, in field order."""
    if isinstance(exc, BaseExceptionGroup):
        out = []
        for sub in exc.exceptions:
            key = _note_key(sub)
            out += _leaves(sub, path if key is None else (*path, key))
        return out
    return [(path, exc)]


def config_error(exc: BaseException, key: str | None = None,
                 unknown: Mapping[type, UnknownKey] | None = None) -> ConfigError:
    """One ConfigError for cattrs' exception tree ``exc`` (or a single exception), naming the
    dotted key path below ``key``. ``unknown`` words the message for extra keys per class
    (default: ``unknown key 'x'; did you mean 'y'? (allowed: ...)``). Further problems are
    listed in ``ConfigError.others`` as ``(key, message)``."""
    errors = []
    for path, leaf in _leaves(exc, ()):
        where = join_key(key, *path)
        if isinstance(leaf, ForbiddenExtraKeysError):
            for extra in sorted(leaf.extra_fields, key=str):
                describe = (unknown or {}).get(leaf.cl, _unknown_field(leaf.cl))
                errors.append(describe(extra, where))
        elif isinstance(leaf, ConfigError):
            errors.append(ConfigError(leaf.detail, join_key(where, leaf.key)))
            errors += [ConfigError(detail, join_key(where, k)) for k, detail in leaf.others]
        elif isinstance(leaf, PluginNotFoundError):
            errors.append(ConfigError(str(leaf), where))
        elif isinstance(leaf, QuantaError) or not isinstance(leaf, (TypeError, ValueError, AttributeError)):
            raise leaf  # not a config problem (a plugin's own failure): never reworded
        else:
            errors.append(ConfigError(str(leaf), where))
    first = errors[0]
    first.others = [(e.key, e.detail) for e in errors[1:]]
    return first


def _unknown_field(cls: type) -> UnknownKey:
    allowed = [f.name for f in attrs.fields(cls) if f.init]

    def describe(k: str, where: str | None) -> ConfigError:
        return ConfigError(f"unknown key {k!r}{did_you_mean(str(k), allowed)} (allowed: {', '.join(allowed)})",
                           join_key(where, k))
    return describe


def structure(data: Any, cls: type, key: str | None = None, unknown: Mapping[type, UnknownKey] | None = None) -> Any:
    """``converter.structure(data, cls)``, any problem raised as one ConfigError under ``key``."""
    try:
        return converter.structure(data, cls)
    except (ClassValidationError, ForbiddenExtraKeysError, ConfigError, PluginNotFoundError) as exc:
        raise config_error(exc, key, unknown) from None
    except BaseExceptionGroup as exc:
        raise config_error(exc, key, unknown) from None


# -- plugin options ------------------------------------------------------------------------------

def _registry():
    from quanta import registry

    return registry


def config_version(config_class: type) -> int:
    """The version of a plugin's options class: its ``version`` class attribute, default 1."""
    version = getattr(config_class, "version", 1)
    return version if isinstance(version, int) and not isinstance(version, bool) and version >= 1 else 1


def option_names(kind: str, name: str) -> list[str]:
    """The option names of plugin ``(kind, name)`` (its ``config_class`` fields)."""
    cls = _registry().get(kind, name).config_class
    return [] if cls is None else [f.name for f in attrs.fields(cls) if f.init]


def _has_field(cls: type, name: str) -> bool:
    return any(f.name == name for f in attrs.fields(cls))


def plugin_config(kind: str, name: str, options: Any) -> Any:
    """An instance of plugin ``(kind, name)``'s ``config_class`` from ``options`` (a mapping, an
    instance, or None), or None when no options are given (the plugin's defaults).

    A ``version`` key says which version of the options they were written for (see the module
    docstring). Raises ConfigError with keys relative to the options (``"grid"``, ``"version"``).
    """
    cls = _registry().get(kind, name).config_class  # PluginNotFoundError names the nearest
    if options is None:
        return None
    if cls is not None and isinstance(options, cls):
        return options
    if attrs.has(type(options)):
        options = {f.name: getattr(options, f.name) for f in attrs.fields(type(options)) if f.init}
    if not isinstance(options, Mapping):
        raise ConfigError(f"expected a mapping of {kind} options, got {type(options).__name__}")
    options = dict(options)
    written = options.pop("version", None) if cls is None or not _has_field(cls, "version") else None
    if not options and written is None:
        return None
    if cls is None:
        raise ConfigError(f"{kind} {name!r} takes no options (got {', '.join(map(str, options))})")
    if written is not None:
        options = _upgrade(cls, kind, name, options, written)
    try:
        return structure_as_written(options, cls)
    except ClassValidationError as exc:
        allowed = option_names(kind, name)

        def unknown(k: str, where: str | None) -> ConfigError:
            return ConfigError(f"unknown option {k!r} for {kind} {name!r}{did_you_mean(str(k), allowed)} "
                               f"(allowed: {', '.join(allowed)})", join_key(where, k))
        error = config_error(exc, None, {cls: unknown})
        if error.key is None:  # the class refused the options as a whole (a TypeError, ...)
            error = ConfigError(f"invalid options for {kind} {name!r}: {error.detail}")
        raise error from None


def _upgrade(cls: type, kind: str, name: str, options: dict, written: Any) -> dict:
    current = config_version(cls)
    if isinstance(written, bool) or not isinstance(written, int) or written < 1:
        raise ConfigError(f"expected a positive integer version of the {kind} {name!r} options, got {written!r}",
                          "version")
    if written > current:
        raise ConfigError(f"these {kind} {name!r} options were written for version {written}, newer than this "
                          f"quanta's (version {current}); upgrade quanta or the plugin that provides {name!r}",
                          "version")
    if written < current and hasattr(cls, "upgrade"):
        options = dict(cls.upgrade(dict(options), written))
    return options


def _plain(value: Any) -> Any:
    """A YAML-safe value: enums by value (or name), tuples as lists, attrs instances as dicts."""
    if isinstance(value, enum.Enum):
        return value.value if isinstance(value, str) else value.name  # ct.target.iOS18 -> "iOS18"
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if attrs.has(type(value)):
        return {f.name: _plain(getattr(value, f.name)) for f in attrs.fields(type(value)) if f.init}
    return value


def unstructure_options(config: Any) -> dict:
    """A plugin config instance as the mapping a saved recipe holds: ``version`` (the class's, so a
    later quanta can upgrade it) and every option; :func:`plugin_config` reads it back to an equal
    instance."""
    cls = type(config)
    out = {f.name: _plain(getattr(config, f.name)) for f in attrs.fields(cls) if f.init}
    return out if _has_field(cls, "version") else {"version": config_version(cls), **out}
