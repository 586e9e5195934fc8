"""W8A8 for existing Core ML models on Linux: ``cto.coreml.experimental.linear_quantize_activations``.

Calibration runs the numpy runner; the quantize/dequantize insertion is coremltools' own pass.
Checked here: the seed snippet end to end (W8A8 within tolerance of the float program, and not
equal to it), the same graph as coremltools' own function given the same ranges, scales and
zero points equal to coremltools' formula (and a plain float64 one), the ranges against an
independent run and coremltools' list of observed tensors, and config errors naming the key.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")

import quanta.compat as cto  # noqa: E402
from quanta.errors import ConfigError, QuantizationError  # noqa: E402
from quanta.plugins.coreml import activations  # noqa: E402
from quanta.mil.program import load_program  # noqa: E402
from quanta.mil.runner import compare, run  # noqa: E402

W8A8_REL = 0.06  # max |diff| / max |ref| of W8A8 vs the float program (measured 0.010-0.030 over 6 seeds)


class CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.nn.functional.max_pool2d(x + torch.relu(self.c2(x)), 2)
        return self.fc(torch.flatten(x, 1))


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.fc3(torch.nn.functional.gelu(self.fc2(torch.relu(self.fc1(x)))))


# The producers of the tensors coremltools quantizes: every non-const input of conv/linear/
# pool/add, and the outputs of those ops (after a following relu/sigmoid/... if any) when
# another op reads them. The model output stays float.
EXPECTED_QUANTIZED = {"cnn": ["add", "input", "max_pool", "relu", "relu"], "mlp": ["gelu", "input", "linear", "relu"]}


def _convert(module, shape):
    module = module.eval()
    x = torch.randn(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, x)
    return ct.convert(traced, inputs=[ct.TensorType(shape=x.shape)], minimum_deployment_target=ct.target.iOS17)


@pytest.fixture(scope="module", params=["cnn", "mlp"])
def case(request):
    torch.manual_seed(0)
    module, shape = {"cnn": (CNN(), (1, 3, 8, 8)), "mlp": (MLP(), (1, 32))}[request.param]
    model = _convert(module, shape)
    name = next(iter(load_program(model).functions["main"].inputs))
    rng = np.random.default_rng(0)
    # 32 samples: with fewer, held-out inputs often fall outside the calibrated input range
    # and get clipped (6 samples gave up to 35% max_rel on the MLP, 32 give < 3%).
    samples = [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(32)]
    held_out = [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(4)]
    return request.param, model, samples, held_out


def _activation_config(**kwargs):
    return cto.coreml.OptimizationConfig(
        global_config=cto.coreml.experimental.OpActivationLinearQuantizerConfig(**kwargs))


def _ops(model_or_program):
    program = model_or_program if hasattr(model_or_program, "functions") else load_program(model_or_program)
    return list(program.functions["main"].operations)


def _producer(var):
    return "input" if var.op is None else var.op.op_type


def _qparams(op):
    zp = None if op.zero_point is None else np.asarray(op.zero_point.val)
    return np.asarray(op.scale.val), zp


# ---------------------------------------------------------------- the seed snippet, end to end


def test_seed_snippet_gives_w8a8(case):
    kind, model, sample_data, held_out = case
    spec_before = model.get_spec().SerializeToString()

    activation_config = cto.coreml.OptimizationConfig(
        global_config=cto.coreml.experimental.OpActivationLinearQuantizerConfig(mode="linear_symmetric"))
    compressed_model_a8 = cto.coreml.experimental.linear_quantize_activations(model, activation_config, sample_data)
    op_config = cto.coreml.OpLinearQuantizerConfig(mode="linear_symmetric", weight_threshold=512)
    config = cto.coreml.OptimizationConfig(global_config=op_config)
    w8a8 = cto.coreml.linear_quantize_weights(compressed_model_a8, config=config)

    assert isinstance(compressed_model_a8, ct.models.MLModel)
    assert model.get_spec().SerializeToString() == spec_before  # the input model is untouched
    assert not {"quantize", "dequantize"} & {op.op_type for op in _ops(model)}

    for m in (compressed_model_a8, w8a8):
        ops = _ops(m)
        quantized = sorted(_producer(op.input) for op in ops if op.op_type == "quantize")
        assert quantized == EXPECTED_QUANTIZED[kind]
        for op in ops:  # every data input of a quantizable op is dequantized int8
            if op.op_type in activations.ACTIVATION_OP_TYPES:
                for key in ("x", "y") if op.op_type == "add" else ("x",):
                    assert _producer(op.inputs[key]) == "dequantize", (op.name, key)
        assert all(str(op.output_dtype.val) == "int8" for op in ops if op.op_type == "quantize")
    weights = [op for op in _ops(w8a8) if op.op_type == "constexpr_affine_dequantize"]
    assert weights and all(op.quantized_data.val.dtype == np.int8 for op in weights)
    assert len(weights) == (2 if kind == "cnn" else 3)  # c1 (216 elements) stays float

    program, w8a8_program = load_program(model), load_program(w8a8)
    worst = 0.0
    for sample in held_out:
        (ref,) = run(program, sample).values()
        (got,) = run(w8a8_program, sample).values()
        stats = compare(got, ref)
        assert stats["max_rel"] < W8A8_REL and stats["cosine"] > 0.999, stats
        worst = max(worst, stats["max_abs"])
    assert worst > 0  # quantization happened


def test_package_path_and_none_key_and_callers_dict_unchanged(case, tmp_path):
    _, model, sample_data, _ = case
    path = tmp_path / "model.mlpackage"
    model.save(str(path))
    samples = [{None: s[next(iter(s))]} for s in sample_data[:2]]
    out = cto.coreml.experimental.linear_quantize_activations(str(path), _activation_config(), samples)
    assert all(list(s) == [None] for s in samples)  # coremltools renames the caller's keys; quanta copies
    assert any(op.op_type == "quantize" for op in _ops(out))
    assert not any(op.op_type == "quantize" for op in _ops(path))


# ---------------------------------------------------------------- parity with coremltools


def test_same_graph_as_coremltools_given_the_same_ranges(case, monkeypatch):
    """coremltools' own linear_quantize_activations, its macOS calibration replaced by our ranges."""
    from coremltools.optimize.coreml import _post_training_quantization as ct_ptq

    _, model, sample_data, _ = case
    sample_data = sample_data[:8]
    for mode in ("linear_symmetric", "linear"):
        stats = activations.activation_ranges(model, sample_data)
        monkeypatch.setattr(ct_ptq, "_get_activation_calibration_stats", lambda *a, **k: copy.deepcopy(stats))
        ct_config = ct.optimize.coreml.OptimizationConfig(
            global_config=ct.optimize.coreml.OpLinearQuantizerConfig(mode=mode))
        theirs = _ops(ct.optimize.coreml.linear_quantize_activations(model, ct_config, sample_data))
        ours = _ops(cto.coreml.experimental.linear_quantize_activations(model, _activation_config(mode=mode),
                                                                         sample_data))
        assert [op.op_type for op in ours] == [op.op_type for op in theirs]
        for a, b in zip(ours, theirs):
            assert sorted(a.inputs) == sorted(b.inputs)
            assert [_producer(v) for k, v in sorted(a.inputs.items()) if not isinstance(v, (list, tuple))] == \
                   [_producer(v) for k, v in sorted(b.inputs.items()) if not isinstance(v, (list, tuple))]
            if a.op_type in ("quantize", "dequantize"):
                (sa, za), (sb, zb) = _qparams(a), _qparams(b)
                assert sa.dtype == sb.dtype and np.array_equal(sa, sb)
                assert (za is None) == (zb is None) and (za is None or np.array_equal(za, zb))


def test_activation_op_types_are_coremltools_own():
    from coremltools.optimize.coreml._quantization_passes import insert_prefix_quantize_dequantize_pair as prefix

    assert sorted(activations.ACTIVATION_OP_TYPES) == sorted(prefix.SUPPORTED_OP_TYPES)


def _reference_qparams(rmin, rmax, mode, dtype):
    """Plain float64 qparams for the fp16-rounded range, coremltools' conventions."""
    lo, hi = float(np.float16(rmin)), float(np.float16(rmax))
    if mode == "linear_symmetric":
        qmin, qmax = (-127, 127) if dtype == "int8" else (0, 254)
        m = max(abs(lo), abs(hi))
        return m * 2 / (qmax - qmin), (None if dtype == "int8" else 127)
    qmin, qmax = (-128, 127) if dtype == "int8" else (0, 255)
    lo, hi = min(0.0, lo), max(0.0, hi)
    return (hi - lo) / (qmax - qmin), int(np.clip(np.round((qmin * hi - qmax * lo) / (hi - lo)), qmin, qmax))


@pytest.mark.parametrize("mode,dtype", [("linear_symmetric", "int8"), ("linear", "int8"),
                                        ("linear_symmetric", "uint8")])
def test_scales_follow_coremltools_formula(case, mode, dtype):
    """Right after the insertion passes (before coremltools' default pipeline rescales adds),
    each quantize op's scale and zero point are coremltools' formula on its tensor's range."""
    from coremltools.converters.mil.frontend.milproto import load as milproto_load
    from coremltools.converters.mil.mil import types
    from coremltools.models import utils as model_utils
    from coremltools.optimize import _utils as optimize_utils

    from quanta.compat.coreml import _activation_config as to_coremltools_config

    _, model, sample_data, _ = case
    stats = activations.activation_ranges(model, sample_data[:8])
    config = to_coremltools_config(_activation_config(mode=mode, dtype=dtype))
    program = model_utils._apply_graph_pass(model, activations._passes(config, stats), spec_version=8,
                                            pymil_load_func=milproto_load.load, return_pymil_prog=True)
    quantize_ops = [op for op in program.functions["main"].operations if op.op_type == "quantize"]
    assert quantize_ops
    for op in quantize_ops:
        source = op.input  # a prefix pair may now read a suffix pair's dequantize: same float tensor
        while source.op is not None and source.op.op_type == "dequantize":
            source = source.op.input.op.input
        r = stats[source.name]
        scale, zp = _qparams(op)
        assert scale.dtype == np.float16 and str(op.output_dtype.val) == dtype
        _, ct_scale, ct_zp = optimize_utils.quantize_weight_by_dtype(
            np.array([r["rmin"], r["rmax"]], dtype=np.float16), 0, types.string_to_builtin(dtype), mode.upper())
        assert scale == ct_scale.astype(np.float16), op.input.name
        ref_scale, ref_zp = _reference_qparams(r["rmin"], r["rmax"], mode, dtype)
        assert abs(float(scale) - ref_scale) <= np.spacing(np.float16(ref_scale)), (op.input.name, scale, ref_scale)
        if ref_zp is None:  # the prefix pass stores no zero point, the suffix pass a zero one
            assert zp is None or zp == 0
        else:
            assert zp == ref_zp and zp == (ct_zp if ct_zp is not None else 0), (op.input.name, zp, ref_zp)
        # every dequantize reading this op undoes it with the same parameters
        for child in op.outputs[0].child_ops:
            if child.op_type == "dequantize":
                s2, z2 = _qparams(child)
                assert s2 == scale and (z2 is None) == (zp is None) and (zp is None or z2 == zp)


# ---------------------------------------------------------------- calibration


def test_activation_ranges_cover_coremltools_tensors_over_all_samples(case):
    from coremltools.optimize.coreml.experimental._model_debugger import ModelDebugger

    _, model, sample_data, _ = case
    stats = activations.activation_ranges(model, sample_data)
    debugger = ModelDebugger(model)
    expected = set(debugger.get_intermediate_output_names(lambda op: op.spec.type != "const")) | set(sample_data[0])
    assert set(stats) == expected

    program = load_program(model)
    runs = [run(program, s, intermediates=True) for s in sample_data]
    for name, r in stats.items():
        values = [s[name] for s in sample_data] if name in sample_data[0] else [env[name] for env in runs]
        assert r["rmin"] == min(float(v.min()) for v in values)
        assert r["rmax"] == max(float(v.max()) for v in values)
    # the union over samples is wider than any one sample's range somewhere
    last = activations.activation_ranges(model, sample_data[-1:])
    assert any(stats[n]["rmax"] > last[n]["rmax"] or stats[n]["rmin"] < last[n]["rmin"] for n in stats)


def test_coremltools_recorder_keeps_only_the_last_sample():
    """Why quanta does not reuse coremltools 9.0's recorder: it overwrites before min/max.
    If this starts failing, coremltools fixed it and the docs' note can go."""
    from collections import defaultdict

    from coremltools.optimize import _utils as optimize_utils

    stats = defaultdict(dict)
    optimize_utils._update_tensor_range("t", np.array([-5.0, 5.0]), stats)
    optimize_utils._update_tensor_range("t", np.array([-1.0, 1.0]), stats)
    assert stats["t"] == {"rmin": -1.0, "rmax": 1.0}


def test_dead_activation_raises_naming_the_tensor():
    """A tensor that is 0 on every sample gets scale 0 (and a 0/0 zero point in linear mode)
    from coremltools' math, NaN on device; quanta refuses it, naming the tensor."""
    torch.manual_seed(0)
    module = MLP()
    with torch.no_grad():
        module.fc1.bias.fill_(-100.0)  # relu(fc1(x)) == 0 for every sample
    model = _convert(module, (1, 32))
    name = next(iter(load_program(model).functions["main"].inputs))
    samples = [{name: np.random.default_rng(1).standard_normal((1, 32)).astype(np.float32)}]
    relu = next(op for op in _ops(model) if op.op_type == "relu")
    with pytest.raises(QuantizationError, match="calibration range") as info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy's 0/0 inside coremltools' zero-point math
            cto.coreml.experimental.linear_quantize_activations(model, _activation_config(mode="linear"), samples)
    assert relu.outputs[0].name in str(info.value)
    # excluding the ops around it, by name, is the way out
    config = _activation_config(mode="linear")
    around = {relu.inputs["x"].name, relu.outputs[0].name}
    for op in _ops(model):
        if op.op_type == "linear" and (op.outputs[0].name in around or op.inputs["x"].name in around):
            config.set_op_name(op.name, None)
    assert len(config.op_name_configs) == 2
    out = cto.coreml.experimental.linear_quantize_activations(model, config, samples)
    assert sum(op.op_type == "quantize" for op in _ops(out)) >= 1


def test_given_ranges_are_used_and_non_finite_ones_refused(case):
    """insert_quantize_dequantize takes ranges measured elsewhere; an overflowed range is refused."""
    _, model, sample_data, _ = case
    stats = activations.activation_ranges(model, sample_data[:4])
    config = ct.optimize.coreml.OptimizationConfig(global_config=ct.optimize.coreml.OpLinearQuantizerConfig())
    name = next(iter(sample_data[0]))
    wide = dict(stats, **{name: {"rmin": -12.7, "rmax": 3.0}})
    out = activations.insert_quantize_dequantize(model, config, wide)
    first = next(op for op in _ops(out) if op.op_type == "quantize" and op.input.name == name)
    assert first.scale.val == np.float16(float(np.float16(12.7)) / 127)  # the range is rounded to fp16 first
    with pytest.raises(QuantizationError, match=f"{name}.*calibration range"):
        activations.insert_quantize_dequantize(model, config, dict(stats, **{name: {"rmin": -np.inf, "rmax": 1.0}}))


# ---------------------------------------------------------------- configs


def test_op_type_and_name_configs_select_ops(case):
    kind, model, sample_data, _ = case
    config = _activation_config()
    config.set_op_type("linear", None)
    out = _ops(cto.coreml.experimental.linear_quantize_activations(model, config, sample_data[:2]))
    assert all(_producer(op.inputs["x"]) != "dequantize" for op in out if op.op_type == "linear")
    assert (kind == "mlp") == (not any(op.op_type == "quantize" for op in out))


def test_bad_config_keys_raise_naming_them(case):
    _, model, sample_data, _ = case
    exp = cto.coreml.experimental
    with pytest.raises(TypeError, match="nbits"):
        exp.OpActivationLinearQuantizerConfig(mode="linear_symmetric", nbits=8)
    with pytest.raises(ConfigError, match="n_bits"):
        exp.OpActivationLinearQuantizerConfig.from_dict({"mode": "linear", "n_bits": 8})
    with pytest.raises(ConfigError, match="mode"):
        exp.OpActivationLinearQuantizerConfig(mode="kmeans")
    with pytest.raises(ConfigError, match="dtype"):
        exp.OpActivationLinearQuantizerConfig(dtype="int4")
    with pytest.raises(ConfigError, match="granularity"):
        exp.OpActivationLinearQuantizerConfig(granularity="per_row")
    with pytest.raises(ConfigError, match="weight_threshold"):
        exp.OpActivationLinearQuantizerConfig(weight_threshold=-1)
    assert exp.OpActivationLinearQuantizerConfig(mode="LINEAR", dtype=np.uint8).dtype == "uint8"

    def quantize(config, data=sample_data[:1]):
        return exp.linear_quantize_activations(model, config, data)

    with pytest.raises(ConfigError, match="global_confg.*global_config"):
        quantize({"global_confg": {"mode": "linear"}})
    with pytest.raises(ConfigError, match="op_type_configs.linear.nbits"):
        quantize({"global_config": {}, "op_type_configs": {"linear": {"nbits": 8}}})
    with pytest.raises(ConfigError, match="op_type_configs.Linear.*'linear'"):
        quantize(cto.coreml.OptimizationConfig(op_type_configs={"Linear": exp.OpActivationLinearQuantizerConfig()}))
    with pytest.raises(ConfigError, match="op_name_configs.no_such_op"):
        quantize(cto.coreml.OptimizationConfig(op_name_configs={"no_such_op": None}))
    with pytest.raises(ConfigError, match="global_config.dtype"):  # coremltools' own weight config, 4-bit
        quantize(ct.optimize.coreml.OptimizationConfig(
            global_config=ct.optimize.coreml.OpLinearQuantizerConfig(dtype="int4")))
    with pytest.raises(ConfigError, match="global_config.dtype"):  # quanta's weight config, 4-bit
        quantize(cto.coreml.OptimizationConfig(global_config=cto.coreml.OpLinearQuantizerConfig(dtype="int4")))
    with pytest.raises(ConfigError, match="calibration_op_group_size"):
        exp.linear_quantize_activations(model, _activation_config(), sample_data, calibration_op_group_size=0)
    name = next(iter(sample_data[0]))
    with pytest.raises(ConfigError, match=r"sample_data\[0\].*'wrong'"):
        quantize(_activation_config(), [{"wrong": sample_data[0][name]}])
    with pytest.raises(ConfigError, match="sample_data"):
        quantize(_activation_config(), [])
