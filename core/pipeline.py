"""``quanta.quantize`` and ``quanta.plan``: run a recipe on a model through the registry."""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch

from .config import Recipe, load_recipe
from .errors import ConfigError
from .model_checks import check_model
from .planning import Plan, PlannedLayer, build_plan
from .preflight import check_run
from .record import QuantizedWeight
from .report import LayerReport, Report
from .weights import quantize_weight_with_values

__all__ = ["quantize", "plan", "choose_backend", "RunContext"]


def _registry():
    from quanta import registry

    return registry


def _accepts_share(backend) -> bool:
    import inspect

    try:
        return "share" in inspect.signature(backend.copy).parameters
    except (TypeError, ValueError):
        return False


def choose_backend(model: Any, name: str | None = None):
    """The backend entry for ``model``: the one named, else the first whose ``accepts`` is true."""
    reg = _registry()
    if name is not None:
        return reg.get("backend", name)
    for entry in reg.entries("backend"):
        if entry.obj.accepts(model):
            return entry
    raise ConfigError(f"no backend accepts a {type(model).__module__}.{type(model).__name__} "
                      f"(backends: {', '.join(reg.names('backend'))})")


def _plan(model, recipe: Recipe, backend_entry) -> Plan:
    backend = backend_entry.obj
    units = backend.units(model)
    names = backend.module_names(model) if hasattr(backend, "module_names") else ()
    types = backend.type_names(model) if hasattr(backend, "type_names") else ()
    return build_plan(units, recipe, backend_entry.name, names, types)


def plan(model: Any, config: Any = None, *, backend: str | None = None) -> Plan:
    """Dry run: which layer gets which spec and why. Validates everything, modifies nothing."""
    recipe = load_recipe(config)
    check_model(model, need_values=False)
    entry = choose_backend(model, backend)
    return _plan(model, recipe, entry)


class RunContext:
    """What an algorithm gets besides the model: the recipe, the backend and reporting.

    Attributes: ``recipe``, ``backend`` (implementation object), ``config`` (the algorithm's
    config instance or None), ``plan``, ``report``, ``device`` (torch device for compute).
    """

    def __init__(self, recipe: Recipe, backend, plan: Plan, report: Report, device=None):
        self.recipe, self.backend, self.plan, self.report = recipe, backend, plan, report
        self.config = recipe.algorithm_config
        self.device = device
        self._done = 0

    def quantize_layer(self, model, layer: PlannedLayer, weight: torch.Tensor | None = None) -> QuantizedWeight:
        """Round-to-nearest quantize one planned layer (``weight`` overrides the model's) and write it back."""
        original = self.backend.read_weight(model, layer.unit)
        w = original if weight is None else weight
        if self.device is not None:
            w = w.to(self.device)
        unit = layer.unit
        # A backend may ask for the math in another float type (Core ML: the const's fp16).
        dtype_of = getattr(self.backend, "compute_dtype", None)
        compute_dtype = dtype_of(model, unit) if callable(dtype_of) else torch.float32
        record, values, (sq_err, ref_sq) = quantize_weight_with_values(
            w, layer.spec, channel_axis=unit.channel_axis, input_axis=unit.input_axis, layer=unit.name,
            compute_dtype=compute_dtype)
        if weight is not None:  # the error is reported against the model's own weight
            sq_err, ref_sq = None, None
        self.write_layer(model, layer, record.to(original.device), original, values=values.to(original.device),
                         sq_error=sq_err, ref_sq=ref_sq)
        return record

    def write_layer(self, model, layer: PlannedLayer, record: QuantizedWeight, original: torch.Tensor,
                    extra: dict | None = None, values: torch.Tensor | None = None, sq_error: float | None = None,
                    ref_sq: float | None = None) -> LayerReport:
        """Write ``record`` for ``layer``, add its report row (error against ``original``), fire ``layer_quantized``.

        ``values`` (= ``record.dequantize()``), ``sq_error`` (‖W−Ŵ‖²) and ``ref_sq`` (‖W‖²) may be
        passed when already known, saving passes over the weight.
        """
        # The error is measured before writing: ``original`` may share the parameter's storage.
        if values is None:
            values = record.dequantize().to(original.device)
        if sq_error is None or ref_sq is None:
            ref = original.detach().to(torch.float32)
            ref_sq = float(torch.linalg.vector_norm(ref)) ** 2
            sq_error = float(torch.nn.functional.mse_loss(values, ref.reshape(values.shape), reduction="sum"))
        err = (sq_error / ref_sq) ** 0.5 if ref_sq > 0 else 0.0
        numel = original.numel()
        self.backend.write(model, layer.unit, record, values)
        self._done += 1
        row = LayerReport(name=layer.name, module_type=layer.unit.module_type, shape=layer.unit.shape,
                          spec=layer.spec.describe(), reason=layer.reason, rel_error=err,
                          bits=layer.spec.dtype.bits, bytes=record.nbytes(), float_bytes=2 * numel,
                          index=self._done, total=len(self.plan.selected), extra=dict(extra or {}))
        self.report.layers.append(row)
        _registry().hook().layer_quantized(name=layer.name, record=record, stats=row)
        return row


def quantize(model: Any, config: Any = None, data: Any = None, *, inplace: bool = False,
             backend: str | None = None, device: Any = None) -> Any:
    """Quantize ``model`` with a recipe and return the quantized model.

    Args:
        model: a ``torch.nn.Module`` (or any model a backend plugin accepts, e.g. Core ML).
        config: a recipe dict, YAML path, :class:`Recipe`, or a coremltools-style config dict.
        data: calibration data for algorithms that need it (list/DataLoader of tensors, tuples or dicts).
        inplace: modify ``model`` itself. Otherwise ``model`` is never modified.
        backend: backend plugin name (default: the first that accepts the model).
        device: torch device for the computation (default: where the weights are).

    Returns the quantized model; ``result.quanta_report`` is a :class:`Report`. Everything
    is validated before any weight changes; on any failure ``model`` is left untouched,
    also with ``inplace=True``.
    """
    recipe = load_recipe(config)
    check_model(model)
    reg = _registry()
    algo_entry = reg.get("algorithm", recipe.algorithm)
    backend_entry = choose_backend(model, backend)
    if getattr(algo_entry.obj, "needs_data", False) and data is None:
        raise ConfigError(f"algorithm {recipe.algorithm!r} needs calibration data: pass data=[...]", "data")
    the_plan = _plan(model, recipe, backend_entry)
    if hasattr(algo_entry.obj, "validate"):
        algo_entry.obj.validate(the_plan, recipe)
    data = check_run(model, the_plan, recipe, algo_entry.obj, data, device)
    impl = backend_entry.obj
    units = [p.unit for p in the_plan.selected]
    if inplace:
        target, snapshot = model, impl.snapshot(model, units)
    else:
        share = tuple(units) if getattr(algo_entry.obj, "replaces_weights_only", False) else ()
        target = impl.copy(model, share=share) if share and _accepts_share(impl) else impl.copy(model)
        snapshot = None
        the_plan = _plan(target, recipe, backend_entry)  # units must point into the copy
    for p in the_plan.layers:
        if p.spec is None and p.reason.startswith("unsupported"):
            warnings.warn(f"layer {p.name!r}: {p.reason}", stacklevel=2)
    report = Report(algorithm=recipe.algorithm,
                    skipped=[(p.name, p.reason) for p in the_plan.layers if p.spec is None])
    ctx = RunContext(recipe, impl, the_plan, report, device=device)
    start = time.perf_counter()
    try:
        reg.hook().run_started(algorithm=recipe.algorithm, plan=the_plan)
        result = algo_entry.obj.run(target, the_plan, data, ctx)
        if result is not None:
            target = result
    except BaseException:
        if snapshot is not None:
            impl.restore(model, snapshot)
        raise
    report.seconds = time.perf_counter() - start
    try:
        target.quanta_report = report
    except (AttributeError, TypeError):  # a model type that takes no attributes
        pass
    reg.hook().run_finished(report=report)
    return target

