"""coremltools' ``LinearQuantizer``: prepared with torch.ao, as coremltools prepares it.

The seed's calibration recipe (milestones ``[0, 1000, 1000, 0]``, one ``step()``, forwards
under no_grad, ``finalize()``) and its QAT YAML work unchanged::

    config = LinearQuantizerConfig.from_yaml("config.yaml")
    quantizer = LinearQuantizer(model, config)
    model = quantizer.prepare(example_inputs=torch.rand(1, 1, 20, 20), inplace=True)
    ...  # training loop calling quantizer.step()
    model = quantizer.finalize(inplace=True)

Defaults follow coremltools: symmetric int8 per-channel weights, ``quint8`` activations with
``moving_average_min_max`` observers.

``prepare`` runs torch.ao's public ``prepare_qat_fx`` with quanta's own ``QConfigMapping`` and
``BackendConfig`` mirroring coremltools' (:mod:`quanta.compat._ao_qconfig`,
:mod:`quanta.compat._ao_backend`) and coremltools' graph passes (:mod:`quanta.compat._ao_prepare`),
so the prepared model has torch.ao's structure (``FakeQuantize`` modules, ``ConvReLU2d`` /
``LinearReLU`` QAT modules, ``activation_post_process_N`` numbering). ``finalize`` converts with
torch.ao's ``convert_to_reference_fx`` and records every quantized weight as a quanta record
(:mod:`quanta.compat._ao_finalize`), annotated for ``ct.convert``.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from quanta.compat._qat_common import _LinearQuantizerCommon
from quanta.compat.configs import LinearQuantizerConfig, ModuleLinearQuantizerConfig, ObserverType
from quanta.compat.convert import annotate_for_coreml
from quanta.compat.ptq import as_config
from quanta.compat.recipes import effective_global

__all__ = ["ModuleLinearQuantizerConfig", "LinearQuantizerConfig", "LinearQuantizer", "ObserverType"]



_logger = logging.getLogger(__name__)


def _example_tuple(example_inputs: Any) -> tuple:
    """coremltools takes a tuple of positional inputs; quanta also a tensor or a shape list."""
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)) and example_inputs and all(
            isinstance(x, int) and not isinstance(x, bool) for x in example_inputs):
        return (torch.rand(*example_inputs),)
    return tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)


class LinearQuantizer(_LinearQuantizerCommon):
    """``LinearQuantizer(model, config)``: ``prepare(example_inputs, inplace)``, ``step()``,
    ``finalize(model=None, inplace=False)``, ``report()``, as in coremltools (torch.ao's prepared and
    reference-converted structure; quanta records on the finalized weights).

    ``_torch_ao=False`` (internal) keeps the former path: quanta's own ``qat`` graph.
    """

    def __new__(cls, model=None, config=None, _torch_ao: bool = True):
        if not _torch_ao:
            from quanta.compat._qat_quanta import _QuantaLinearQuantizer

            return _QuantaLinearQuantizer(model, config)
        return super().__new__(cls)

    def __init__(self, model: nn.Module, config: LinearQuantizerConfig | dict | None = None, _torch_ao: bool = True):
        from quanta.compat._ao_qconfig import qconfig_mapping

        self._config = as_config(config, LinearQuantizerConfig)
        self._model = model
        self._original = model
        glob = effective_global(self._config) or ModuleLinearQuantizerConfig()
        self._global = glob
        self._milestones = glob.milestones
        present = {n for n, _ in model.named_modules()}
        missing = [n for n in self._config.module_name_configs if n not in present]
        if missing:
            from quanta.errors import did_you_mean
            import warnings

            hints = "".join(did_you_mean(n, sorted(present - {""})) for n in missing)
            warnings.warn(f"module_name_configs {missing} name no module of the model; ignored (as coremltools "
                          f"does){hints}", stacklevel=2)
        self._qconfig_mapping = qconfig_mapping(model, self._config, glob)
        self._is_prepared = False
        self._step_count = 0
        self._observer_sync = True
        self._result = None

    @property
    def _quantization_scheme(self):
        """coremltools' ``QuantizationScheme`` of the quantizer (the effective global config's)."""
        return self._global.quantization_scheme

    def prepare(self, example_inputs: Any = None, inplace: bool = False):
        """Insert torch.ao fake quantizers (``prepare_qat_fx``); returns the ``torch.fx.GraphModule``
        (a copy of the model unless ``inplace``). With milestones, observers and fake quantization
        start off (``step()`` turns them on)."""
        from quanta.compat._ao_backend import backend_config
        from quanta.compat._ao_prepare import prepare_qat

        if self._is_prepared:
            _logger.warning("Model has already been prepared for QAT. This API call will be a no-op.")
            return self._model
        model = self._model if inplace else copy.deepcopy(self._model)
        model.train()
        scheme = str(getattr(self._quantization_scheme, "value", self._quantization_scheme))
        prepared = prepare_qat(model, _example_tuple(example_inputs), self._qconfig_mapping, backend_config(), scheme,
                               self._config.non_traceable_module_names, self._config.preserved_attributes)
        _copy_attributes(self._original, prepared, self._config.preserved_attributes)
        if self._milestones is not None:
            prepared.apply(torch.ao.quantization.disable_observer)
            prepared.apply(torch.ao.quantization.disable_fake_quant)
        if inplace and prepared is not self._original:
            # An instance attribute wins over the class's forward in nn.Module.__call__: calling the
            # user's model (coremltools' documented calibration loop) runs the prepared one.
            object.__setattr__(self._original, "forward", prepared.forward)
        self._model = prepared
        self._is_prepared = True
        return prepared

    def step(self) -> None:
        """One training step: milestone 0 turns observers on, 1 fake quantization on, 2 observers
        off, 3 freezes batch-norm statistics (``-1``: never; ``milestones=None``: a no-op)."""
        if not self._is_prepared:
            _logger.warning("Model has not been prepared for QAT. This API call will be a no-op.")
            return
        if self._milestones is None:
            return
        m = list(self._milestones)
        if self._step_count == m[0]:
            self._model.apply(torch.ao.quantization.enable_observer)
        if self._step_count == m[1]:
            self._model.apply(torch.ao.quantization.enable_fake_quant)
        if self._step_count == m[2]:
            self._model.apply(torch.ao.quantization.disable_observer)
        if self._step_count == m[3]:
            self._model.apply(_freeze_bn_stats)
        self._step_count += 1

    def finalize(self, model: nn.Module | None = None, inplace: bool = False):
        """torch.ao's reference-converted model (``convert_to_reference_fx``, as coremltools), each
        quantized weight a quanta record with the trained scale/zero point, annotated so that plain
        ``ct.convert(torch.jit.trace(model, x), minimum_deployment_target=...)`` stores compressed
        weights (warns naming the minimum target; ``model.coreml_minimum_deployment_target``)."""
        from quanta.compat._ao_backend import backend_config
        from quanta.compat._ao_finalize import convert, record_weights, weight_quantizers

        if not self._is_prepared:
            _logger.warning("Model has not been prepared for QAT. This API call will be a no-op.")
            return self._model
        source = model if model is not None else self._model
        target = source if inplace else copy.deepcopy(source)
        quantizers = weight_quantizers(target)
        converted = convert(target, self._qconfig_mapping, backend_config(), self._config.preserved_attributes)
        record_weights(converted, quantizers)
        _copy_attributes(source, converted, self._config.preserved_attributes)
        activations = self._global.activation_dtype != torch.float32
        self._result = annotate_for_coreml(converted, activation_quantization=activations)
        _zero_point_metadata(self._result)
        return self._result

    def _set_observer_sync(self, on: bool) -> None:
        from quanta.compat._ao_prepare import is_activation_quantizer

        self._observer_sync = on
        if not self._is_prepared:
            return
        for name, module in self._model.named_modules():
            fq = getattr(module, "weight_fake_quant", None)
            if fq is not None and hasattr(getattr(fq, "activation_post_process", None), "synchronize"):
                fq.activation_post_process.synchronize = on
            elif (not name.endswith(".weight_fake_quant") and is_activation_quantizer(module)
                  and hasattr(getattr(module, "activation_post_process", None), "synchronize")):
                module.activation_post_process.synchronize = on

    def enable_observer_sync(self) -> None:
        """Synchronise ``ema_min_max`` observers' min/max across processes (torch.distributed), the default."""
        self._set_observer_sync(True)

    def disable_observer_sync(self) -> None:
        """Stop synchronising ``ema_min_max`` observers (e.g. validating on one process)."""
        self._set_observer_sync(False)

    def report(self) -> dict:
        """coremltools' report: ``{name: {type, algorithm, qscheme, per_channel, dtype, qmin, qmax,
        error, #params, device}}`` for each weight and activation quantizer of the prepared model."""
        from quanta.compat._ao_report import report

        return report(self._model)


def _freeze_bn_stats(module: nn.Module) -> None:
    """torch.ao's QAT conv+bn modules (and quanta's ConvBnAct, built on them) stop updating bn statistics."""
    if hasattr(module, "bn") and callable(getattr(module, "freeze_bn_stats", None)):
        module.freeze_bn_stats()


def _zero_point_metadata(model: nn.Module) -> None:
    """The weight metadata in coremltools' form: scale and zero point ``[channels, 1]`` (axis 0) or
    ``[1, channels]`` (axis 1, ConvTranspose), the zero point also when it is 0 (symmetric)."""
    for module in model.modules():
        if "_COREML_/weight/quantization_scale" not in module._buffers or not hasattr(module, "weight_scale"):
            continue
        axis = int(getattr(module, "weight_axis_int", 0))
        for key, value in (("quantization_scale", module.weight_scale), ("zero_point", module.weight_zero_point)):
            value = value.detach().clone().reshape(-1).unsqueeze(-1)
            module.register_buffer(f"_COREML_/weight/{key}", value if axis == 0 else value.transpose(1, 0))


def _copy_attributes(source, target, names) -> None:
    """coremltools' ``preserved_attributes``: copy these attributes of ``source`` onto ``target``."""
    for name in names or ():
        if hasattr(source, name) and target is not source:
            setattr(target, name, getattr(source, name))
