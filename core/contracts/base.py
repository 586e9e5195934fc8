"""``Plugin``: what every contribution of every kind has (name, description, options)."""

from __future__ import annotations

import abc
import copy
from typing import Any, ClassVar, TypeVar

from quanta._records.spec import changed_options

__all__ = ["Plugin", "legacy_problems", "RENAMED_CAPABILITIES"]


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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse, when the class is defined, what a quanta 0.1 plugin did that quanta 0.2 would
        otherwise silently ignore (a renamed capability, a method found by looking for it, the
        0.1 exporter signature): a ``quanta.PluginContractError`` saying what changed and what to
        do (docs/plugins.md, "Updating a plugin")."""
        super().__init_subclass__(**kwargs)
        problems = legacy_problems(cls)
        if problems:
            from quanta.errors import PluginContractError

            raise PluginContractError(f"{cls.__module__}.{cls.__qualname__} is written for quanta 0.1: "
                                      + "; ".join(problems) + " (docs/plugins.md, 'Updating a plugin')")

    #: The plugin kind ("scheme", "observer", "algorithm", "backend", "exporter"); set by each kind's base.
    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_class: ClassVar[type | None] = None

    @property
    def config(self) -> Any:
        """The options: an instance of ``config_class`` (defaults unless configured), or None.

        A subclass that declares ``config_class = None`` (no options of its own) while a base
        class it inherits code from has options sees that base's defaults here, so inherited
        methods reading ``self.config`` keep working (a subclass of a built-in scheme)."""
        cfg = self.__dict__.get("_quanta_config")
        if cfg is None:
            cls = self.config_class or _inherited_config_class(type(self))
            if cls is not None:
                cfg = cls()
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


def _inherited_config_class(cls: type) -> type | None:
    for base in cls.__mro__[1:]:
        config_class = base.__dict__.get("config_class")
        if config_class is not None:
            return config_class
    return None


#: Capabilities of quanta 0.1 that quanta 0.2 renamed: old name -> what to declare instead.
RENAMED_CAPABILITIES = {
    "replaces_weights_only": "shares_float_weights = True (weights replaced only through "
                             "context.write_layer/quantize_layer, never in place)",
}


def legacy_problems(cls: type) -> list[str]:
    """What in ``cls`` (a contribution class) is written for quanta 0.1, as messages."""
    import inspect

    problems: list[str] = []
    if cls.__module__.startswith("quanta.contracts"):
        return problems  # the contract classes themselves
    for old, new in RENAMED_CAPABILITIES.items():
        if any(old in klass.__dict__ for klass in cls.__mro__):
            problems.append(f"it declares {old!r}, which quanta 0.2 does not read; declare {new}")
    kind = getattr(cls, "kind", "")
    if kind == "exporter":
        export = cls.__dict__.get("export")
        if export is not None:
            params = inspect.signature(export).parameters
            if "overwrite" not in params and any(p.kind is p.VAR_KEYWORD for p in params.values()):
                problems.append("export(self, model, path, **options) is the 0.1 signature; write export(self, model, "
                                "path, *, example_inputs=None, overwrite=False) and read options from self.config "
                                "(declare config_class)")
        if "verify" in cls.__dict__ and not getattr(cls, "can_verify", False):
            problems.append("it defines verify() but does not declare can_verify = True (0.1 found verify by "
                            "looking for it; 0.2 calls only what is declared)")
    if kind == "algorithm" and "session" in cls.__dict__ and not getattr(cls, "training_loop", False):
        problems.append("it defines session() but does not declare training_loop = True (0.1 found session by "
                        "looking for it; 0.2 calls only what is declared)")
    return problems
