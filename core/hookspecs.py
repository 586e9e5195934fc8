"""The plugin contracts: pluggy hook specifications of the ``quanta`` project.

Registration hooks (one per plugin kind) receive a ``register`` callback; event hooks are
1:N broadcasts named ``<phase>_<event>``. Plugins write ``@quanta.hookimpl``.
"""

from __future__ import annotations

import pluggy

__all__ = ["PROJECT", "hookspec", "hookimpl", "REGISTRATION_HOOKS"]

PROJECT = "quanta"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: registration hook name -> plugin kind it contributes.
REGISTRATION_HOOKS = {
    "register_schemes": "scheme",
    "register_observers": "observer",
    "register_algorithms": "algorithm",
    "register_backends": "backend",
    "register_exporters": "exporter",
}


@hookspec
def register_schemes(register):
    """Contribute quantization schemes.

    Args:
        register: call ``register(scheme)`` once per scheme. A scheme has ``name``,
            ``description``, ``config_class`` (attrs class or None) and the methods
            ``quant_range(dtype)``, ``qparams(min_val, max_val, dtype)``,
            ``quantize(values, scale, zero_point, dtype)`` and ``dequantize(codes, scale, zero_point)``
            (see ``quanta.plugin.Scheme``).

    Returns nothing. Fires once, when the registry first loads this plugin.
    """


@hookspec
def register_observers(register):
    """Contribute observers (range finders): ``register(observer)``, see ``quanta.plugin.Observer``.

    Returns nothing. Fires once, when the registry first loads this plugin.
    """


@hookspec
def register_algorithms(register):
    """Contribute algorithms (whole-model transforms): ``register(algorithm)``, see ``quanta.plugin.Algorithm``.

    Returns nothing. Fires once, when the registry first loads this plugin.
    """


@hookspec
def register_backends(register):
    """Contribute backends (model representations): ``register(backend)``, see ``quanta.plugin.Backend``.

    Returns nothing. Fires once, when the registry first loads this plugin.
    """


@hookspec
def register_exporters(register):
    """Contribute exporters (file formats): ``register(exporter)``, see ``quanta.plugin.Exporter``.

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
