"""The plugin contracts: pluggy hook specifications of the ``quanta`` project.

Registration hooks (one per plugin kind) receive a ``register`` callback; event hooks are
1:N broadcasts named ``<phase>_<event>``. Plugins write ``@quanta.hookimpl``.
"""

from __future__ import annotations

import pluggy

from quanta.contracts import KINDS

__all__ = ["PROJECT", "hookspec", "hookimpl", "REGISTRATION_HOOKS", "EVENT_HOOKS"]

PROJECT = "quanta"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: registration hook name -> plugin kind it contributes (from the one table of kinds).
REGISTRATION_HOOKS = {kind.hook: kind.name for kind in KINDS.values()}
#: The event hooks (1:N broadcasts; a failing implementation is skipped with a warning).
EVENT_HOOKS = ("run_started", "layer_quantized", "run_finished")


@hookspec
def register_schemes(register):
    """Contribute quantization schemes.

    Args:
        register: call ``register(scheme)`` once per scheme: an instance of a subclass of
            ``quanta.contracts.Scheme`` (the contract: required and optional methods).

    Returns nothing. Fires once, when the registry first loads this plugin.
    """


@hookspec
def register_observers(register):
    """Contribute observers (range finders): ``register(observer)``, an instance of a subclass of ``quanta.contracts.Observer``.

    Returns nothing. Fires once, when the registry first loads this plugin.
    """


@hookspec
def register_algorithms(register):
    """Contribute algorithms (whole-model transforms): ``register(algorithm)``, an instance of a subclass of ``quanta.contracts.Algorithm``.

    Returns nothing. Fires once, when the registry first loads this plugin.
    """


@hookspec
def register_backends(register):
    """Contribute backends (model representations): ``register(backend)``, an instance of a subclass of ``quanta.contracts.Backend``.

    Returns nothing. Fires once, when the registry first loads this plugin.
    """


@hookspec
def register_exporters(register):
    """Contribute exporters (file formats): ``register(exporter)``, an instance of a subclass of ``quanta.contracts.Exporter``.

    Returns nothing. Fires once, when the registry first loads this plugin.
    """


@hookspec
def run_started(algorithm, plan):
    """Broadcast when ``quanta.quantize`` starts, after the plan is validated.

    Args:
        algorithm: the algorithm's registered name.
        plan: the ``quanta.Plan`` (``plan.selected`` lists the layers to be quantized).

    Return values are ignored.
    """


@hookspec
def layer_quantized(name, record, stats):
    """Broadcast each time a layer's weight has been quantized and written back.

    Args:
        name: the layer name, e.g. ``"encoder.layer.0.attention.self.query"``.
        record: the ``QuantizedWeight`` stored for it.
        stats: the layer's ``LayerReport`` (spec, relative error, bytes, index and total).

    Return values are ignored. Progress displays implement this hook.
    """


@hookspec
def run_finished(report):
    """Broadcast when ``quanta.quantize`` has finished successfully with its ``Report``.

    Return values are ignored.
    """
