"""``RunContext``: what an algorithm gets besides the model and the plan (the documented,
typed run-time API of algorithm plugins)."""

from __future__ import annotations

from typing import Any, Iterator

import attrs
import torch

from quanta._run.calibration import call_model, to_device
from quanta.contracts.ranks import Ranks
from quanta._recipes.recipe import Recipe
from quanta._run.guard import fire_event, plugin_code
from quanta._recipes.planning import Plan, PlannedLayer
from quanta.record import QuantizedWeight
from quanta._run.report import LayerReport, Report
from quanta._run.weights import quantize_weight_with_values, scheme_for, write_values, writes_in_place
from quanta.errors import QuantizationError

__all__ = ["RunContext"]


@attrs.define(kw_only=True, eq=False)
class RunContext:
    """The run-time surface of one algorithm stage.

    Attributes:
        recipe: the :class:`quanta.Recipe` of this stage (its algorithm, options, layer configs).
        plan: the :class:`quanta.Plan` being run (``plan.selected``: the layers to quantize).
        backend: the backend plugin object (a ``quanta.contracts.Backend``) the model belongs to.
        report: the run's :class:`quanta.Report`; put run-level figures in ``report.stats``
            (also reachable as ``context.stats``) and per-layer ones in ``write_layer(extra=...)``.
        device: the torch device the user asked computation to run on, or None (where the weights are).
        data: the calibration batches, materialized once for every stage (a list), or None.
        algorithm: the algorithm plugin object running (errors inside it name it).
        float_model: the model as it was before the first stage (read it through
            :meth:`read_float_weight`, :meth:`float_inputs` and :meth:`float_outputs`), or None when
            the run has none (``inplace=True`` and no stage declares ``reads_float``).
        temporary: ``(module, name)`` of the state added with ``add_state(..., temporary=True)``
            in any stage of this run; removed when the run ends (shared by the run's stages).
        ranks: this process's place in a ``torch.distributed`` run (:class:`quanta.contracts.Ranks`;
            ``world == 1`` without one): chunks of the calibration data, fixed-order sums,
            owners of solves and their results (docs/plugins.md, "Distributed runs").
        reached: the qualified names (``named_modules``) of the modules whose forward ran in core's
            dry forward of ``data[0]`` (before any weight changed, on the model as the first stage
            gets it), so an algorithm needs no pass of its own to learn which modules the data
            reaches; None in later stages and when core ran no dry forward.
    """

    recipe: Recipe
    plan: Plan
    backend: Any
    report: Report
    device: Any = None
    data: list | None = None
    algorithm: Any = None
    float_model: Any = None
    temporary: list = attrs.field(factory=list)
    ranks: Ranks = attrs.field(factory=Ranks)
    reached: frozenset[str] | None = None
    _done: int = attrs.field(default=0, alias="_done")
    _float_cache: dict = attrs.field(factory=dict, alias="float_cache")
    #: ``(tensor, record)`` of the values an inplace run writes over the float weights when it can no
    #: longer fail (:func:`commit_values`); None when the run may not write in place.
    _later: list | None = attrs.field(default=None, alias="later")

    @property
    def config(self) -> Any:
        """The algorithm's options: an instance of its ``config_class`` (None when it has none)."""
        return self.algorithm.config if self.algorithm is not None else self.recipe.algorithm_config

    @property
    def stats(self) -> dict:
        """Run-level figures shown under the report table (``report.stats``)."""
        return self.report.stats

    def batches(self, device: Any = None) -> Iterator[Any]:
        """The calibration batches in order, each moved to ``device`` (default: ``self.device``,
        else left where they are). Every stage of a recipe sees the same batches."""
        target = device if device is not None else self.device
        for batch in self.data or ():
            yield batch if target is None else to_device(batch, target)

    def to_device(self, batch: Any, device: Any = None) -> Any:
        """``batch`` with every tensor inside (mappings, tuples, lists) moved to ``device``
        (default ``self.device``)."""
        target = device if device is not None else self.device
        return batch if target is None else to_device(batch, target)

    def call(self, model: Any, batch: Any) -> Any:
        """Run ``model`` on one batch: ``model(**batch)`` for a mapping, ``model(*batch)`` for a
        tuple or list, ``model(batch)`` for a tensor (``quanta._run.calibration.call_model``)."""
        return call_model(model, batch)

    def module(self, model: Any, layer: PlannedLayer) -> Any:
        """The module that computes a planned layer (``torch.nn.Module`` for torch models), through
        the backend's ``module_of``: for algorithms that observe the layer's inputs. Raises
        ``QuantizationError`` naming the layer when the backend has no module for it."""
        with plugin_code(self.backend, layer.name):
            module = self.backend.module_of(model, layer.unit)
        if module is None:
            raise QuantizationError(f"backend {self.backend.name!r} has no module for layer {layer.name!r}: this "
                                    "algorithm observes layer inputs and needs one", layer.name)
        return module

    def read_weight(self, model: Any, layer: PlannedLayer) -> torch.Tensor:
        """The float weight of a planned layer, through the backend."""
        with plugin_code(self.backend, layer.name):
            return self.backend.read_weight(model, layer.unit)

    def quantize_layer(self, model: Any, layer: PlannedLayer, weight: torch.Tensor | None = None,
                       extra: dict | None = None, *, values_later: bool = False) -> QuantizedWeight:
        """Round-to-nearest quantize one planned layer with its spec and write it back.

        ``weight`` replaces the model's own weight as the input (e.g. after a scaling); the
        report's error is then left to the caller. ``extra``: per-layer figures for the report row
        (e.g. ``{"method": "rtn (grouped conv)"}``). ``values_later``: for an algorithm that reads
        no weight of the model after quantizing it (``rtn``): in an ``inplace=True`` run the record
        is stored now and its dequantized values are written over the float weight's own storage
        once the run can no longer fail (no second float buffer; the float weight stays intact
        until then, so a failed run still restores the model). Returns the record written."""
        original = self.read_weight(model, layer)
        w = original if weight is None else weight
        if self.device is not None:
            w = w.to(self.device)
        unit = layer.unit
        with plugin_code(self.backend, unit.name):
            compute_dtype = self.backend.compute_dtype(model, unit)
        later = self._later
        if (values_later and later is not None and weight is None and self.device is None
                and self._writes_later(original, layer, compute_dtype)):
            record, _, (sq_err, ref_sq) = quantize_weight_with_values(
                w, layer.spec, channel_axis=unit.channel_axis, input_axis=unit.input_axis, layer=unit.name,
                compute_dtype=compute_dtype, keep_values=False)
            self._check_error(layer, sq_err, ref_sq, extra, stacklevel=3)
            with plugin_code(self.backend, layer.name):
                target = self.backend.write_later(model, unit, record)
            later.append((target, record))
            self._add_row(layer, record, original, sq_err, ref_sq, extra)
            return record
        record, values, (sq_err, ref_sq) = quantize_weight_with_values(
            w, layer.spec, channel_axis=unit.channel_axis, input_axis=unit.input_axis, layer=unit.name,
            compute_dtype=compute_dtype)
        if weight is not None:  # the error is reported against the model's own weight
            sq_err, ref_sq = None, None
        self.write_layer(model, layer, record.to(original.device), original, extra=extra,
                         values=values.to(original.device), sq_error=sq_err, ref_sq=ref_sq)
        return record

    def write_layer(self, model: Any, layer: PlannedLayer, record: QuantizedWeight, original: torch.Tensor,
                    extra: dict | None = None, values: torch.Tensor | None = None, sq_error: float | None = None,
                    ref_sq: float | None = None) -> LayerReport:
        """Write ``record`` for ``layer`` through the backend, add its report row and fire ``layer_quantized``.

        Args:
            original: the float weight before quantization (the row's error is ‖W−Ŵ‖/‖W‖ against it).
            extra: per-layer figures for the report (e.g. ``{"gptq_loss": 0.01}``).
            values: ``record.dequantize()`` when already computed (saves a pass over the weight).
            sq_error: ‖W−Ŵ‖² when already known (with ``ref_sq``).
            ref_sq: ‖W‖² when already known (with ``sq_error``).
        Returns the :class:`quanta.LayerReport` row.
        """
        # The error is measured before writing: ``original`` may share the parameter's storage.
        if values is None:
            values = record.dequantize().to(original.device)
        if sq_error is None or ref_sq is None:
            sq_error, ref_sq = _squared_error(values, original)
        self._check_error(layer, sq_error, ref_sq, extra, stacklevel=4)
        with plugin_code(self.backend, layer.name):
            self.backend.write(model, layer.unit, record, values)
        return self._add_row(layer, record, original, sq_error, ref_sq, extra)

    def _writes_later(self, original: torch.Tensor, layer: PlannedLayer, compute_dtype: torch.dtype) -> bool:
        # An inplace run that may write in place, a backend that can, float32 all along, an affine
        # grid, and a [G, K] grouping that is a view of the weight (write_values writes through it).
        if compute_dtype != torch.float32 or not getattr(self.backend, "writes_later", False):
            return False
        if scheme_for(layer.spec).grid != "affine":
            return False
        unit = layer.unit
        sizes = layer.spec.block_sizes(tuple(original.shape), unit.channel_axis, unit.input_axis, unit.name)
        return writes_in_place(original, sizes)

    def _check_error(self, layer: PlannedLayer, sq_error: float, ref_sq: float, extra: dict | None,
                     stacklevel: int) -> None:
        err = (sq_error / ref_sq) ** 0.5 if ref_sq > 0 else 0.0
        if err >= 0.9999:  # never silently: a weight no closer to the float one than zero is (zeroed, blind)
            import warnings

            how = (extra or {}).get("method", getattr(self.algorithm, "name", "?"))
            warnings.warn(f"layer {layer.name!r}: relative error {err:.0%} after quantization ({how}): the quantized "
                          "weight is no closer to the float weight than zero is; leave the layer float "
                          f"(module_name_configs: {{{layer.name!r}: null}}) or check its calibration inputs",
                          stacklevel=stacklevel)

    def _add_row(self, layer: PlannedLayer, record: QuantizedWeight, original: torch.Tensor, sq_error: float,
                 ref_sq: float, extra: dict | None) -> LayerReport:
        err = (sq_error / ref_sq) ** 0.5 if ref_sq > 0 else 0.0
        numel = original.numel()
        self._done += 1
        row = LayerReport(name=layer.name, module_type=layer.unit.module_type, shape=layer.unit.shape,
                          spec=layer.spec.describe(), reason=layer.reason, rel_error=err,
                          bits=layer.spec.dtype.bits, bytes=record.nbytes(), float_bytes=2 * numel,
                          index=self._done, total=len(self.plan.selected), extra=dict(extra or {}))
        self.report.layers.append(row)
        fire_event("layer_quantized", name=layer.name, record=record, stats=row)
        return row

    def add_state(self, model: Any, module: str, name: str, value: torch.Tensor, *, temporary: bool = False) -> None:
        """Store extra state besides the weights (an input scale, a smoothing vector) as ``name`` on
        the module called ``module``, declared so that ``inplace`` restore removes it and saving and
        exporting carry it (torch backend: ``quanta.record.declare_state``).

        ``temporary=True``: state a later stage of this run reads (a statistic, a float copy) that
        is not part of the result: core removes it (``Backend.remove_state``) when the run ends."""
        with plugin_code(self.backend, module):
            self.backend.add_state(model, module, name, value)
        if temporary and (module, name) not in self.temporary:
            self.temporary.append((module, name))

    # -- the float model ---------------------------------------------------------------

    def _float_unit(self, layer: PlannedLayer):
        from quanta.errors import ConfigError

        if self.float_model is None:
            raise ConfigError(f"algorithm {getattr(self.algorithm, 'name', '?')!r} reads the float model, but this "
                              "run keeps none: declare reads_float = True on the algorithm (core then keeps a float "
                              "copy of an inplace=True model)", "reads_float")
        units = self._float_cache.get("units")
        if units is None:
            with plugin_code(self.backend):
                units = {u.name: u for u in self.backend.units(self.float_model)}
            self._float_cache["units"] = units
        if layer.name not in units:
            raise ConfigError(f"layer {layer.name!r} is not in the float model (a stage replaced the model?)", "layer")
        return units[layer.name]

    def read_float_weight(self, layer: PlannedLayer) -> torch.Tensor:
        """The weight of ``layer`` as it was before the first stage of the run (never quantized or
        rescaled), through the backend; read only. Every stage can read it."""
        unit = self._float_unit(layer)
        with plugin_code(self.backend, layer.name):
            return self.backend.read_weight(self.float_model, unit)

    def float_inputs(self, layer: PlannedLayer) -> list[torch.Tensor]:
        """The first input of ``layer``'s module in the float model, one tensor per calibration
        batch (torch models; computed once per layer and cached for the run's stages)."""
        return self._float_activations(layer)[0]

    def float_outputs(self, layer: PlannedLayer) -> list[torch.Tensor]:
        """The output of ``layer``'s module in the float model, one tensor per calibration batch
        (torch models; computed once per layer and cached for the run's stages)."""
        return self._float_activations(layer)[1]

    def _float_activations(self, layer: PlannedLayer) -> tuple[list, list]:
        from quanta.errors import ConfigError

        key = ("activations", layer.name)
        if key in self._float_cache:
            return self._float_cache[key]
        unit = self._float_unit(layer)
        module = unit.handle
        if not isinstance(module, torch.nn.Module):
            raise ConfigError(f"float inputs and outputs need a torch model; the {self.backend.name!r} backend's "
                              f"layer {layer.name!r} is not a torch module", "layer")
        if not self.data:
            raise ConfigError("float inputs and outputs need calibration data: pass data=[...] (declare "
                              "needs_data = True)", "data")
        inputs, outputs = [], []

        def capture(_module, args, output):
            inputs.append(args[0].detach() if args else None)
            outputs.append(output.detach() if isinstance(output, torch.Tensor) else output)

        handle = module.register_forward_hook(capture)
        try:
            with torch.no_grad():
                for batch in self.batches():
                    self.call(self.float_model, batch)
        finally:
            handle.remove()  # the float model is the user's: never leave a hook on it
        self._float_cache[key] = (inputs, outputs)
        return inputs, outputs

    def add_transform(self, model: Any, module: str, kind: str, name: str, value: torch.Tensor) -> None:
        """Make the module called ``module`` compute a forward transform ``kind`` (a key of
        ``quanta.record.TRANSFORMS``: ``"input_mul"`` for an input scale, ``"output_add"`` for an
        output shift, ...) with ``value`` stored as declared state ``name``. Unlike a hook an
        algorithm registers itself, it is part of the model: ``inplace`` restore removes it,
        ``quanta.save``/``quanta.load`` carry it and a traced export computes it."""
        with plugin_code(self.backend, module):
            self.backend.add_transform(model, module, kind, name, value)

    def end_run(self, model: Any) -> None:
        """Remove the state the run's stages marked temporary from ``model`` (the result) and drop
        the float caches. Core calls it once, after the last stage succeeded."""
        for module, name in self.temporary:
            with plugin_code(self.backend, module):
                self.backend.remove_state(model, module, name)
        self.temporary.clear()
        self._float_cache.clear()

    def reset_progress(self) -> None:
        """Start the layer count of report rows again (``quanta.Quantizer.finalize`` reruns)."""
        self._done = 0


#: Elements above which a layer's error is summed in pieces of this size: the difference of a
#: large weight (an LM head) is never materialized whole.
_ERROR_PIECE = 1 << 22


def _squared_error(values: torch.Tensor, original: torch.Tensor) -> tuple[float, float]:
    """(‖W−Ŵ‖², ‖W‖²) of the quantized ``values`` against the float ``original``."""
    ref = original.detach().reshape(values.shape)
    if values.numel() <= _ERROR_PIECE:
        ref = ref.to(torch.float32)
        return (float(torch.nn.functional.mse_loss(values.float(), ref, reduction="sum")),
                float(torch.linalg.vector_norm(ref)) ** 2)
    flat_v, flat_r = values.reshape(-1), ref.reshape(-1)
    sq_error = ref_sq = 0.0
    for i in range(0, flat_v.numel(), _ERROR_PIECE):
        r = flat_r[i:i + _ERROR_PIECE].to(torch.float32)
        sq_error += float(torch.nn.functional.mse_loss(flat_v[i:i + _ERROR_PIECE].float(), r, reduction="sum"))
        ref_sq += float(torch.linalg.vector_norm(r)) ** 2
    return sq_error, ref_sq


def commit_values(later: list) -> None:
    """Write the values an inplace run kept for the end (``quantize_layer(..., values_later=True)``)
    over the float weights' storage: called by core once the run can no longer fail, with Ctrl-C
    held back (``signals_deferred``), so the model is never left half written."""
    while later:
        target, record = later.pop(0)
        write_values(record, target)
