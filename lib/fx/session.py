"""``ActivationSession``: prepare → step → finalize on one model, shared by ``qat`` and ``calibrate``.

``quanta.Quantizer`` drives it for the user; the ``calibrate`` algorithm drives it itself.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import fx, nn

from quanta._recipes.recipe import Recipe
from quanta.errors import ConfigError, QuantizationError
from quanta._recipes.planning import Plan
from quanta.contracts import Unit
from quanta._records.spec import QuantDtype, parse_dtype

from .convert import finalize_graph
from .fake_quant import ActivationFakeQuantize
from .milestones import MilestoneState, apply_state, state_at
from .observers import streaming_observer
from .partial import WEIGHTED_LEAF_NAME, FloatPart, TracedPart, capture_calls, find_parts, share_structure
from .prepare import assume_float_tensors, fuse_conv_bn, insert_activation_quantizers, propagate_shapes, swap_weighted
from .rules import ActivationRules
from .tracer import names_matching, trace_call

__all__ = ["ActivationOptions", "ActivationSession", "activation_rules_of", "as_example_call",
           "parse_activation_dtype", "unit_for", "UNTRACEABLE_MODES", "ACTIVATION_SITES"]

#: what ``prepare`` does when the model's forward does not trace (option ``untraceable``).
UNTRACEABLE_MODES = ("error", "submodules")
#: where activation quantizers go (option ``activation_sites``): around every quantized op
#: as the backend's rules place them, or on the inputs of weighted modules (Linear/Conv) only.
ACTIVATION_SITES = ("inputs_and_outputs", "weighted_inputs")

_FLOAT = ("float32", "fp32", "float", "torch.float32", "none")


def parse_activation_dtype(value: Any) -> QuantDtype | None:
    """``"int8"``/``"uint8"``/``torch.quint8``/``torch.qint8`` → QuantDtype; ``"float32"``/None → None."""
    if value is None or str(value).lower() in _FLOAT or value is torch.float32:
        return None
    if value is torch.quint8 or str(value).lower() in ("quint8", "torch.quint8"):
        return QuantDtype(8, False)
    if value is torch.qint8 or str(value).lower() in ("qint8", "torch.qint8"):
        return QuantDtype(8, True)
    dtype = parse_dtype(value, "activation_dtype")
    if dtype.bits != 8:
        raise ConfigError(f"activations are 8-bit (int8 or uint8), got {dtype}", "activation_dtype")
    return dtype


@attrs.frozen(kw_only=True)
class ActivationOptions:
    """Activation settings common to ``qat`` and ``calibrate`` (read from their configs).

    ``untraceable``: one of :data:`UNTRACEABLE_MODES`; ``sites``: one of :data:`ACTIVATION_SITES`
    (the configs' ``activation_sites``).
    """

    dtype: QuantDtype | None
    scheme: str
    observer: str
    averaging_constant: float = 0.01
    milestones: tuple[int, int, int, int] | None = None
    untraceable: str = "error"
    sites: str = "inputs_and_outputs"
    learnable: bool = False
    float_modules: tuple[str, ...] = ()
    example_run: str = "required"
    unobserved: str = "error"
    nonnegative_scheme: str | None = None


def activation_rules_of(backend) -> ActivationRules:
    """The backend's activation rules; ConfigError when the backend states none."""
    get = getattr(backend, "activation_rules", None)
    if not callable(get):
        raise ConfigError(f"backend {getattr(backend, 'name', backend)!r} states no activation-quantization rules "
                          f"(activation_rules()); activation quantization needs them", "backend")
    return get()


def as_example_call(example_inputs: Any) -> tuple[tuple, dict]:
    """Normalise ``example_inputs`` into ``(args, kwargs)`` for ``model(*args, **kwargs)``.

    A tensor, a tuple/list of tensors (positional), a mapping (keywords: a Hugging Face
    tokenizer's ``{"input_ids": ..., "attention_mask": ...}``), or a shape such as
    ``[1, 3, 224, 224]`` (coremltools' docs pass one; a uniform random tensor is made).
    """
    if example_inputs is None:
        raise ConfigError("prepare() needs example_inputs (a tensor, a tuple of tensors, a dict of keyword "
                          "tensors or a shape)", "example_inputs")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (list, tuple)):
        if example_inputs and all(isinstance(v, int) and not isinstance(v, bool) for v in example_inputs):
            return (torch.rand(*example_inputs),), {}
        return tuple(example_inputs), {}
    return (example_inputs,), {}


class ActivationSession:
    """One model's journey: ``prepare`` (trace, fuse, insert quantizers), ``step`` (milestones),
    ``finalize`` (records + quantize/dequantize pairs).

    When the model's forward does not trace and ``options.untraceable == "submodules"``,
    ``prepare`` traces the largest submodules that do (``quanta.fx.partial``) and
    returns the model itself with those submodules replaced by their prepared GraphModules;
    ``traced_parts`` and ``float_parts`` say which parts were traced and which stayed float.

    Args:
        model: the float ``nn.Module``.
        plan: the validated ``quanta.Plan`` (which weight gets which spec).
        recipe: the recipe (``module_name_configs`` null entries become opaque float leaves).
        backend: the backend implementation (asked for ``activation_rules()``).
        options: :class:`ActivationOptions`.
        on_record: optional ``(name, module, record, float_weight)`` callback writing each record.
        report: optional ``quanta.Report``; ``prepare`` adds the float parts and the weights
            left float to ``report.skipped`` and the traced parts to ``report.stats``.
    """

    def __init__(self, model: nn.Module, plan: Plan, recipe: Recipe, backend, options: ActivationOptions,
                 on_record=None, report=None):
        self.rules = activation_rules_of(backend)
        if options.dtype is not None:
            self.rules.check_dtype(options.dtype)
        if options.sites not in ACTIVATION_SITES:
            raise ConfigError(f"expected one of {', '.join(ACTIVATION_SITES)}, got {options.sites!r}",
                              "activation_sites")
        if options.untraceable not in UNTRACEABLE_MODES:
            raise ConfigError(f"expected one of {', '.join(UNTRACEABLE_MODES)}, got {options.untraceable!r}",
                              "untraceable")
        self.options = options
        self.model, self.plan, self.recipe = model, plan, recipe
        self.on_record = on_record
        self.report = report
        self.specs = {p.unit.name: p.spec for p in plan.layers if p.unit.param == "weight"}
        all_names = [n for n, _ in model.named_modules() if n]
        nulls = [k for k, v in recipe.module_name_configs.items() if v is None]
        # Null modules that are not weighted layers stay opaque (an untraceable block, say).
        self.float_leaves = names_matching(nulls, all_names)
        # Modules whose activations stay float (option float_activation_modules); weights still quantized.
        self.float_activations = names_matching(options.float_modules, all_names)
        self.gm: nn.Module | None = None
        #: submodules replaced by prepared GraphModules (empty when the whole model traced).
        self.traced_parts: list[TracedPart] = []
        #: modules kept as float Python code, with the reason (the root first, if it failed).
        self.float_parts: list[FloatPart] = []
        #: model-level names of the weights fake-quantized in the prepared graphs.
        self.quantized_weights: list[str] = []
        self.steps = 0
        self._applied: MilestoneState | None = None  # the switches apply_state last set

    # -- prepare ------------------------------------------------------------------------------
    def _make_quantizer(self, site: str, nonnegative: bool = False) -> ActivationFakeQuantize:
        scheme = self.options.nonnegative_scheme if nonnegative and self.options.nonnegative_scheme else \
            self.options.scheme
        observer = streaming_observer(self.options.observer, None,
                                      averaging_constant=self.options.averaging_constant)
        if self.options.learnable:
            from .learnable import LearnableActivationFakeQuantize

            return LearnableActivationFakeQuantize(observer, scheme, self.options.dtype, site)
        return ActivationFakeQuantize(observer, scheme, self.options.dtype, site)

    def _rewrite(self, gm: fx.GraphModule, inputs: tuple, part: TracedPart | None = None) -> bool:
        """Fuse, swap and insert quantizers in one graph. True when anything in it is quantized."""
        prefix = part.name if part is not None else ""

        def full(local: str) -> str:
            return part.layer_name(local) if part is not None else local

        no_acts = self.float_leaves | self.float_activations
        if part is None:
            specs, skip = self.specs, no_acts
        elif part.weighted_leaf:
            specs = {WEIGHTED_LEAF_NAME: self.specs.get(part.name)}
            skip = {WEIGHTED_LEAF_NAME} if part.name in no_acts else set()
        else:
            specs = {k[len(prefix) + 1:]: v for k, v in self.specs.items() if k.startswith(prefix + ".")}
            skip = {k[len(prefix) + 1:] for k in no_acts if k.startswith(prefix + ".")}

        def make_quantizer(site: str, nonnegative: bool = False) -> ActivationFakeQuantize:
            where, _, local = site.partition(" of ")
            return self._make_quantizer(f"{where} of {full(local)}" if part is not None and local else site,
                                        nonnegative)

        try:
            propagate_shapes(gm, inputs)
        except Exception as exc:  # the model's own code failed on the example input
            cause = exc
            while cause.__cause__ is not None:  # ShapeProp wraps the model's own error
                cause = cause.__cause__
            reason = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"
            if self.options.example_run != "optional":
                raise QuantizationError(f"the model does not run on example_inputs ({reason}); pass inputs it "
                                        "accepts", "example_inputs") from exc
            warnings.warn(f"the model does not run on example_inputs ({reason}): activation quantizers are placed "
                          "from the graph alone (inputs, module outputs and the outputs of quantized ops are taken "
                          "to be float tensors)", stacklevel=4)
            assume_float_tensors(gm, self.rules)
        fused = fuse_conv_bn(gm, self.rules, specs, self.options.learnable)
        swapped = swap_weighted(gm, self.rules, specs, self.options.learnable)
        quantizers = []
        if self.options.dtype is not None:
            quantizers = insert_activation_quantizers(gm, self.rules, make_quantizer, skip=skip,
                                                      nonnegative_scheme=self.options.nonnegative_scheme is not None,
                                                      sites=self.options.sites)
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
        self.quantized_weights += [full(n) for n in (*fused, *swapped)]
        return bool(fused or swapped or quantizers)

    def prepare(self, example_inputs: Any = None, inplace: bool = False) -> nn.Module:
        """Trace and rewrite the model; returns the fake-quant model to train or calibrate.

        ``example_inputs``: see :func:`as_example_call` (tensors, a tuple, or a dict of keyword
        tensors). Returns a ``torch.fx.GraphModule`` when the whole model traces; otherwise
        (``untraceable: submodules``) the model with its traceable parts replaced by prepared
        GraphModules. ``inplace=True`` shares the model's Parameters (an optimizer built on
        ``model`` keeps working); otherwise a deep copy is prepared. ``model``'s own module
        tree is never rewired.
        """
        if self.gm is not None:
            raise QuantizationError("prepare() was already called on this quantizer")
        args, kwargs = as_example_call(example_inputs)
        model = self.model if inplace else copy.deepcopy(self.model)
        try:
            gm, inputs = trace_call(model, args, kwargs, self.float_leaves, tuple(self.rules.weighted_modules))
        except QuantizationError as exc:
            if self.options.untraceable != "submodules":
                raise
            prepared = self._prepare_parts(model, args, kwargs, inplace, getattr(exc, "trace_reason", str(exc)))
        else:
            self._rewrite(gm, inputs)
            gm.train(model.training)
            prepared = gm
        self._applied = state_at(self.options.milestones, 0)
        apply_state(prepared, self._applied)
        self.gm = prepared
        self._write_report()
        return prepared

    def _prepare_parts(self, model: nn.Module, args: tuple, kwargs: dict, inplace: bool, root_reason: str):
        root = share_structure(model) if inplace else model
        calls = capture_calls(root, args, kwargs)
        parts, self.float_parts = find_parts(root, calls, is_weighted=self.rules.is_weighted,
                                             leaf_types=tuple(self.rules.weighted_modules),
                                             float_leaves=self.float_leaves, root_reason=root_reason)
        for part in parts:
            original = root.get_submodule(part.name)
            if not self._rewrite(part.graph_module, part.inputs, part):
                continue  # nothing in it is quantized: keep the original module
            part.graph_module.train(original.training)
            parent, _, child = part.name.rpartition(".")
            setattr(root.get_submodule(parent), child, part.graph_module)
            self.traced_parts.append(part)
        return root

    def _write_report(self) -> None:
        """Weights the plan selects but no graph quantizes, float parts and traced parts → report."""
        if self.report is None:
            return
        done = set(self.quantized_weights)
        skipped = [(p.unit.name, self._why_float(p.unit.name, p.unit.module_type)) for p in self.plan.layers
                   if p.spec is not None and p.unit.name not in done]
        skipped += [(f.name or "<root>", f"{f.module_type} stays float Python code: {f.reason}")
                    for f in self.float_parts]
        self.report.skipped.extend(skipped)
        if self.traced_parts:
            self.report.stats["fx_traced_parts"] = [p.name for p in self.traced_parts]

    def _why_float(self, name: str, module_type: str) -> str:
        if not self.rules.is_weighted(self.model.get_submodule(name)):
            return f"weight left float: the backend's activation rules do not quantize {module_type}"
        for f in reversed(self.float_parts):  # the innermost float module holding it
            if f.name and (name == f.name or name.startswith(f.name + ".")):
                return f"weight left float: inside float module {f.name!r} ({f.reason})"
        return "weight left float: not in the traced graph"

    # -- training -----------------------------------------------------------------------------
    def step(self) -> None:
        """Count one training step and apply the milestones it reaches."""
        if self.gm is None:
            raise QuantizationError("call prepare() before step()")
        self.steps += 1
        state = state_at(self.options.milestones, self.steps)
        if state != self._applied:  # the switches change only at milestones: no walk over the modules between
            apply_state(self.gm, state)
            self._applied = state

    def set_state(self, observers: bool, fake_quant: bool, bn_frozen: bool) -> None:
        """Set the switches directly (``calibrate`` uses observers on, fake quant off, bn frozen)."""
        self._applied = MilestoneState(observers=observers, fake_quant=fake_quant, bn_frozen=bn_frozen)
        apply_state(self.gm, self._applied)

    # -- finalize -----------------------------------------------------------------------------
    def finalize(self, model: nn.Module | None = None, inplace: bool = False) -> nn.Module:
        """The quantized model: weight records and quantize/dequantize activation pairs.

        A ``GraphModule`` when the whole model traced; otherwise the model whose traced parts
        are finalized GraphModules (each in the same form) and whose float parts are unchanged.
        """
        target = model if model is not None else self.gm
        if target is None:
            raise QuantizationError("call prepare() before finalize()")
        if not inplace:
            target = copy.deepcopy(target)
        if not self.traced_parts:
            return finalize_graph(target, self.on_record, self.options.unobserved)
        for part in self.traced_parts:
            finalize_graph(target.get_submodule(part.name), self._part_record_callback(part), self.options.unobserved)
        return target.eval()

    def _part_record_callback(self, part: TracedPart):
        def on_record(name, module, record, float_weight):
            full = part.layer_name(name)
            if self.on_record is not None:
                self.on_record(full, module, record, float_weight)
            else:
                from quanta.record import attach_record

                attach_record(module, "weight", record)

        return on_record


def unit_for(name: str, module: nn.Module, plan: Plan) -> Unit:
    """A Unit pointing at ``module`` (the finalized module named ``name``) for report rows."""
    for p in plan.layers:
        if p.unit.name == name:
            u = p.unit
            return Unit(u.name, u.module_type, u.type_mro, u.param, module.weight.shape, u.channel_axis,
                        u.input_axis, module)
    mro = [c.__name__ for c in type(module).__mro__ if c not in (nn.Module, object)]
    return Unit(name, type(module).__name__, mro, "weight", module.weight.shape, 0, 1, module)
