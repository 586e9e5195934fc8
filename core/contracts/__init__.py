"""``quanta.contracts``: the one typed contract of each plugin kind.

Each kind is an abstract base class. Its abstract methods are required; its other methods and
class attributes are the optional capabilities, declared here with their defaults. The
registry refuses a contribution that is not an instance of its kind's class or leaves an
abstract method unimplemented; core calls what is declared and never inspects a plugin for
anything else. ``KINDS`` is the one table of kinds that the hook specs, the registry and the
CLI read.
"""

from __future__ import annotations

import attrs

from .algorithm import Algorithm
from .backend import Backend, Unit
from .base import Plugin
from .exporter import Exporter
from .observer import Observer
from .ranks import Ranks
from .scheme import GRIDS, Scheme

__all__ = ["Plugin", "Scheme", "Observer", "Algorithm", "Backend", "Exporter", "Unit", "GRIDS", "Kind", "KINDS",
           "kind_of", "Ranks"]


@attrs.frozen
class Kind:
    """One plugin kind: its ``name``, its contract class ``base`` and its registration ``hook``."""

    name: str
    base: type
    hook: str
    summary: str
    #: the class attributes through which a contribution of this kind declares its capabilities
    declared: tuple[str, ...] = ()


#: The plugin kinds, in the order they are listed.
KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("scheme", Scheme, "register_schemes", "how float values map to integer codes and back", ("grid",)),
    Kind("observer", Observer, "register_observers", "which range a tensor gets",
         ("ranges_carry_non_finite", "streaming_options")),
    Kind("algorithm", Algorithm, "register_algorithms", "how a whole model is transformed",
         ("needs_data", "changes", "composes_with_records", "shares_float_weights", "global_types", "backends", "reads_float",
          "training_loop")),
    Kind("backend", Backend, "register_backends", "a model representation quanta can quantize",
         ("priority", "grids", "family", "supports_inplace", "suffixes")),
    Kind("exporter", Exporter, "register_exporters", "writes a quantized model to a file format",
         ("suffix", "writes_directory", "grids", "can_verify", "staged")),
)}


def kind_of(name: str) -> Kind:
    """The :class:`Kind` called ``name``; raises ``quanta.PluginNotFoundError`` with the kinds."""
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        from quanta.errors import PluginNotFoundError

        raise PluginNotFoundError("plugin kind", str(name), KINDS) from None
