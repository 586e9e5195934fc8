"""Property-based tests of the quantization math (hypothesis) and its edge values."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import quanta
from quanta import QuantSpec, QuantizationError
from quanta._records.qmath import expand_qparam, from_groups, to_groups
from quanta._run.weights import scheme_for

specs = st.builds(
    lambda bits, signed, scheme, gran: QuantSpec(
        dtype=f"{'' if signed else 'u'}int{bits}", scheme=scheme, granularity=gran,
        block_size=4 if gran == "per_block" else None),
    st.integers(2, 8), st.booleans(), st.sampled_from(["symmetric", "affine"]),
    st.sampled_from(["per_tensor", "per_channel", "per_block"]),
)
weights = st.builds(
    lambda rows, blocks, scale, seed: torch.randn(rows, blocks * 4, generator=torch.Generator().manual_seed(seed)) * scale,
    st.integers(1, 6), st.integers(1, 5), st.sampled_from([1e-6, 1e-2, 1.0, 1e4]), st.integers(0, 10_000),
)


@settings(max_examples=150, deadline=None)
@given(w=weights, spec=specs)
def test_round_trip_within_half_a_step(w, spec):
    rec = quanta.quantize_weight(w, spec)
    scale = expand_qparam(rec.scale, tuple(w.shape))
    err = (rec.dequantize() - w).abs()
    # Inside the representable range the error is at most half a step (plus float rounding).
    assert bool((err <= scale * 0.5 * (1 + 1e-4) + 1e-30).all())


@settings(max_examples=100, deadline=None)
@given(w=weights, spec=specs)
def test_idempotent(w, spec):
    rec = quanta.quantize_weight(w, spec)
    scheme = scheme_for(spec)
    if spec.scheme == "symmetric" and scheme.grid_for(spec.dtype) == "full":
        # The full grid's top code is (2^(b-1)-1)/(2^(b-1)) of its bottom one: requantizing moves the
        # range, so only the projection property holds (the same qparams give back the same codes).
        groups = to_groups(rec.dequantize(), list(rec.block_sizes))
        zp = None if rec.zero_point is None else rec.zero_point.reshape(-1, 1).float()
        codes = scheme.quantize(groups, rec.scale.reshape(-1, 1), zp, spec.dtype)
        assert torch.equal(codes, to_groups(rec.codes.float(), list(rec.block_sizes)))
        return
    again = quanta.quantize_weight(rec.dequantize(), spec)
    # Same codes; scales recomputed from dequantized ranges may move by a float ulp.
    assert torch.equal(again.codes, rec.codes)
    torch.testing.assert_close(again.dequantize(), rec.dequantize(), rtol=1e-5, atol=0)


@settings(max_examples=100, deadline=None)
@given(w=weights, spec=specs)
def test_shapes_and_code_range(w, spec):
    rec = quanta.quantize_weight(w, spec)
    scheme = quanta.registry.get("scheme", spec.scheme).obj
    qmin, qmax = scheme.quant_range(spec.dtype)
    assert rec.codes.shape == w.shape
    assert rec.codes.dtype == (torch.int8 if spec.dtype.signed else torch.uint8)
    assert int(rec.codes.min()) >= qmin and int(rec.codes.max()) <= qmax
    expected = {"per_tensor": (1, 1), "per_channel": (w.shape[0], 1), "per_block": (w.shape[0], w.shape[1] // 4)}
    assert tuple(rec.scale.shape) == expected[spec.granularity.value]
    assert bool((rec.scale > 0).all()) and bool(torch.isfinite(rec.scale).all())


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data())
def test_grouping_round_trips(shape, data):
    sizes = [data.draw(st.sampled_from([0] + [d for d in range(1, n + 1) if n % d == 0])) for n in shape]
    w = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    assert torch.equal(from_groups(to_groups(w, sizes), tuple(shape), sizes), w)


@pytest.mark.parametrize("scheme", ["symmetric", "affine"])
def test_all_zero_channel_gets_unit_scale_and_exact_zeros(scheme):
    w = torch.randn(4, 8)
    w[2] = 0.0
    rec = quanta.quantize_weight(w, QuantSpec(scheme=scheme))
    assert float(rec.scale[2, 0]) == 1.0
    assert torch.equal(rec.dequantize()[2], torch.zeros(8))


def test_single_element_and_huge_range():
    rec = quanta.quantize_weight(torch.tensor([[3.5]]), QuantSpec(granularity="per_tensor"))
    assert torch.allclose(rec.dequantize(), torch.tensor([[3.5]]))
    w = torch.tensor([[1e30, -1e-30, 1.0, 0.0]])
    rec = quanta.quantize_weight(w, QuantSpec(dtype="int8"))
    assert torch.isfinite(rec.dequantize()).all()
    assert float(rec.dequantize()[0, 0]) == pytest.approx(1e30, rel=1e-6)


@pytest.mark.parametrize("bad,word", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_non_finite_weights_are_an_error_naming_the_layer(bad, word):
    w = torch.randn(4, 8)
    w[1, 3] = bad
    with pytest.raises(QuantizationError, match=rf"layer 'fc1'.*{word}"):
        quanta.quantize_weight(w, QuantSpec(), layer="fc1")


@settings(max_examples=60, deadline=None)
@given(w=weights, spec=specs)
def test_in_place_fast_path_equals_the_plain_contract(w, spec):
    scheme = quanta.registry.get("scheme", spec.scheme).obj
    from quanta._records.qmath import to_groups

    groups = to_groups(w, spec.block_sizes(tuple(w.shape), 0, 1))
    lo, hi = torch.aminmax(groups, dim=1)
    scale, zp = scheme.qparams(lo, hi, spec.dtype)
    zp2 = None if zp is None else zp[:, None]
    plain = scheme.quantize(groups, scale[:, None], zp2, spec.dtype)
    out = torch.empty_like(groups)
    scheme.quantize_into(groups, scale[:, None], zp2, spec.dtype, out)
    assert torch.equal(plain, out)
    assert torch.equal(scheme.dequantize(plain, scale[:, None], zp2), scheme.dequantize_(out, scale[:, None], zp2))


def test_copy_shares_replaced_weights_but_never_writes_them(small_model):
    before = {k: v.clone() for k, v in small_model.state_dict().items()}
    q = quanta.quantize(small_model, {"global_config": {"dtype": "int4"}})
    assert all(torch.equal(before[k], v) for k, v in small_model.state_dict().items())
    assert q[0].weight.data_ptr() != small_model[0].weight.data_ptr()
    assert q[0].bias.data_ptr() != small_model[0].bias.data_ptr()  # everything else is a real copy
