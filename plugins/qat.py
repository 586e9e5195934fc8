"""Algorithm ``qat``: FX-based quantization-aware training (W8A8 fake quantization with milestones).

Drive it with ``quanta.Quantizer(model, config)``: ``prepare(example_inputs)`` → your training
loop calling ``step()`` → ``finalize()``. See ``docs/activation-quantization.md``.
"""

from __future__ import annotations

from typing import Any

import attrs

import quanta
from quanta.errors import ConfigError, QuantizationError
from quanta.contracts import Algorithm
from quanta.fx.milestones import check_milestones
from quanta.fx.options import (
    activation_dtype_field,
    activation_observer_field,
    activation_scheme_field,
    activation_sites_field,
    averaging_constant_field,
    make_session,
    relu_activation_scheme_field,
    untraceable_field,
)

__all__ = ["QATConfig", "QAT"]


def _milestones(value: Any) -> Any:
    return None if value is None else list(value) if isinstance(value, tuple) else value


def _check(_inst, _attribute, value) -> None:
    check_milestones(value, "milestones")


def _check_bool(_inst, attribute, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"expected true or false, got {value!r}", attribute.name)


def _one_of(*allowed: str) -> Any:
    def check(_inst, attribute, value) -> None:
        if value not in allowed:
            raise ConfigError(f"expected one of {', '.join(allowed)}, got {value!r}", attribute.name)

    return check


def _names(value: Any) -> list:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or \
            not all(isinstance(v, str) for v in value):
        raise ConfigError(f"expected a list of module names or patterns, got {value!r}", "float_activation_modules")
    return list(value)


@attrs.frozen(kw_only=True)
class QATConfig:
    """Options of ``qat`` (recipe top level or inside ``global_config``, as coremltools writes them)."""

    milestones: list | None = attrs.field(default=None, converter=_milestones, validator=_check, metadata={
        "doc": "[observers_on, fake_quant_on, observers_off, bn_frozen] in step() calls; the k-th step() "
               "applies every milestone <= k; null: observers and fake quantization on from prepare()"})
    activation_dtype: str = activation_dtype_field("int8")
    activation_scheme: str | None = activation_scheme_field()
    activation_observer: str = activation_observer_field("moving_average_minmax")
    averaging_constant: float = averaging_constant_field()
    activation_sites: str = activation_sites_field()
    # Training usually comes with a model one can edit: by default an untraceable forward is
    # an error naming the module, not a silently float region.
    untraceable: str = untraceable_field("error")
    learnable: bool = attrs.field(default=False, validator=_check_bool, metadata={
        "doc": "learn the scales and zero points (LSQ, coremltools' algorithm 'learnable'): set from the "
               "observed ranges while observers are on, trained by the gradient afterwards"})
    float_activation_modules: list = attrs.field(factory=list, converter=_names, metadata={
        "doc": "module names or patterns whose inputs and outputs stay float (their weights are still "
               "quantized; coremltools' per-module activation_dtype: float32)"})
    example_run: str = attrs.field(default="required", validator=_one_of("required", "optional"), metadata={
        "doc": "'required': prepare() runs example_inputs once (shapes, dtypes) and a model that fails on "
               "them is an error; 'optional': it warns and places activation quantizers from the graph alone "
               "(coremltools' prepare does not run the example)"})
    relu_activation_scheme: str | None = relu_activation_scheme_field()
    unobserved_activations: str = attrs.field(default="error", validator=_one_of("error", "default"), metadata={
        "doc": "finalize() with an activation that never saw data: 'error', or 'default': warn and use "
               "scale 1.0, zero point 0 (torch.ao's and so coremltools' behaviour)"})


class QAT(Algorithm):
    """Fake-quantizes weights and activations in a traced graph for training; ``finalize`` gives
    quanta weight records and quantize/dequantize activation pairs."""

    name = "qat"
    description = "quantization-aware training: torch.fx fake quantization of weights and activations, milestones"
    config_class = QATConfig
    needs_data = False
    backends = frozenset({"torch"})  # walks torch modules itself: refused at plan time on other backends
    training_loop = True
    #: The weights the torch.fx session quantizes (its rules' weighted modules): an Embedding or
    #: ConvTranspose under global_config would be planned and then silently left float.
    global_types = {"torch": ("Linear", "Conv1d", "Conv2d", "Conv3d")}

    def session(self, model, plan, recipe, backend, context=None) -> Any:
        """An ActivationSession for ``quanta.Quantizer`` (prepare / step / finalize)."""
        config = self.config
        milestones = check_milestones(config.milestones)
        return make_session(model, plan, recipe, backend, config, milestones=milestones, context=context)

    def run(self, model, plan, data, context) -> None:
        raise QuantizationError("algorithm 'qat' needs your training loop: use quanta.Quantizer(model, config) "
                                "with prepare(example_inputs=...), step() per training step and finalize(); "
                                "for one-shot W8A8 from calibration data use algorithm 'calibrate'")


@quanta.hookimpl
def register_algorithms(register) -> None:
    register(QAT())
