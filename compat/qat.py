"""coremltools' ``LinearQuantizer`` names over ``quanta.Quantizer`` (algorithm ``qat``).

The seed's calibration recipe (milestones ``[0, 1000, 1000, 0]``, one ``step()``, forwards
under no_grad, ``finalize()``) and its QAT YAML work unchanged::

    config = LinearQuantizerConfig.from_yaml("config.yaml")
    quantizer = LinearQuantizer(model, config)
    model = quantizer.prepare(example_inputs=torch.rand(1, 1, 20, 20), inplace=True)
    ...  # training loop calling quantizer.step()
    model = quantizer.finalize(inplace=True)

Defaults follow coremltools: symmetric int8 per-channel weights, ``quint8`` activations with
``moving_average_min_max`` observers. Weight observers always take the current weight's range
(``weight_observer`` is accepted for compatibility).
"""

from __future__ import annotations

from typing import Any

import quanta
from quanta.compat.configs import LinearQuantizerConfig, ModuleLinearQuantizerConfig, ObserverType
from quanta.compat.convert import annotate_for_coreml
from quanta.compat.ptq import as_config
from quanta.compat.recipes import qat_recipe

__all__ = ["ModuleLinearQuantizerConfig", "LinearQuantizerConfig", "LinearQuantizer", "ObserverType"]


class LinearQuantizer:
    """``LinearQuantizer(model, config)``: ``prepare(example_inputs, inplace)``, ``step()``,
    ``finalize(model=None, inplace=False)``, as in coremltools; built on ``quanta.Quantizer``."""

    def __init__(self, model, config: LinearQuantizerConfig | dict | None = None):
        self._config = as_config(config, LinearQuantizerConfig)
        self._model = model
        self._quantizer = quanta.Quantizer(model, qat_recipe(self._config))
        self._result = None
        self._observer_sync = True

    def prepare(self, example_inputs: Any = None, inplace: bool = False):
        """Returns the fake-quant ``torch.fx.GraphModule`` (a copy unless ``inplace``).

        ``inplace=True``: the model passed in shares the prepared model's parameters, and calling
        it runs the prepared model, so coremltools' documented calibration loop (``model(data)``
        after ``prepare(..., inplace=True)``, return value unused) feeds the observers.
        """
        prepared = self._quantizer.prepare(example_inputs=example_inputs, inplace=inplace)
        if inplace and prepared is not self._model:
            # An instance attribute wins over the class's forward in nn.Module.__call__; fx tracing
            # uses type(model).forward, so the model can still be prepared again.
            object.__setattr__(self._model, "forward", prepared.forward)
        return prepared

    def step(self) -> None:
        """One training step: applies the milestones reached."""
        self._quantizer.step()

    def finalize(self, model=None, inplace: bool = False):
        """The quantized model: quanta weight records and quantize/dequantize activations, annotated so
        that plain ``ct.convert(torch.jit.trace(model, x), minimum_deployment_target=ct.target.iOS17)``
        stores int8 weights (``constexpr_affine_dequantize``); warns naming the minimum target and
        sets ``model.coreml_minimum_deployment_target``."""
        self._result = self._quantizer.finalize(model, inplace=inplace)
        activations = self._config_activations()
        return annotate_for_coreml(self._result, activation_quantization=activations)

    def _config_activations(self) -> bool:
        return qat_recipe(self._config)["algorithm_config"]["activation_dtype"] != "float32"

    def enable_observer_sync(self) -> None:
        """coremltools synchronises its custom observers' statistics across GPUs when training with
        several processes; quanta's observers are per process (nothing is synchronised), so this
        only records the setting (``observer_sync``), which is what it changes in a single process."""
        self._observer_sync = True

    def disable_observer_sync(self) -> None:
        """The counterpart of :meth:`enable_observer_sync` (records the setting)."""
        self._observer_sync = False

    @property
    def observer_sync(self) -> bool:
        """Whether observer synchronisation is requested (see :meth:`enable_observer_sync`)."""
        return self._observer_sync

    @property
    def minimum_deployment_target(self):
        """The lowest ``ct.target`` that stores the last ``finalize()``'s weights compressed (or None)."""
        return getattr(self._result, "coreml_minimum_deployment_target", None)

    def report(self):
        """The quanta :class:`~quanta.Report` of the last ``finalize()``."""
        return self._quantizer.report
