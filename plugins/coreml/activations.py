"""W8A8 for existing Core ML models on Linux: calibrate activation ranges with the numpy runner,
then insert ``quantize``/``dequantize`` pairs with coremltools' own graph passes.

coremltools' ``linear_quantize_activations`` calibrates with ``MLModel.predict`` (macOS only)
and hands the observed ranges to two graph passes
(``compression::insert_prefix_quantize_dequantize_pair`` and
``compression::insert_suffix_quantize_dequantize_pair``, then
``common::dequantize_quantize_pair_elimination``). Here only the calibration differs: the
ranges come from :func:`quanta.mil.runner.run` over ``sample_data``; the graph
rewrite, the choice of tensors and the scale/zero-point math are coremltools' own.

Example::

    from coremltools.optimize.coreml import OptimizationConfig, OpLinearQuantizerConfig
    from quanta.plugins.coreml.activations import linear_quantize_activations
    config = OptimizationConfig(global_config=OpLinearQuantizerConfig(mode="linear_symmetric"))
    a8 = linear_quantize_activations(mlmodel, config, [{"x": x0}, {"x": x1}])   # a new MLModel
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from quanta.errors import ConfigError, QuantizationError, did_you_mean
from quanta.plugins.coreml.backend import load_mlmodel
from quanta.mil.program import load_program
from quanta.mil.runner import run

__all__ = ["ACTIVATION_OP_TYPES", "activation_ranges", "insert_quantize_dequantize", "linear_quantize_activations"]

# The ops whose inputs coremltools quantizes (insert_prefix_quantize_dequantize_pair's
# SUPPORTED_OP_TYPES); their outputs (or the output of a following relu/relu6/leaky_relu/
# sigmoid/tanh/...) get a trailing pair when their inputs were quantized. Test-checked against
# the pass classes so a coremltools upgrade that changes them fails loudly.
ACTIVATION_OP_TYPES = ("conv", "avg_pool", "max_pool", "linear", "add")


def _samples(func, sample_data) -> list[dict[str, Any]]:
    """Copies of ``sample_data`` keyed by input name (a ``None`` key names a single-input model's input)."""
    if isinstance(sample_data, Mapping) or not isinstance(sample_data, Sequence) or not sample_data:
        raise ConfigError("expected a non-empty list of input dicts (one per calibration sample)", "sample_data")
    names = list(func.inputs)
    out = []
    for i, sample in enumerate(sample_data):
        if not isinstance(sample, Mapping):
            raise ConfigError(f"expected a dict of inputs, got {type(sample).__name__}", f"sample_data[{i}]")
        sample = dict(sample)  # never rename keys in the caller's dict (coremltools does)
        if None in sample:
            if len(sample) > 1 or len(names) > 1:
                raise ConfigError("a None key is only allowed for a single-input model; name each input "
                                  f"(inputs: {names})", f"sample_data[{i}]")
            sample = {names[0]: sample.pop(None)}
        unknown = sorted(set(sample) - set(names))
        missing = sorted(set(names) - set(sample))
        if unknown or missing:
            hint = did_you_mean(unknown[0], names) if unknown else ""
            raise ConfigError(f"inputs do not match the model: unknown {unknown}, missing {missing}{hint} "
                              f"(inputs: {names})", f"sample_data[{i}]")
        out.append({k: np.asarray(v) for k, v in sample.items()})
    return out


def _update(stats: dict, name: str, value: np.ndarray) -> None:
    if value.size == 0:
        return
    lo, hi = float(np.min(value)), float(np.max(value))
    if name in stats:
        lo, hi = min(lo, stats[name]["rmin"]), max(hi, stats[name]["rmax"])
    stats[name] = {"rmin": lo, "rmax": hi}


def activation_ranges(mlmodel, sample_data: Sequence[Mapping[str | None, np.ndarray]], *,
                      function: str = "main") -> dict[str, dict[str, float]]:
    """Observed ``{"rmin", "rmax"}`` of every tensor coremltools' calibration records, by name.

    ``mlmodel``: an ``MLModel``, an ``.mlpackage`` path or a loaded ``Program``.
    ``sample_data``: a list of input dicts (input name -> array of the declared shape; a
    ``None`` key is accepted for a single-input model). Each sample is run with the numpy
    runner (fp16 programs rounded after every op, as on device).

    Recorded, as coremltools records them: the model inputs (from the raw sample values) and
    the output of every non-``const`` op except the function's outputs (bool and string
    tensors skipped); the inputs and output of each ``concat`` then share their group's
    widest range (coremltools' ``_adjust_concat_surrounding_activation_stats``). The range is
    the min/max over *all* samples (coremltools 9.0's own recorder keeps only the last
    sample's range: it overwrites before taking the min/max; a bug, not a contract).

    Returns coremltools' ``activation_stats`` format: ``{tensor: {"rmin": float, "rmax": float}}``.
    """
    from coremltools.converters.mil.mil import types
    from coremltools.optimize import _utils as optimize_utils

    program = load_program(mlmodel)
    if function not in program.functions:
        raise ConfigError(f"no function {function!r} in the program (has {sorted(program.functions)})", "function")
    func = program.functions[function]
    samples = _samples(func, sample_data)
    outputs = {var.name for var in func.outputs}
    observed = []
    for op in func.operations:
        if op.op_type == "const":
            continue
        for var in op.outputs:
            dtype = var.dtype
            if var.name in outputs or dtype is None or types.is_str(dtype) or types.is_bool(dtype):
                continue
            observed.append(var.name)

    stats: dict[str, dict[str, float]] = {}
    for sample in samples:
        for name, value in sample.items():
            _update(stats, name, value)
        env = run(program, sample, function=function, intermediates=True)
        for name in observed:
            _update(stats, name, env[name])

    concats = []
    for op in func.operations:
        if op.op_type == "concat" and op.outputs[0].name not in outputs:
            concats.append([v.name for v in op.inputs["values"]] + [op.outputs[0].name])
    if concats:
        optimize_utils._adjust_concat_surrounding_activation_stats(concats, stats)
    return stats


def _check_config(ct_config, program) -> None:
    """Refuse op type and op name keys that select nothing, and codes other than 8-bit."""
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig

    if not isinstance(ct_config, OptimizationConfig):
        raise ConfigError(f"expected a coremltools OptimizationConfig, got {type(ct_config).__name__}", "config")
    op_names = {op.name for f in program.functions.values() for op in f.operations}
    for key in dict(ct_config.op_type_configs):
        if key not in ACTIVATION_OP_TYPES:
            raise ConfigError(f"activation quantization applies to op types {list(ACTIVATION_OP_TYPES)}, "
                              f"not {key!r}{did_you_mean(key, ACTIVATION_OP_TYPES)}", f"op_type_configs.{key}")
    for key in dict(ct_config.op_name_configs):
        if key not in op_names:
            raise ConfigError(f"no op named {key!r} in the model{did_you_mean(key, op_names)}",
                              f"op_name_configs.{key}")
    configs = [("global_config", ct_config.global_config)]
    configs += [(f"op_type_configs.{k}", v) for k, v in ct_config.op_type_configs.items()]
    configs += [(f"op_name_configs.{k}", v) for k, v in ct_config.op_name_configs.items()]
    for where, op_config in configs:
        if op_config is not None and not isinstance(op_config, OpLinearQuantizerConfig):
            raise ConfigError(f"expected an OpLinearQuantizerConfig, got {type(op_config).__name__}", where)
        if op_config is not None and getattr(op_config, "nbits", 8) != 8:
            raise ConfigError(f"activations are quantized to int8 or uint8 only, got {op_config.nbits}-bit dtype",
                              f"{where}.dtype")


def _scale_check_pass() -> Any:
    """A graph pass run after coremltools' two: refuse a zero or non-finite activation scale.

    A tensor whose calibration range is [0, 0] (a dead relu) or overflowed fp16 would get
    such a scale from coremltools' math and compute NaN on device.
    """
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass

    class _CheckActivationScales(AbstractGraphPass):
        def apply(self, prog) -> None:
            for func in prog.functions.values():
                for op in func.operations:
                    if op.op_type != "quantize":
                        continue
                    scale = np.asarray(op.scale.val, dtype=np.float64)
                    if not np.all(np.isfinite(scale)) or np.any(scale == 0):
                        tensor = op.input  # a pair may read another pair's dequantize: name the float tensor
                        while tensor.op is not None and tensor.op.op_type == "dequantize":
                            tensor = tensor.op.input.op.input
                        raise QuantizationError(
                            f"activation scale {scale.tolist()} for tensor {tensor.name!r} (quantize op "
                            f"{op.name!r}): its calibration range is empty or not finite; give sample_data "
                            f"that exercises it, or exclude its consumer with op_name_configs={{name: None}}")

    return _CheckActivationScales()


def _passes(config, activation_stats) -> list:
    """coremltools' pass sequence and options of its ``linear_quantize_activations``, plus our scale check.

    The registry hands out a fresh pass object per lookup, so no state leaks between calls.
    """
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    passes = []
    for name in ("compression::insert_prefix_quantize_dequantize_pair",
                 "compression::insert_suffix_quantize_dequantize_pair"):
        graph_pass = PASS_REGISTRY[name]
        graph_pass.set_options([PassOption("config", config)])
        graph_pass.set_options([PassOption("activation_stats", activation_stats)])
        passes.append(graph_pass)
    passes.append(PASS_REGISTRY["common::dequantize_quantize_pair_elimination"])
    passes.append(_scale_check_pass())
    return passes


def insert_quantize_dequantize(mlmodel, config, activation_stats: Mapping[str, Mapping[str, float]]) -> Any:
    """Insert coremltools' activation ``quantize``/``dequantize`` pairs using given ranges; returns a new ``MLModel``.

    ``activation_stats``: ``{tensor: {"rmin", "rmax"}}`` as :func:`activation_ranges` returns
    (or measured elsewhere, e.g. on a device); it must cover every tensor the passes quantize
    (a ``KeyError`` from coremltools names a missing one). ``config`` as in
    :func:`linear_quantize_activations`. Then coremltools' default MIL pipeline runs on the
    result, as in coremltools: it folds ``dequantize -> reshape -> quantize`` into an int8
    reshape and rescales the inputs of quantized ``add`` ops
    (``distributive_quantized_binary_op_scale_normalization``), so stored scales can differ
    from the calibrated ones while computing the same values.
    """
    from coremltools import _SPECIFICATION_VERSION_IOS_17
    from coremltools.converters.mil.frontend.milproto import load as milproto_load
    from coremltools.models import utils as model_utils

    mlmodel = load_mlmodel(mlmodel)
    if mlmodel.get_spec().WhichOneof("Type") != "mlProgram":
        raise ConfigError("activation quantization needs an ML program (convert_to='mlprogram')", "mlmodel")
    program = load_program(mlmodel)
    if len(program.functions) > 1:  # the passes would need ranges for every function
        raise ConfigError(f"multi-function models are not supported (functions: {sorted(program.functions)})",
                          "mlmodel")
    _check_config(config, program)
    stats = {str(k): {"rmin": float(v["rmin"]), "rmax": float(v["rmax"])} for k, v in activation_stats.items()}
    try:
        return model_utils._apply_graph_pass(mlmodel, _passes(config, stats),
                                             spec_version=_SPECIFICATION_VERSION_IOS_17,
                                             pymil_load_func=milproto_load.load,
                                             skip_model_load=mlmodel.__proxy__ is None)
    except ValueError as e:
        # coremltools' quantize op refuses a zero scale without naming the tensor: name the candidates.
        if "scale cannot be 0" not in str(e):
            raise
        empty = sorted(name for name, r in stats.items()
                       if np.float16(max(abs(np.float16(r["rmin"])), abs(np.float16(r["rmax"]))) / 127.0) == 0)
        raise QuantizationError(
            f"an activation scale is 0 ({e}): the calibration range is empty for tensors {empty}; give "
            f"sample_data that exercises them, or exclude the ops around them with op_name_configs={{name: None}}"
        ) from e


def linear_quantize_activations(mlmodel, config, sample_data: Sequence[Mapping[str | None, np.ndarray]]) -> Any:
    """Quantize the activations of a Core ML model to 8 bits; returns a new ``MLModel``.

    ``mlmodel``: an ML program ``MLModel`` or ``.mlpackage`` path (not modified).
    ``config``: a *coremltools* ``OptimizationConfig`` whose op configs are
    ``OpLinearQuantizerConfig`` (or the experimental ``OpActivationLinearQuantizerConfig``):
    ``mode`` linear_symmetric/linear and ``dtype`` int8/uint8 are used; granularity,
    block_size and weight_threshold are ignored (activations are quantized per tensor).
    ``quanta.compat.coreml.experimental.linear_quantize_activations`` builds one from quanta's
    compat configs. ``sample_data``: see :func:`activation_ranges`.

    :func:`activation_ranges` then :func:`insert_quantize_dequantize`. The result targets
    iOS17 or later (a lower-target model's spec is raised to iOS17, as coremltools does).
    Raises ``ConfigError`` for op type keys other than :data:`ACTIVATION_OP_TYPES`, op names not
    in the model, non-8-bit dtypes, malformed samples and multi-function models;
    ``QuantizationError`` when a tensor's calibrated scale is zero or not finite.
    """
    mlmodel = load_mlmodel(mlmodel)
    program = load_program(mlmodel)
    _check_config(config, program)  # before the (slow) calibration
    return insert_quantize_dequantize(mlmodel, config, activation_ranges(program, sample_data))
