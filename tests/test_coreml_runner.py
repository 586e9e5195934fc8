"""The numpy Core ML runner against torch: real conversions saved to disk and run on Linux,
plus single ops built with the MIL Builder and checked against torch.nn.functional."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")

import torch.nn.functional as F  # noqa: E402
from coremltools.converters.mil import Builder as mb  # noqa: E402

from quanta.mil.program import (  # noqa: E402
    CompressedWeight,
    load_program,
    read_compressed_weights,
)
from quanta.mil.runner import (  # noqa: E402
    UnsupportedOpError,
    compare,
    run,
    supported_ops,
)

FP16_REL = 1e-2  # max |diff| / max |ref| after an fp16 program (measured: ~1e-3)
FP32_REL = 1e-5


# ---------------------------------------------------------------- helpers


def _convert(model, x, tmp_path, name, target, precision=None, fp32_io=True):
    """Trace, convert and save ``model``; return the package path."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x)
    kwargs = {}
    if precision is not None:
        kwargs["compute_precision"] = precision
    if fp32_io:  # iOS16+ defaults both ends to fp16
        kwargs["inputs"] = [ct.TensorType(name="x", shape=x.shape, dtype=np.float32)]
        kwargs["outputs"] = [ct.TensorType(name="y", dtype=np.float32)]
    else:
        kwargs["inputs"] = [ct.TensorType(name="x", shape=x.shape)]
    mlmodel = ct.convert(
        traced,
        convert_to="mlprogram",
        minimum_deployment_target=target,
        **kwargs,
    )
    path = tmp_path / f"{name}.mlpackage"
    mlmodel.save(str(path))
    return path


def _op_types(path_or_program):
    return {op.op_type for op in load_program(path_or_program).functions["main"].operations}


def _run_one(path, x):
    out = run(path, {"x": x.numpy()})
    assert len(out) == 1
    return next(iter(out.values()))


def _check(path, model, x, rel):
    with torch.no_grad():
        ref = model(x).numpy()
    got = _run_one(path, x)
    stats = compare(got, ref)
    assert stats["max_rel"] < rel, stats
    assert stats["cosine"] > 0.9999, stats
    return got, ref


# ---------------------------------------------------------------- models


class MLP(torch.nn.Module):
    def __init__(self, d_in=64, hidden=64, d_out=16):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, hidden)
        self.fc2 = torch.nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.fc = torch.nn.Linear(8 * 2 * 2, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 2, 2)
        x = torch.sigmoid(self.conv2(x))
        x = F.avg_pool2d(x, 2, 2)
        return self.fc(x.flatten(1))


class EncoderBlock(torch.nn.Module):
    """Pre-norm transformer encoder block written out by hand."""

    def __init__(self, d=32, heads=4, use_sdpa=False):
        super().__init__()
        self.heads, self.use_sdpa = heads, use_sdpa
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.ff1, self.ff2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.heads
        y = self.ln1(x)
        q, k, v = (m(y).reshape(b, t, h, d // h).transpose(1, 2) for m in (self.q, self.k, self.v))
        if self.use_sdpa:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


class W8A8Linear(torch.nn.Module):
    """Activation fake-quant (uint8, per tensor) in front of a linear layer."""

    def __init__(self, scale=0.05, zero_point=128):
        super().__init__()
        self.scale, self.zero_point = scale, zero_point
        self.fc = torch.nn.Linear(16, 8)

    def forward(self, x):
        x = torch.quantize_per_tensor(x, self.scale, self.zero_point, torch.quint8).dequantize()
        return self.fc(x)


PRECISIONS = pytest.mark.parametrize(
    "precision,rel",
    [(None, FP16_REL), ("fp32", FP32_REL)],
    ids=["fp16", "fp32"],
)


def _precision(name):
    return ct.precision.FLOAT32 if name == "fp32" else None


# ---------------------------------------------------------------- converted models


@PRECISIONS
def test_mlp(tmp_path, precision, rel):
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 64)
    path = _convert(model, x, tmp_path, "mlp", ct.target.iOS17, _precision(precision))
    got, _ = _check(path, model, x, rel)
    assert got.dtype == np.float32  # fp32 I/O requested; an fp16 program casts at the ends
    assert list(run(path, {"x": x.numpy()})) == ["y"]


@PRECISIONS
def test_cnn(tmp_path, precision, rel):
    torch.manual_seed(0)
    model, x = CNN(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # non-trivial batch-norm statistics
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
    path = _convert(model, x, tmp_path, "cnn", ct.target.iOS17, _precision(precision))
    assert {"conv", "relu", "max_pool", "avg_pool", "reshape", "linear"} <= _op_types(path)
    _check(path, model, x, rel)


@pytest.mark.parametrize(
    "target,use_sdpa",
    [("iOS17", False), ("iOS18", True)],
    ids=["iOS17-matmul", "iOS18-sdpa"],
)
@PRECISIONS
def test_transformer_block(tmp_path, target, use_sdpa, precision, rel):
    torch.manual_seed(0)
    model, x = EncoderBlock(use_sdpa=use_sdpa), torch.randn(2, 10, 32)
    path = _convert(model, x, tmp_path, "block", getattr(ct.target, target), _precision(precision))
    ops = _op_types(path)
    assert {"layer_norm", "linear", "gelu", "add", "reshape", "transpose"} <= ops
    assert ("scaled_dot_product_attention" in ops) == use_sdpa
    if not use_sdpa:
        assert {"matmul", "softmax"} <= ops
    _check(path, model, x, rel)


class EmbeddingBag(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))


def test_embedding_with_int_input(tmp_path):
    torch.manual_seed(0)
    model, ids = EmbeddingBag().eval(), torch.randint(0, 50, (2, 7))
    traced = torch.jit.trace(model, ids)
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(name="x", shape=ids.shape, dtype=np.int32)],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS17,
    )
    assert "gather" in _op_types(mlmodel)
    got = next(iter(run(mlmodel, {"x": ids.numpy()}).values()))
    with torch.no_grad():
        ref = model(ids).numpy()
    assert compare(got, ref)["max_rel"] < FP16_REL


def test_fp16_io_and_in_memory_model(tmp_path):
    """Default iOS16+ I/O is fp16; an MLModel held in memory runs like its saved package."""
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 64)
    model.eval()
    traced = torch.jit.trace(model, x)
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(name="x", shape=x.shape)],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS17,
    )
    path = tmp_path / "m.mlpackage"
    mlmodel.save(str(path))
    from_memory = run(mlmodel, {"x": x.numpy()})
    from_disk = run(path, {"x": x.numpy()})
    assert from_memory.keys() == from_disk.keys()
    for name in from_disk:
        assert from_disk[name].dtype == np.float16
        np.testing.assert_array_equal(from_memory[name], from_disk[name])
    with torch.no_grad():
        ref = model(x).numpy()
    assert compare(next(iter(from_disk.values())), ref)["max_rel"] < FP16_REL


def test_intermediates_are_rounded_to_declared_dtype(tmp_path):
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 64)
    path = _convert(model, x, tmp_path, "mlp", ct.target.iOS17)
    program = load_program(path)
    env = run(program, {"x": x.numpy()}, intermediates=True)
    ops = program.functions["main"].operations
    linear = next(op for op in ops if op.op_type == "linear")
    assert env[linear.outputs[0].name].dtype == np.float16
    assert env["x"].dtype == np.float32  # declared input dtype


# ---------------------------------------------------------------- compressed weights


def _ptq(model, config):
    from coremltools.optimize.torch.quantization import (
        PostTrainingQuantizer,
        PostTrainingQuantizerConfig,
    )

    return PostTrainingQuantizer(model, PostTrainingQuantizerConfig.from_dict(config)).compress()


def _expected_codes(module, block):
    """Integer codes coremltools derives from a compressed module: round(W / scale) + zp."""
    w = module.weight.detach().numpy().astype(np.float64)
    scale = getattr(module, "_COREML_/weight/quantization_scale").numpy().astype(np.float64)
    zp = getattr(module, "_COREML_/weight/zero_point", None)
    zp = 0.0 if zp is None else zp.numpy().astype(np.float64)
    if block > 1:
        scale = np.repeat(scale, block, axis=1)
        zp = np.repeat(zp, block, axis=1) if np.ndim(zp) else zp
    return (np.round(w / scale) + zp).astype(np.int64), w


def test_int8_per_channel_ios16(tmp_path):
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 64)
    quantized = _ptq(model, {"global_config": {"weight_dtype": "int8", "granularity": "per_channel"}})
    path = _convert(quantized, x, tmp_path, "int8", ct.target.iOS16)
    assert "constexpr_affine_dequantize" in _op_types(path)
    _check(path, quantized, x, FP16_REL)

    weights = read_compressed_weights(path)
    assert len(weights) == 2
    for record, module in zip(weights.values(), (quantized.fc1, quantized.fc2)):
        assert isinstance(record, CompressedWeight)
        assert record.op_type == "constexpr_affine_dequantize"
        assert record.dtype == "int8" and record.data.dtype == np.int8
        assert record.axis == 0 and record.scale.shape == (module.out_features,)
        codes, w = _expected_codes(module, block=1)
        np.testing.assert_array_equal(record.data.astype(np.int64), codes)
        np.testing.assert_array_equal(record.zero_point, 0)
        scale = getattr(module, "_COREML_/weight/quantization_scale").numpy()[:, 0]
        np.testing.assert_array_equal(record.scale, scale.astype(np.float16))
        dequant = record.data.astype(np.float64) * record.scale[:, None].astype(np.float64)
        assert np.max(np.abs(dequant - w)) <= 127 * scale.max() * 2.0**-11


@pytest.mark.parametrize("scheme", ["symmetric", "affine"])
def test_int4_per_block_ios18(tmp_path, scheme):
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 64)
    config = {"global_config": {"weight_dtype": "int4", "granularity": "per_block", "block_size": 32,
                                "quantization_scheme": scheme}}
    quantized = _ptq(model, config)
    path = _convert(quantized, x, tmp_path, "int4", ct.target.iOS18)
    assert "constexpr_blockwise_shift_scale" in _op_types(path)
    _check(path, quantized, x, FP16_REL)

    weights = read_compressed_weights(path)
    assert len(weights) == 2
    for record, module in zip(weights.values(), (quantized.fc1, quantized.fc2)):
        assert record.op_type == "constexpr_blockwise_shift_scale"
        assert record.dtype == "int4" and record.data.dtype == np.int8
        assert record.block_size == (1, 32)
        assert record.scale.shape == (module.out_features, module.in_features // 32)
        if scheme == "symmetric":
            assert record.zero_point is None  # all-zero offsets are not stored at iOS18
        else:
            zp = getattr(module, "_COREML_/weight/zero_point").numpy()
            assert record.zero_point.dtype == np.int8  # int4 offsets, held in int8
            np.testing.assert_array_equal(record.zero_point, zp)
        codes, _ = _expected_codes(module, block=32)
        np.testing.assert_array_equal(record.data.astype(np.int64), codes)
        assert record.data.min() >= -8 and record.data.max() <= 7


def test_w8a8_quantize_dequantize_ios17(tmp_path):
    torch.manual_seed(0)
    model, x = W8A8Linear(), torch.randn(32, 16)
    path = _convert(model, x, tmp_path, "w8a8", ct.target.iOS17, ct.precision.FLOAT32)
    assert {"quantize", "dequantize"} <= _op_types(path)
    got, ref = _check(path, model, x, FP32_REL)
    # The activation really went through 8 bits: without it the answer moves a lot.
    with torch.no_grad():
        unquantized = model.fc(x).numpy()
    assert compare(got, unquantized)["max_abs"] > 100 * compare(got, ref)["max_abs"]


# ---------------------------------------------------------------- single ops (MIL Builder)


def _program(shape, body, target=None):
    target = target or ct.target.iOS17

    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=target)
    def prog(x):
        return body(x)

    return prog


def _run_program(prog, x):
    return next(iter(run(prog, {"x": x}).values()))


CONV_CASES = [
    # (spatial, kwargs for mb.conv, torch padding)
    (1, dict(pad_type="valid", strides=[2], dilations=[1], groups=1), 0),
    (1, dict(pad_type="custom", pad=[2, 1], strides=[1], dilations=[2], groups=2), (2, 1)),
    (2, dict(pad_type="same", strides=[1, 1], dilations=[1, 1], groups=1), "same"),
    (2, dict(pad_type="same", strides=[2, 2], dilations=[1, 1], groups=1), "tf_same"),
    (2, dict(pad_type="custom", pad=[1, 0, 2, 1], strides=[2, 1], dilations=[1, 2], groups=4), (1, 0, 2, 1)),
]


@pytest.mark.parametrize("spatial,kwargs,padding", CONV_CASES)
def test_conv_matches_torch(spatial, kwargs, padding):
    rng = np.random.default_rng(0)
    groups = kwargs["groups"]
    shape = (2, 4) + (9,) * spatial
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((8, 4 // groups) + (3,) * spatial).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    got = _run_program(_program(shape, lambda v: mb.conv(x=v, weight=w, bias=b, **kwargs)), x)

    xt = torch.from_numpy(x)
    if isinstance(padding, tuple):  # (before, after) per dim -> F.pad order (last dim first)
        pairs = [padding[i : i + 2] for i in range(0, len(padding), 2)]
        xt = F.pad(xt, [p for pair in reversed(pairs) for p in pair])
        padding = 0
    elif padding == "tf_same":  # stride 2 "same": total pad 2*ceil(9/2)-2+3-9 = 2 per dim
        xt = F.pad(xt, [1, 1, 1, 1])
        padding = 0
    conv = F.conv1d if spatial == 1 else F.conv2d
    ref = conv(xt, torch.from_numpy(w), torch.from_numpy(b), stride=kwargs["strides"],
               padding=padding, dilation=kwargs["dilations"], groups=groups).numpy()
    assert compare(got, ref)["max_abs"] < 1e-4


@pytest.mark.parametrize("stride,pad,groups", [(2, 1, 1), (1, 0, 2), (3, 2, 2)])
def test_conv_transpose_matches_torch(stride, pad, groups):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 4, 5, 6)).astype(np.float32)
    w = rng.standard_normal((4, 6 // groups, 3, 3)).astype(np.float32)
    prog = _program(x.shape, lambda v: mb.conv_transpose(
        x=v, weight=w, pad_type="custom", pad=[pad] * 4, strides=[stride] * 2, groups=groups))
    got = _run_program(prog, x)
    ref = F.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(w), stride=stride,
                             padding=pad, groups=groups).numpy()
    assert compare(got, ref)["max_abs"] < 1e-4


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("exclude", [False, True])
def test_pools_match_torch(ceil_mode, exclude):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 3, 7, 8)).astype(np.float32)
    common = dict(kernel_sizes=[3, 3], strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1],
                  ceil_mode=ceil_mode)
    avg = _run_program(_program(x.shape, lambda v: mb.avg_pool(
        x=v, exclude_padding_from_average=exclude, **common)), x)
    mx = _run_program(_program(x.shape, lambda v: mb.max_pool(x=v, **common)), x)
    xt = torch.from_numpy(x)
    ref_avg = F.avg_pool2d(xt, 3, 2, 1, ceil_mode=ceil_mode, count_include_pad=not exclude)
    ref_max = F.max_pool2d(xt, 3, 2, 1, ceil_mode=ceil_mode)
    assert compare(avg, ref_avg.numpy())["max_abs"] < 1e-6
    assert compare(mx, ref_max.numpy())["max_abs"] == 0


def test_shape_ops():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 4)).astype(np.float32)

    def body(v):
        parts = mb.split(x=v, split_sizes=[2, 4], axis=1)
        s = mb.slice_by_index(x=parts[1], begin=[0, 1, 0], end=[2, 4, 3], stride=[1, 2, 1],
                              end_mask=[True, False, False], squeeze_mask=[False, False, False])
        e = mb.expand_dims(x=s, axes=[0])
        q = mb.squeeze(x=e, axes=[0])
        t = mb.transpose(x=q, perm=[2, 0, 1])
        c = mb.concat(values=[t, t], axis=2)
        return mb.tile(x=c, reps=[1, 1, 2])

    got = _run_program(_program(x.shape, body), x)
    s = x[:, 2:][:, 1:4:2, 0:3]
    ref = np.tile(np.concatenate([s.transpose(2, 0, 1)] * 2, axis=2), (1, 1, 2))
    np.testing.assert_array_equal(got, ref)


def test_slice_squeeze_and_gather():
    rng = np.random.default_rng(4)
    table = rng.standard_normal((10, 4)).astype(np.float32)
    x = rng.standard_normal((3, 5)).astype(np.float32)
    idx = np.array([[1, 9], [-1, 0]], dtype=np.int32)

    def body(v):
        row = mb.slice_by_index(x=v, begin=[1, 0], end=[2, 5], squeeze_mask=[True, False])
        emb = mb.gather(x=table, indices=idx, axis=0)
        return mb.add(x=mb.reduce_sum(x=emb, axes=[-1, -2], keep_dims=False), y=mb.reduce_mean(x=row, axes=[0]))

    got = _run_program(_program(x.shape, body), x)
    ref = table[np.where(idx < 0, idx + 10, idx)].sum(axis=(-1, -2)) + x[1].mean()
    assert compare(got, ref)["max_abs"] < 1e-5


@pytest.mark.parametrize("per_axis", [False, True])
@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_quantize_dequantize(per_axis, dtype):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2, 3, 4)) * 3).astype(np.float32)
    if per_axis:
        scale = np.array([0.02, 0.05, 0.1], dtype=np.float32)
        zp = np.array([0, 3, -5] if dtype == "int8" else [128, 120, 0], dtype=dtype)
        kw = dict(scale=scale, zero_point=zp, axis=1)
        s, z = scale.reshape(1, 3, 1), zp.astype(np.float64).reshape(1, 3, 1)
    else:
        scale, zp = np.float32(0.05), np.array(3 if dtype == "int8" else 128, dtype=dtype)
        kw = dict(scale=scale, zero_point=zp)
        s, z = np.float64(scale), np.float64(zp)
    info = np.iinfo(dtype)

    q_only = _program(x.shape, lambda v: mb.quantize(input=v, output_dtype=dtype, **kw))
    codes = _run_program(q_only, x)
    expected = np.clip(np.round(x / s) + z, info.min, info.max)
    assert codes.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(codes, expected.astype(dtype))

    roundtrip = _program(x.shape, lambda v: mb.dequantize(
        input=mb.quantize(input=v, output_dtype=dtype, **kw), **kw))
    np.testing.assert_allclose(_run_program(roundtrip, x), (expected - z) * s, rtol=1e-6)


def test_elementwise_and_activations():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    pos = np.abs(x) + 0.1
    checks = {
        "EXACT": (lambda v: mb.gelu(x=v, mode="EXACT"), F.gelu(torch.from_numpy(x)).numpy()),
        "TANH": (lambda v: mb.gelu(x=v, mode="TANH_APPROXIMATION"),
                 F.gelu(torch.from_numpy(x), approximate="tanh").numpy()),
        "SIGMOID": (lambda v: mb.gelu(x=v, mode="SIGMOID_APPROXIMATION"), x / (1 + np.exp(-1.702 * x))),
        "erf": (lambda v: mb.erf(x=v), torch.erf(torch.from_numpy(x)).numpy()),
        "tanh": (lambda v: mb.tanh(x=v), np.tanh(x)),
        "sigmoid": (lambda v: mb.sigmoid(x=v), 1 / (1 + np.exp(-x))),
        "softmax": (lambda v: mb.softmax(x=v, axis=0), torch.softmax(torch.from_numpy(x), 0).numpy()),
        "select": (lambda v: mb.select(cond=mb.greater(x=v, y=0.0), a=v, b=mb.mul(x=v, y=0.5)),
                   np.where(x > 0, x, 0.5 * x)),
        "sub_div": (lambda v: mb.real_div(x=mb.sub(x=v, y=1.0), y=2.0), (x - 1) / 2),
    }
    for name, (body, ref) in checks.items():
        got = _run_program(_program(x.shape, body), x)
        assert compare(got, ref)["max_abs"] < 1e-6, name
    roots = {
        "sqrt": (lambda v: mb.sqrt(x=v), np.sqrt(pos)),
        "rsqrt": (lambda v: mb.rsqrt(x=v), 1 / np.sqrt(pos)),
        "pow": (lambda v: mb.pow(x=v, y=1.5), pos**1.5),
    }
    for name, (body, ref) in roots.items():
        assert compare(_run_program(_program(x.shape, body), pos), ref)["max_rel"] < 1e-6, name


def test_matmul_transposes_and_sdpa_mask():
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 5, 8)).astype(np.float32)
    k = rng.standard_normal((2, 6, 8)).astype(np.float32)
    v = rng.standard_normal((2, 6, 4)).astype(np.float32)
    mask = np.tril(np.ones((5, 6), dtype=bool))
    got = _run_program(_program(q.shape, lambda x: mb.matmul(x=k, y=x, transpose_x=False, transpose_y=True)), q)
    np.testing.assert_allclose(got, k @ q.transpose(0, 2, 1), rtol=1e-5, atol=1e-5)
    prog = _program(q.shape, lambda x: mb.scaled_dot_product_attention(
        query=x, key=k, value=v, attn_mask=mask), target=ct.target.iOS18)
    ref = F.scaled_dot_product_attention(*map(torch.from_numpy, (q, k, v)),
                                         attn_mask=torch.from_numpy(mask)).numpy()
    assert compare(_run_program(prog, q), ref)["max_abs"] < 1e-5


def test_fp16_ops_round_every_result():
    """An fp16 program rounds after each op, which can differ from rounding once at the end."""
    x = np.array([1.0, 2.0**-11, -1.0], dtype=np.float32)  # 1 + 2^-11 is not an fp16

    def body(v):
        h = mb.cast(x=v, dtype="fp16")
        s = mb.add(x=h, y=np.float16(1.0))  # 2 + 2^-11 rounds to 2
        return mb.cast(x=mb.sub(x=s, y=np.float16(1.0)), dtype="fp32")

    got = _run_program(_program(x.shape, body), x)
    np.testing.assert_array_equal(got, np.array([1.0, 0.0, -1.0], dtype=np.float32))


# ---------------------------------------------------------------- refusals and compare()


def test_unsupported_op_raises_naming_it():
    assert "argsort" not in supported_ops()
    prog = _program((2, 3), lambda v: mb.argsort(x=mb.relu(x=v), axis=1, name="ranking"))
    with pytest.raises(UnsupportedOpError) as info:
        run(prog, {"x": np.ones((2, 3), dtype=np.float32)})
    assert isinstance(info.value, NotImplementedError)
    assert info.value.op_type == "argsort" and info.value.op_name == "ranking"
    assert "argsort" in str(info.value) and "ranking" in str(info.value)


def test_bad_inputs_are_refused():
    from quanta.mil.runner import RunnerError

    prog = _program((2, 3), lambda v: mb.relu(x=v))
    with pytest.raises(RunnerError, match="missing"):
        run(prog, {})
    with pytest.raises(RunnerError, match="shape"):
        run(prog, {"x": np.ones((3, 2), dtype=np.float32)})
    with pytest.raises(TypeError):
        run(42, {})


def test_compare():
    a = np.array([1.0, -2.0, 3.0])
    assert compare(a, a) == {"max_abs": 0.0, "max_rel": 0.0, "cosine": pytest.approx(1.0)}
    stats = compare(a + np.array([0.0, 0.3, 0.0]), a)
    assert stats["max_abs"] == pytest.approx(0.3) and stats["max_rel"] == pytest.approx(0.1)
    assert compare(-a, a)["cosine"] == pytest.approx(-1.0)
    assert compare(np.zeros(3), np.zeros(3)) == {"max_abs": 0.0, "max_rel": 0.0, "cosine": 1.0}
    assert compare(a, np.zeros(3))["cosine"] == 0.0
    assert math.isnan(compare(np.array([np.nan, 1.0]), np.ones(2))["max_abs"])
    assert compare(np.float16(0.5), np.float32(0.5))["max_abs"] == 0.0
    with pytest.raises(ValueError):
        compare(np.ones(3), np.ones(4))


def test_less_common_ops():
    """Ops the converters emit less often, each against a direct numpy/torch expression."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    idx = rng.integers(0, 4, size=(2, 3, 2)).astype(np.int32)
    xt = torch.from_numpy(x)
    checks = {
        "instance_norm": (lambda v: mb.instance_norm(x=mb.expand_dims(x=v, axes=[-1]), epsilon=1e-5),
                          F.instance_norm(xt[..., None], eps=1e-5).numpy()),
        "reduce_max": (lambda v: mb.reduce_max(x=v, axes=[1], keep_dims=True), x.max(1, keepdims=True)),
        "reduce_argmax": (lambda v: mb.reduce_argmax(x=v, axis=2), x.argmax(2)),
        "stack": (lambda v: mb.stack(values=[v, v], axis=1), np.stack([x, x], 1)),
        "slice_by_size": (lambda v: mb.slice_by_size(x=v, begin=[0, 1, 1], size=[-1, 2, 2]), x[:, 1:3, 1:3]),
        "gather_along_axis": (lambda v: mb.gather_along_axis(x=v, indices=idx, axis=2),
                              np.take_along_axis(x, idx, 2)),
        "leaky_relu": (lambda v: mb.leaky_relu(x=v, alpha=0.1), np.where(x >= 0, x, 0.1 * x)),
        "clip": (lambda v: mb.clip(x=v, alpha=-0.5, beta=0.5), np.clip(x, -0.5, 0.5)),
        "silu": (lambda v: mb.silu(x=v), F.silu(xt).numpy()),
        "maximum": (lambda v: mb.maximum(x=v, y=0.2), np.maximum(x, 0.2)),
        "fill": (lambda v: mb.add(x=v, y=mb.fill(shape=[2, 3, 4], value=1.5)), x + 1.5),
    }
    for name, (body, ref) in checks.items():
        got = _run_program(_program(x.shape, body), x)
        assert got.shape == ref.shape, name
        assert compare(got, ref)["max_abs"] < 1e-5, name


def test_reshape_with_zero_copies_input_dims():
    # iOS17 matches a 0 from the right: in [0, -1] against (2, 3, 4) the 0 copies dim 1.
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    got = _run_program(_program(x.shape, lambda v: mb.reshape(x=v, shape=[0, -1])), x)
    np.testing.assert_array_equal(got, x.reshape(3, 8))
