"""The former compat ``LinearQuantizer``: quanta's own ``qat`` graph (``quanta.fx``) under coremltools'
names. compat's ``LinearQuantizer`` prepares with torch.ao instead (as coremltools does); this one
stays reachable as ``LinearQuantizer(model, config, _torch_ao=False)`` (quanta records, plugins and
report all the way through training)."""

from __future__ import annotations

import warnings
from typing import Any

import quanta
from quanta.errors import did_you_mean
from quanta.compat._qat_common import _LinearQuantizerCommon
from quanta.compat.configs import ModuleLinearQuantizerConfig, LinearQuantizerConfig
from quanta.compat.convert import annotate_for_coreml
from quanta.compat.ptq import as_config
from quanta.compat.recipes import effective_global, qat_recipe

__all__ = ["_QuantaLinearQuantizer"]

class _QuantaLinearQuantizer(_LinearQuantizerCommon):
    """The former compat ``LinearQuantizer`` (quanta's own ``qat`` graph), kept behind
    ``LinearQuantizer(..., _torch_ao=False)``: ``prepare``, ``step``, ``finalize`` on ``quanta.Quantizer``."""

    def __init__(self, model, config: LinearQuantizerConfig | dict | None = None):
        self._config = as_config(config, LinearQuantizerConfig)
        self._model = model
        self._quantizer = quanta.Quantizer(model, _recipe_for(model, self._config))
        self._result = None
        self._prepared = None
        self._observer_sync = True

    @property
    def _quantization_scheme(self):
        """coremltools' ``QuantizationScheme`` of the quantizer (the effective global config's)."""
        glob = effective_global(self._config) or ModuleLinearQuantizerConfig()
        return glob.quantization_scheme

    def prepare(self, example_inputs: Any = None, inplace: bool = False):
        """Returns the fake-quant ``torch.fx.GraphModule`` (a copy unless ``inplace``).

        ``inplace=True``: the model passed in shares the prepared model's parameters, and calling
        it runs the prepared model, so coremltools' documented calibration loop (``model(data)``
        after ``prepare(..., inplace=True)``, return value unused) feeds the observers.
        """
        prepared = self._quantizer.prepare(example_inputs=example_inputs, inplace=inplace)
        _torch_ao_names(prepared)
        _copy_attributes(self._model, prepared, self._config.preserved_attributes)
        self._prepared = prepared
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
        source = model if model is not None else self._prepared
        if source is not None:
            _copy_attributes(source, self._result, self._config.preserved_attributes)
        activations = self._config_activations()
        return annotate_for_coreml(self._result, activation_quantization=activations)

    def _config_activations(self) -> bool:
        return str(self._quantizer.recipe.algorithm_config.activation_dtype) != "float32"

    def enable_observer_sync(self) -> None:
        """coremltools synchronises its custom observers' statistics across GPUs when training with
        several processes; quanta's observers are per process (nothing is synchronised), so this
        only records the setting (``observer_sync``), which is what it changes in a single process."""
        self._observer_sync = True

    def disable_observer_sync(self) -> None:
        """The counterpart of :meth:`enable_observer_sync` (records the setting)."""
        self._observer_sync = False

    def report(self):
        """The quanta :class:`~quanta.Report` of the last ``finalize()``."""
        return self._quantizer.report


def _recipe_for(model, config) -> dict:
    """The ``qat`` recipe of ``config`` for ``model``, with coremltools' leniency: module names that
    are not in the model are ignored (with a warning), prepare() does not need the example input
    to run, and finalize() without calibration data uses torch.ao's default activation qparams."""
    recipe = qat_recipe(config, model)
    present = {n for n, _ in model.named_modules()}
    names = recipe.get("module_name_configs", {})
    missing = [n for n in names if n not in present]
    if missing:
        hints = "".join(did_you_mean(n, sorted(present - {""})) for n in missing)
        warnings.warn(f"module_name_configs {missing} name no module of the model; ignored (as coremltools "
                      f"does){hints}", stacklevel=3)
        recipe["module_name_configs"] = {k: v for k, v in names.items() if k in present}
    options = recipe["algorithm_config"]
    if options.get("float_activation_modules"):
        options["float_activation_modules"] = [n for n in options["float_activation_modules"] if n in present]
    # coremltools quantizes the outputs of ReLU/ReLU6 affine whatever its quantization_scheme (all 256 codes)
    options.update(example_run="optional", unobserved_activations="default", relu_activation_scheme="affine")
    return recipe


def _copy_attributes(source, target, names) -> None:
    """coremltools' ``preserved_attributes``: copy these attributes of ``source`` onto ``target``."""
    for name in names or ():
        if hasattr(source, name) and target is not source:
            setattr(target, name, getattr(source, name))


def _torch_ao_names(prepared) -> None:
    """Name the activation quantizers of a prepared GraphModule ``activation_post_process_N`` in graph
    order, as torch.ao's (and so coremltools') prepared models name their observers; code that
    reaches them by name (``model.activation_post_process_0.observer_enabled``) keeps working."""
    from torch import fx

    from quanta.fx import ActivationFakeQuantize

    if not isinstance(prepared, fx.GraphModule):
        return
    taken = {n for n, _ in prepared.named_children()}
    index = 0
    for node in prepared.graph.nodes:
        if node.op != "call_module" or "." in node.target:
            continue
        module = prepared.get_submodule(node.target)
        if not isinstance(module, ActivationFakeQuantize):
            continue
        while f"activation_post_process_{index}" in taken:
            index += 1
        name = f"activation_post_process_{index}"
        delattr(prepared, node.target)
        prepared.add_submodule(name, module)
        taken.add(name)
        node.target = name
    prepared.recompile()
