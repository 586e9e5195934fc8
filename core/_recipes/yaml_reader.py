"""Reading recipe YAML files strictly (``quanta._recipes.yaml_reader``).

``yaml.safe_load`` keeps the last of two equal keys silently; :class:`StrictLoader` (a
``yaml.SafeLoader`` subclass) refuses them naming the key and both lines, and refuses aliases
(``*name``: a few lines of anchors and aliases can expand to gigabytes, "billion laughs").
A file above the metadata size limit (``QUANTA_MAX_METADATA_BYTES``, 64 MiB by default) is not
read. Syntax errors, a missing or unreadable file and a non-mapping top level become
:class:`~quanta.errors.ConfigError` naming the file, the line and the column.
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from quanta.errors import ConfigError, did_you_mean

__all__ = ["StrictLoader", "read_yaml", "read_yaml_mapping", "require_mapping", "reject_unknown_keys"]


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises on a duplicate mapping key and on an alias (anywhere in the document)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor} is not allowed (quanta refuses YAML aliases: a few of them can "
                            "expand a small file into gigabytes); write the value out", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports unhashable keys itself
            if key in seen:
                first = seen[key].start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first set on line {first}); each key may appear once",
                    key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike, what: str = "recipe file") -> Any:
    """The document in the YAML file at ``path`` (None for an empty file), read with :class:`StrictLoader`.

    Raises ConfigError naming ``what``, the file and the line for a missing file, a syntax
    error or a duplicate key.
    """
    path = Path(path)
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "missing"
        raise ConfigError(f"{what} {str(path)!r} is {kind}; pass the path of a YAML file")
    from quanta._limits import check_size

    check_size(path, what, lambda message, name=None: ConfigError(message))
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.load(fh, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"{what} {str(path)!r}{where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {exc.strerror or exc}") from None


def read_yaml_mapping(path: str | os.PathLike, what: str = "recipe file") -> dict:
    """:func:`read_yaml`, requiring a mapping at the top level (an empty file gives ``{}``)."""
    data = read_yaml(path, what)
    if data is None:
        return {}
    return require_mapping(data, f"the top level of {what} {str(path)!r}")


def require_mapping(value: Any, what: str) -> dict:
    """``value`` as a dict, or ConfigError saying ``what`` must be a mapping and what it was."""
    if not isinstance(value, dict):
        if isinstance(value, Mapping):
            return dict(value)
        raise ConfigError(f"{what} must be a mapping of keys (e.g. {{global_config: {{...}}}}), "
                          f"got a {type(value).__name__}")
    return value


def reject_unknown_keys(mapping: Mapping, allowed: Iterable[str]) -> None:
    """Raise ConfigError for the first key of ``mapping`` not in ``allowed``, naming it, the nearest
    allowed key and all of them (in the order given)."""
    allowed = list(allowed)
    for k in mapping:
        if k not in allowed:
            raise ConfigError(f"unknown key {k!r}{did_you_mean(str(k), allowed)} (allowed: {', '.join(allowed)})", k)
