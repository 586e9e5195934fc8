"""Activation options shared by the ``qat`` and ``calibrate`` configs, and the session factory."""

from __future__ import annotations

from typing import Any

import attrs

from quanta.errors import ConfigError, PluginNotFoundError

from .observers import streaming_observer
from .session import (
    ACTIVATION_SITES,
    UNTRACEABLE_MODES,
    ActivationOptions,
    ActivationSession,
    parse_activation_dtype,
    unit_for,
)

__all__ = ["activation_dtype_field", "activation_scheme_field", "activation_observer_field", "relu_activation_scheme_field",
           "averaging_constant_field", "activation_sites_field", "untraceable_field", "make_session"]


def _check_dtype(_inst, attribute, value):
    try:
        parse_activation_dtype(value)
    except ConfigError as exc:
        raise ConfigError(exc.detail, attribute.name) from None


def _check_name(_inst, attribute, value):
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"expected a plugin name, got {value!r}", attribute.name)


def _check_constant(_inst, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ConfigError(f"must be a number in (0, 1], got {value!r}", attribute.name)


def _check_untraceable(_inst, attribute, value):
    if value not in UNTRACEABLE_MODES:
        raise ConfigError(f"expected one of {', '.join(UNTRACEABLE_MODES)}, got {value!r}", attribute.name)


def activation_dtype_field(default: str):
    return attrs.field(default=default, validator=_check_dtype, metadata={
        "doc": "activation dtype: 'int8', 'uint8' (also torch.qint8/quint8), or 'float32' for weight-only"})


def activation_scheme_field():
    return attrs.field(default=None, validator=_check_name, metadata={
        "doc": "scheme plugin for activations ('symmetric', 'affine'); null: the global_config's scheme "
               "(coremltools' quantization_scheme applies to both)"})


def relu_activation_scheme_field():
    return attrs.field(default=None, validator=_check_name, metadata={
        "doc": "scheme plugin for the outputs of ReLU/ReLU6 (never negative); null: activation_scheme. "
               "coremltools quantizes them 'affine' even when its scheme is symmetric (all 256 uint8 codes)"})


def activation_observer_field(default: str):
    return attrs.field(default=default, validator=_check_name, metadata={
        "doc": "observer plugin with a streaming form for activations: 'minmax' or 'moving_average_minmax'"})


def averaging_constant_field():
    return attrs.field(default=0.01, validator=_check_constant, metadata={
        "doc": "moving_average_minmax: weight of each new batch's range, in (0, 1]"})


def _check_sites(_inst, attribute, value):
    if value not in ACTIVATION_SITES:
        raise ConfigError(f"expected one of {', '.join(ACTIVATION_SITES)}, got {value!r}", attribute.name)


def activation_sites_field():
    return attrs.field(default="inputs_and_outputs", validator=_check_sites, metadata={
        "doc": "where activations are quantized: 'inputs_and_outputs' (every quantized op's inputs and output, "
               "as the backend's rules place them) or 'weighted_inputs' (inputs of Linear/Conv only, as "
               "SmoothQuant-style W8A8 for transformers: outputs, residual adds and matmuls stay float)"})


def untraceable_field(default: str):
    return attrs.field(default=default, validator=_check_untraceable, metadata={
        "doc": "when the model's forward does not trace: 'error' (raise, naming the module) or 'submodules' "
               "(trace the largest submodules that do, keep the rest as float Python code)"})


def _check_plugin(kind: str, name: str, key: str) -> None:
    from quanta import registry

    try:
        registry.get(kind, name)
    except PluginNotFoundError as exc:
        raise ConfigError(str(exc), key) from None


def make_session(model, plan, recipe, backend, config: Any, milestones=None, context=None) -> ActivationSession:
    """Build an :class:`ActivationSession` from an algorithm config; validates names first.

    With a ``context`` (``quanta._run.pipeline.RunContext``), each record is written through
    ``context.write_layer`` (report rows and ``layer_quantized`` events), and ``prepare``
    notes the parts left float in ``context.report``.
    """
    dtype = parse_activation_dtype(config.activation_dtype)
    scheme = config.activation_scheme
    if scheme is None:
        scheme = recipe.global_config.scheme if recipe.global_config is not None else "symmetric"
    _check_plugin("scheme", scheme, "activation_scheme")
    _check_plugin("observer", config.activation_observer, "activation_observer")
    if getattr(config, "relu_activation_scheme", None) is not None:
        _check_plugin("scheme", config.relu_activation_scheme, "relu_activation_scheme")
    if dtype is not None:
        streaming_observer(config.activation_observer)  # raises ConfigError if it cannot stream
    options = ActivationOptions(dtype=dtype, scheme=scheme, observer=config.activation_observer,
                                averaging_constant=config.averaging_constant, milestones=milestones,
                                untraceable=getattr(config, "untraceable", "error"),
                                sites=getattr(config, "activation_sites", "inputs_and_outputs"),
                                learnable=bool(getattr(config, "learnable", False)),
                                float_modules=tuple(getattr(config, "float_activation_modules", ()) or ()),
                                example_run=getattr(config, "example_run", "required"),
                                unobserved=getattr(config, "unobserved_activations", "error"),
                                nonnegative_scheme=getattr(config, "relu_activation_scheme", None))
    on_record = None
    if context is not None:
        layers = {p.unit.name: p for p in plan.layers}

        def on_record(name, module, record, float_weight):
            layer = layers[name]
            layer = attrs.evolve(layer, unit=unit_for(name, module, plan))
            context.write_layer(module, layer, record, float_weight)

    report = context.report if context is not None else None
    return ActivationSession(model, plan, recipe, backend, options, on_record=on_record, report=report)

