"""``quanta.Quantizer``: prepare / step / finalize for algorithms that live inside a training loop.

::

    quantizer = quanta.Quantizer(model, {"global_config": {"milestones": [0, 100, 400, 200]}})
    qat_model = quantizer.prepare(example_inputs=torch.rand(1, 1, 28, 28))
    for x, y in data:
        loss = loss_fn(qat_model(x), y); loss.backward(); opt.step(); opt.zero_grad()
        quantizer.step()
    quantized = quantizer.finalize()

The algorithm (default ``qat``; also ``calibrate``) is looked up in the registry; it must
declare ``training_loop = True`` and implement ``session(model, plan, recipe, backend, context)``
returning an object with ``prepare(example_inputs, inplace)``, ``step()`` and
``finalize(model, inplace)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from quanta._recipes.recipe import Recipe, load_recipe
from quanta._recipes.yaml_reader import read_yaml_mapping
from quanta.errors import ConfigError, QuantizationError
from quanta._run.context import RunContext
from quanta._run.guard import plugin_code
from quanta._run.pipeline import build_stage_plan, choose_backend
from quanta._run.report import Report

__all__ = ["Quantizer"]

DEFAULT_ALGORITHM = "qat"


def _recipe(config: Any, algorithm: str | None) -> Recipe:
    if isinstance(config, (str, os.PathLike)):
        config = read_yaml_mapping(config)  # the one strict reader: duplicate keys refused, as quantize does
    if config is None or isinstance(config, Mapping):
        # As coremltools' LinearQuantizerConfig: without a global_config every supported layer
        # gets the default spec, and module_name_configs/module_type_configs refine it.
        config = {"global_config": {}, **(config or {})}
    return load_recipe(config, algorithm=algorithm, default_algorithm=DEFAULT_ALGORITHM)


class Quantizer:
    """Quantize ``model`` with an algorithm that runs inside your loop (``qat``, ``calibrate``).

    Args:
        model: a float ``torch.nn.Module``.
        config: recipe dict, YAML path or Recipe (``algorithm`` defaults to ``qat``); the
            coremltools ``LinearQuantizerConfig`` YAML shape is accepted unchanged.
        algorithm: overrides the recipe's algorithm.
        backend: backend plugin name (default: the one that accepts ``model``).

    Everything (keys, milestones, plugin names, module names) is validated here, before the
    model is touched.
    """

    def __init__(self, model, config: Any = None, *, algorithm: str | None = None, backend: str | None = None):
        from quanta import registry

        self.recipe = _recipe(config, algorithm)
        if self.recipe.stages:
            raise ConfigError("quanta.Quantizer runs one training-loop algorithm; recipes with stages run through "
                              "quanta.quantize()", "stages")
        entry = registry.get("algorithm", self.recipe.algorithm)
        if not entry.obj.training_loop:
            usable = [e.name for e in registry.entries("algorithm") if e.obj.training_loop]
            raise ConfigError(f"algorithm {self.recipe.algorithm!r} does not run inside a training loop; use "
                              f"quanta.quantize() for it (Quantizer algorithms: {', '.join(usable)})", "algorithm")
        algorithm = entry.obj if self.recipe.algorithm_config is None else entry.obj.with_config(self.recipe.algorithm_config)
        backend_entry = choose_backend(model, backend)
        self.plan = build_stage_plan(model, self.recipe, backend_entry, self.recipe.export)
        self.report = Report(algorithm=self.recipe.algorithm,
                             skipped=[(p.name, p.reason) for p in self.plan.layers if p.spec is None])
        self._context = RunContext(recipe=self.recipe, plan=self.plan, backend=backend_entry.obj, report=self.report,
                                   algorithm=algorithm)
        self._algorithm = algorithm
        with plugin_code(algorithm):
            self._session = algorithm.session(model, self.plan, self.recipe, backend_entry.obj, context=self._context)
        self._model = model
        self._prepared = None

    @property
    def step_count(self) -> int:
        """How many times ``step()`` has been called."""
        return self._session.steps

    def prepare(self, example_inputs: Any = None, inplace: bool = False):
        """Trace and rewrite the model for training/calibration; returns a ``torch.fx.GraphModule``.

        ``example_inputs``: a tensor, a tuple of tensors (positional), a dict of tensors
        (keywords, called as ``model(**example_inputs)``: a Hugging Face tokenizer's output),
        or a shape list such as ``[1, 3, 224, 224]``. ``inplace=True`` shares the model's
        Parameters; otherwise a copy is prepared. When the model's forward does not trace and
        the algorithm's ``untraceable`` is ``submodules``, the result is the model itself with
        its traceable submodules replaced by prepared GraphModules (see
        ``docs/activation-quantization.md``).
        """
        with plugin_code(self._algorithm):
            self._prepared = self._session.prepare(example_inputs=example_inputs, inplace=inplace)
        return self._prepared

    def step(self) -> None:
        """Call once per training step: applies the milestones reached (see the docs)."""
        with plugin_code(self._algorithm):
            self._session.step()

    def finalize(self, model=None, inplace: bool = False):
        """The quantized model (weights as quanta records, activations as quantize/dequantize pairs):
        a GraphModule, or after a partial trace the model whose traced parts are in that form.

        ``model``: the prepared model to finalize (default: the one ``prepare`` returned).
        ``inplace``: rewrite it instead of a copy. ``result.quanta_report`` lists the layers.
        """
        if self._prepared is None and model is None:
            raise QuantizationError("call prepare() before finalize()")
        self.report.layers.clear()
        self._context.reset_progress()
        with plugin_code(self._algorithm):
            result = self._session.finalize(model if model is not None else self._prepared, inplace=inplace)
        result.quanta_report = self.report
        return result
