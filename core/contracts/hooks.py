"""The plugin contracts: pluggy hook specifications of the ``quanta`` project.

Registration hooks (one per plugin kind) receive a :class:`Registrar`, ``register``; they are
historic (pytest's ``call_historic`` pattern): the registry calls each once and pluggy replays
the call for every plugin registered later. Event hooks are 1:N broadcasts named
``<phase>_<event>``; ``add_cli_options`` lets a plugin add options to the ``quanta`` command.
Plugins write ``@quanta.hookimpl``.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Callable

import pluggy

from quanta.contracts import KINDS

if TYPE_CHECKING:
    from quanta.contracts import Algorithm, Backend, Exporter, Observer, Scheme

__all__ = ["PROJECT", "hookspec", "hookimpl", "REGISTRATION_HOOKS", "EVENT_HOOKS", "CLI_HOOKS", "Registrar"]

PROJECT = "quanta"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: registration hook name -> plugin kind it contributes (from the one table of kinds).
REGISTRATION_HOOKS = {kind.hook: kind.name for kind in KINDS.values()}
#: The event hooks (1:N broadcasts; a failing implementation is skipped with a warning).
EVENT_HOOKS = ("run_started", "layer_quantized", "run_finished")
#: Hooks of the ``quanta`` command and of recipes: plugin options, example models.
CLI_HOOKS = ("add_cli_options", "example_models")


class Registrar:
    """What a registration hook receives as ``register`` (tox's ``ToxEnvRegister`` style).

    Call it, ``register(obj)``, to contribute ``obj`` as the hook's own kind, or use the typed
    methods ``register.add_scheme(obj)``, ``add_observer``, ``add_algorithm``, ``add_backend``
    and ``add_exporter``. Each contribution is checked against its kind's contract at once; a
    failure refuses the whole plugin.
    """

    __slots__ = ("kind", "_add")

    def __init__(self, kind: str, add: Callable[[str, Any], None]) -> None:
        self.kind = kind
        self._add = add

    def __call__(self, contribution: Any) -> None:
        """Contribute ``contribution`` as this hook's kind (``register_schemes`` -> a scheme)."""
        self._add(self.kind, contribution)

    def add_scheme(self, scheme: Scheme) -> None:
        """Contribute a ``quanta.contracts.Scheme`` instance."""
        self._add("scheme", scheme)

    def add_observer(self, observer: Observer) -> None:
        """Contribute a ``quanta.contracts.Observer`` instance."""
        self._add("observer", observer)

    def add_algorithm(self, algorithm: Algorithm) -> None:
        """Contribute a ``quanta.contracts.Algorithm`` instance."""
        self._add("algorithm", algorithm)

    def add_backend(self, backend: Backend) -> None:
        """Contribute a ``quanta.contracts.Backend`` instance."""
        self._add("backend", backend)

    def add_exporter(self, exporter: Exporter) -> None:
        """Contribute a ``quanta.contracts.Exporter`` instance."""
        self._add("exporter", exporter)

    def __repr__(self) -> str:
        return f"<quanta Registrar for {self.kind}s>"


@hookspec(historic=True)
def register_schemes(register: Registrar) -> None:
    """Contribute quantization schemes.

    Args:
        register: a :class:`Registrar`; call ``register(scheme)`` (or ``register.add_scheme(scheme)``)
            once per scheme: an instance of a subclass of ``quanta.contracts.Scheme`` (the
            contract: required and optional methods).

    Returns nothing. Fires once, when the registry first loads this plugin.
    """


@hookspec(historic=True)
def register_observers(register: Registrar) -> None:
    """Contribute observers (range finders): ``register(observer)``, an instance of a subclass of ``quanta.contracts.Observer``.

    Returns nothing. Fires once, when the registry first loads this plugin.
    """


@hookspec(historic=True)
def register_algorithms(register: Registrar) -> None:
    """Contribute algorithms (whole-model transforms): ``register(algorithm)``, an instance of a subclass of ``quanta.contracts.Algorithm``.

    Returns nothing. Fires once, when the registry first loads this plugin.
    """


@hookspec(historic=True)
def register_backends(register: Registrar) -> None:
    """Contribute backends (model representations): ``register(backend)``, an instance of a subclass of ``quanta.contracts.Backend``.

    Returns nothing. Fires once, when the registry first loads this plugin.
    """


@hookspec(historic=True)
def register_exporters(register: Registrar) -> None:
    """Contribute exporters (file formats): ``register(exporter)``, an instance of a subclass of ``quanta.contracts.Exporter``.

    Returns nothing. Fires once, when the registry first loads this plugin.
    """


@hookspec
def run_started(algorithm: str, plan: Any) -> None:
    """Broadcast when ``quanta.quantize`` starts, after the plan is validated.

    Args:
        algorithm: the algorithm's registered name.
        plan: the ``quanta.Plan`` (``plan.selected`` lists the layers to be quantized).

    Return values are ignored.
    """


@hookspec
def layer_quantized(name: str, record: Any, stats: Any) -> None:
    """Broadcast each time a layer's weight has been quantized and written back (in an
    ``inplace=True`` ``rtn`` run: its record stored; the float values are written over the weight
    when the whole run has succeeded).

    Args:
        name: the layer name, e.g. ``"encoder.layer.0.attention.self.query"``.
        record: the ``QuantizedWeight`` stored for it.
        stats: the layer's ``LayerReport`` (spec, relative error, bytes, index and total).

    Return values are ignored. Progress displays implement this hook.
    """


@hookspec
def run_finished(report: Any) -> None:
    """Broadcast when ``quanta.quantize`` has finished successfully with its ``Report``.

    Return values are ignored.
    """


@hookspec
def add_cli_options(command: str, group: argparse._ArgumentGroup) -> None:
    """Add options to a subcommand of the ``quanta`` command (pytest's ``pytest_addoption``).

    Args:
        command: the subcommand being built; today ``"export"``.
        group: the argparse argument group "options of exporter plugins" of that subcommand;
            call ``group.add_argument(...)``.

    Fires when the ``quanta`` command builds the parser of ``command`` (never for ``quanta
    --help``, which loads no plugin). For ``export``, the value of every option a plugin adds
    (when given) is passed to the exporter as the option named by its ``dest``.
    Return values are ignored.
    """


@hookspec
def example_models() -> dict[str, Callable[[], Any]]:
    """Offer example models by name: a recipe's ``model: <name>``, ``quanta quantize --model <name>``.

    Returns a mapping of name -> a function with no arguments returning an example: an object
    with ``model`` (the ``torch.nn.Module``), ``data`` (calibration batches or None),
    ``example_inputs``, ``tokenizer_dir`` and ``evaluate`` (``quanta.examples.Example``).
    Fires whenever a name is resolved; build nothing until the function is called. The
    built-in examples (``minilm``, ``digits``, ``tiny-llama``) come from ``quanta.examples``.
    """
    raise NotImplementedError  # a specification: pluggy calls the implementations, never this
