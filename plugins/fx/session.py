"""``ActivationSession``: prepare → step → finalize on one model, shared by ``qat`` and ``calibrate``.

``quanta.Quantizer`` drives it for the user; the ``calibrate`` algorithm drives it itself.
"""

from __future__ import annotations

import copy
from typing import Any

import attrs
import torch
from torch import fx, nn

from quanta.config import Recipe
from quanta.errors import ConfigError, QuantizationError
from quanta.plan import Plan
from quanta.plugin import Unit
from quanta.spec import QuantDtype, parse_dtype

from .convert import finalize_graph
from .fake_quant import ActivationFakeQuantize
from .milestones import apply_state, check_milestones, state_at
from .prepare import fuse_conv_bn, insert_activation_quantizers, propagate_shapes, swap_weighted
from .rules import ActivationRules
from .tracer import names_matching, trace

__all__ = ["ActivationOptions", "ActivationSession", "activation_rules_of", "as_example_inputs", "call_model",
           "parse_activation_dtype", "unit_for"]

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
    """Activation settings common to ``qat`` and ``calibrate`` (read from their configs)."""

    dtype: QuantDtype | None
    scheme: str
    observer: str
    averaging_constant: float = 0.01
    milestones: tuple[int, int, int, int] | None = None


def activation_rules_of(backend) -> ActivationRules:
    """The backend's activation rules; ConfigError when the backend states none."""
    get = getattr(backend, "activation_rules", None)
    if not callable(get):
        raise ConfigError(f"backend {getattr(backend, 'name', backend)!r} states no activation-quantization rules "
                          f"(activation_rules()); activation quantization needs them", "backend")
    return get()


def as_example_inputs(example_inputs: Any) -> tuple:
    """Normalise ``example_inputs``: a tensor, a tuple/list of tensors, or a shape such as
    ``[1, 3, 224, 224]`` (coremltools' docs pass one; a uniform random tensor is made)."""
    if example_inputs is None:
        raise ConfigError("prepare() needs example_inputs (a tensor, a tuple of tensors or a shape)", "example_inputs")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        if example_inputs and all(isinstance(v, int) and not isinstance(v, bool) for v in example_inputs):
            return (torch.rand(*example_inputs),)
        return tuple(example_inputs)
    if isinstance(example_inputs, dict):
        raise ConfigError("keyword example inputs are not supported: pass a tuple of tensors", "example_inputs")
    return (example_inputs,)


def call_model(model: nn.Module, batch: Any):
    """Run ``model`` on one calibration batch: a tensor, a tuple/list (positional) or a dict (keywords)."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


class ActivationSession:
    """One model's journey: ``prepare`` (trace, fuse, insert quantizers), ``step`` (milestones),
    ``finalize`` (records + quantize/dequantize pairs).

    Args:
        model: the float ``nn.Module``.
        plan: the validated ``quanta.Plan`` (which weight gets which spec).
        recipe: the recipe (``module_name_configs`` null entries become opaque float leaves).
        backend: the backend implementation (asked for ``activation_rules()``).
        options: :class:`ActivationOptions`.
        on_record: optional ``(name, module, record, float_weight)`` callback writing each record.
    """

    def __init__(self, model: nn.Module, plan: Plan, recipe: Recipe, backend, options: ActivationOptions,
                 on_record=None):
        self.rules = activation_rules_of(backend)
        if options.dtype is not None:
            self.rules.check_dtype(options.dtype)
        self.options = options
        self.model, self.plan, self.recipe = model, plan, recipe
        self.on_record = on_record
        self.specs = {p.unit.name: p.spec for p in plan.layers if p.unit.param == "weight"}
        all_names = [n for n, _ in model.named_modules() if n]
        nulls = [k for k, v in recipe.module_name_configs.items() if v is None]
        # Null modules that are not weighted layers stay opaque (an untraceable block, say).
        self.float_leaves = names_matching(nulls, all_names)
        self.gm: fx.GraphModule | None = None
        self.steps = 0

    # -- prepare ------------------------------------------------------------------------------
    def _make_quantizer(self, site: str) -> ActivationFakeQuantize:
        from quanta.plugins.activation_observers import streaming_observer

        options = {} if self.options.observer == "minmax" else {"averaging_constant": self.options.averaging_constant}
        observer = streaming_observer(self.options.observer, None, **options)
        return ActivationFakeQuantize(observer, self.options.scheme, self.options.dtype, site)

    def prepare(self, example_inputs: Any = None, inplace: bool = False) -> fx.GraphModule:
        """Trace and rewrite the model; returns the fake-quant ``torch.fx.GraphModule`` to train.

        ``inplace=True`` shares the model's Parameters (an optimizer built on ``model`` keeps
        working); otherwise a deep copy is prepared and ``model`` is never modified.
        """
        if self.gm is not None:
            raise QuantizationError("prepare() was already called on this quantizer")
        inputs = as_example_inputs(example_inputs)
        model = self.model if inplace else copy.deepcopy(self.model)
        gm = trace(model, self.float_leaves, tuple(self.rules.weighted_modules))
        propagate_shapes(gm, inputs)
        fuse_conv_bn(gm, self.rules, self.specs)
        swap_weighted(gm, self.rules, self.specs)
        if self.options.dtype is not None:
            insert_activation_quantizers(gm, self.rules, self._make_quantizer, skip=self.float_leaves)
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
        gm.train(model.training)
        apply_state(gm, state_at(self.options.milestones, 0))
        self.gm = gm
        return gm

    # -- training -----------------------------------------------------------------------------
    def step(self) -> None:
        """Count one training step and apply the milestones it reaches."""
        if self.gm is None:
            raise QuantizationError("call prepare() before step()")
        self.steps += 1
        apply_state(self.gm, state_at(self.options.milestones, self.steps))

    def set_state(self, observers: bool, fake_quant: bool, bn_frozen: bool) -> None:
        """Set the switches directly (``calibrate`` uses observers on, fake quant off, bn frozen)."""
        from .milestones import MilestoneState

        apply_state(self.gm, MilestoneState(observers=observers, fake_quant=fake_quant, bn_frozen=bn_frozen))

    # -- finalize -----------------------------------------------------------------------------
    def finalize(self, model: fx.GraphModule | None = None, inplace: bool = False) -> fx.GraphModule:
        """The quantized ``GraphModule``: weight records and quantize/dequantize activation pairs."""
        gm = model if model is not None else self.gm
        if gm is None:
            raise QuantizationError("call prepare() before finalize()")
        if not inplace:
            gm = copy.deepcopy(gm)
        return finalize_graph(gm, self.on_record)


def unit_for(name: str, module: nn.Module, plan: Plan) -> Unit:
    """A Unit pointing at ``module`` (the finalized module named ``name``) for report rows."""
    for p in plan.layers:
        if p.unit.name == name:
            u = p.unit
            return Unit(u.name, u.module_type, u.type_mro, u.param, module.weight.shape, u.channel_axis,
                        u.input_axis, module)
    mro = [c.__name__ for c in type(module).__mro__ if c not in (nn.Module, object)]
    return Unit(name, type(module).__name__, mro, "weight", module.weight.shape, 0, 1, module)
