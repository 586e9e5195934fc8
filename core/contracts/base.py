"""``Plugin``: what every contribution of every kind has (name, description, options)."""

from __future__ import annotations

import abc
import copy
from typing import Any, ClassVar, TypeVar

from quanta._records.spec import changed_options

__all__ = ["Plugin"]


_P = TypeVar("_P", bound="Plugin")

class Plugin(abc.ABC):
    """Base of the five plugin kinds. Subclass the kind's class (``quanta.contracts.Scheme``, ...),
    not this one.

    Class attributes every contribution sets:

    - ``name``: the name recipes and lookups use (letters, digits, ``_ . -``; starts with a letter).
    - ``description``: one line shown by ``quanta plugins``.
    - ``config_class``: a frozen attrs class of the plugin's options, or None (no options). Give
      each field ``metadata={"doc": "..."}``: ``quanta describe`` shows it. Recipes are structured
      into it by quanta's one converter: unknown keys are refused, values reach the class as
      written (its converters and validators check them). It may declare ``version`` (an int
      class attribute, default 1): saved recipes write it beside the options, options written
      for an older version load (through an optional classmethod ``upgrade(options, version)``
      returning the options in today's form), a newer version is refused naming both.

    Options reach the plugin as ``self.config``: an instance of ``config_class`` (its defaults
    until configured). Core makes a configured copy with :meth:`with_config` for each distinct
    set of options a recipe names; the registered instance itself is never changed.
    """

    #: The plugin kind ("scheme", "observer", "algorithm", "backend", "exporter"); set by each kind's base.
    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_class: ClassVar[type | None] = None

    @property
    def config(self) -> Any:
        """The options: an instance of ``config_class`` (defaults unless configured), or None."""
        cfg = self.__dict__.get("_quanta_config")
        if cfg is None and self.config_class is not None:
            cfg = self.config_class()
            self.__dict__["_quanta_config"] = cfg
        return cfg

    @config.setter
    def config(self, value: Any) -> None:
        self.__dict__["_quanta_config"] = value

    def with_config(self: _P, config: Any) -> _P:
        """A copy of this plugin whose ``self.config`` is ``config`` (an instance of ``config_class``,
        or None for the defaults). The default makes a shallow copy; override it when the plugin
        keeps state derived from its options."""
        if config is not None:
            if self.config_class is None:
                raise TypeError(f"{self.kind} {self.name!r} takes no options")
            if not isinstance(config, self.config_class):
                raise TypeError(f"{self.kind} {self.name!r} expects a {self.config_class.__name__}, "
                                f"got {type(config).__name__}")
        clone = copy.copy(self)
        clone.__dict__.pop("_quanta_config", None)
        if config is not None:
            clone.config = config
        return clone

    def options(self) -> dict[str, Any]:
        """The options that differ from their defaults, as a dict (for reports and ``describe``)."""
        return changed_options(self.config)
