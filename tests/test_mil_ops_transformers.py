"""The MIL ops converted transformers programs (BERT with a mask, Llama with rotary positions and
a flexible sequence length) contain, each built with coremltools' MIL Builder, run by the numpy
runner and checked against torch on random data."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")

import torch.nn.functional as F  # noqa: E402
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from quanta.mil.runner import run  # noqa: E402

RNG = np.random.default_rng(9)


def _run(shape, body, x, dtype=types.fp32, target=None):
    @mb.program(input_specs=[mb.TensorSpec(shape=shape, dtype=dtype)], opset_version=target or ct.target.iOS17)
    def prog(v):
        return body(v)

    return next(iter(run(prog, {"v": x}).values()))


def _t(x):
    return torch.from_numpy(np.asarray(x))


def test_gather_token_embedding_and_batch_dims():
    table = RNG.standard_normal((50, 8)).astype(np.float32)
    ids = RNG.integers(-50, 50, (2, 7)).astype(np.int32)
    got = _run(ids.shape, lambda v: mb.gather(x=table, indices=v, axis=0), ids, dtype=types.int32)
    ref = F.embedding(_t(np.where(ids < 0, ids + 50, ids)).long(), _t(table)).numpy()
    np.testing.assert_array_equal(got, ref)
    x = RNG.standard_normal((3, 5, 4)).astype(np.float32)
    idx = RNG.integers(0, 5, (3, 2)).astype(np.int32)
    got = _run(x.shape, lambda v: mb.gather(x=v, indices=idx, axis=1, batch_dims=1), x)
    ref = torch.stack([_t(x)[b, _t(idx[b]).long()] for b in range(3)]).numpy()
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("batch_dims", [0, 1])
def test_gather_nd_matches_advanced_indexing(batch_dims):
    x = RNG.standard_normal((3, 6, 4)).astype(np.float32)
    if batch_dims == 0:
        idx = RNG.integers(-3, 3, (5, 2)).astype(np.int32)  # picks x[i, j, :]
        tx, ti = _t(x), _t(np.where(idx < 0, idx + np.array([3, 6]), idx)).long()
        ref = tx[ti[:, 0], ti[:, 1]].numpy()
    else:
        idx = RNG.integers(0, 6, (3, 2, 1)).astype(np.int32)  # per batch: x[b, k, :]
        ref = torch.stack([_t(x)[b][_t(idx[b, :, 0]).long()] for b in range(3)]).numpy()
    got = _run(x.shape, lambda v: mb.gather_nd(x=v, indices=idx, batch_dims=batch_dims), x)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("lower,upper", [(-1, 0), (0, -1), (1, 2), (-1, -1)])
def test_band_part_matches_tril_triu(lower, upper):
    x = RNG.standard_normal((2, 5, 6)).astype(np.float32)
    ref = _t(x)
    if lower >= 0:
        ref = torch.triu(ref, diagonal=-lower)
    if upper >= 0:
        ref = torch.tril(ref, diagonal=upper)
    got = _run(x.shape, lambda v: mb.band_part(x=v, lower=lower, upper=upper), x)
    np.testing.assert_array_equal(got, ref.numpy())


@pytest.mark.parametrize("exclusive,reverse", [(False, False), (True, False), (False, True), (True, True)])
def test_cumsum_matches_torch(exclusive, reverse):
    x = RNG.standard_normal((3, 7)).astype(np.float32)
    tx = _t(x).flip(1) if reverse else _t(x)
    ref = torch.cumsum(tx, 1) - (tx if exclusive else 0)
    ref = ref.flip(1) if reverse else ref
    got = _run(x.shape, lambda v: mb.cumsum(x=v, axis=1, exclusive=exclusive, reverse=reverse), x)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-6)


def test_rotary_position_ops_match_torch():
    # what a Llama program computes from positions: range_1d -> outer product -> cat -> sin/cos
    inv_freq = (1.0 / 10000 ** (np.arange(0, 16, 2) / 16)).astype(np.float32)
    x = RNG.standard_normal((1, 9, 16)).astype(np.float32)

    def body(v):
        n = mb.slice_by_index(x=mb.shape(x=v), begin=[1], end=[2], squeeze_mask=[True])
        pos = mb.cast(x=mb.range_1d(start=0, end=n, step=1), dtype="fp32")
        freqs = mb.mul(x=mb.expand_dims(x=pos, axes=[1]), y=inv_freq)
        emb = mb.concat(values=[freqs, freqs], axis=-1)
        return mb.add(x=mb.mul(x=v, y=mb.cos(x=emb)), y=mb.mul(x=v, y=mb.sin(x=emb)))

    freqs = torch.outer(torch.arange(9, dtype=torch.float32), _t(inv_freq))
    emb = torch.cat([freqs, freqs], -1)
    ref = (_t(x) * emb.cos() + _t(x) * emb.sin()).numpy()
    np.testing.assert_allclose(_run(x.shape, body, x), ref, rtol=1e-5, atol=1e-5)


def test_rms_norm_silu_and_tile_match_torch():
    x = RNG.standard_normal((2, 4, 8)).astype(np.float32)
    w = RNG.standard_normal(8).astype(np.float32)

    def body(v):
        var = mb.reduce_mean(x=mb.pow(x=v, y=2.0), axes=[-1], keep_dims=True)
        normed = mb.mul(x=mb.mul(x=v, y=mb.rsqrt(x=mb.add(x=var, y=1e-6))), y=w)
        return mb.tile(x=mb.silu(x=normed), reps=[1, 2, 1])

    tx = _t(x)
    normed = tx * torch.rsqrt(tx.pow(2).mean(-1, keepdim=True) + 1e-6) * _t(w)
    ref = F.silu(normed).repeat(1, 2, 1).numpy()
    np.testing.assert_allclose(_run(x.shape, body, x), ref, rtol=1e-5, atol=1e-5)


def test_causal_mask_select_and_fill_like():
    # causal mask as transformers 5.x builds it: kv <= q, and-ed with padding, then select
    scores = RNG.standard_normal((1, 1, 5, 5)).astype(np.float32)
    keep_pad = np.array([1, 1, 1, 1, 0], dtype=bool)

    def body(v):
        q = mb.expand_dims(x=mb.range_1d(start=0, end=5, step=1), axes=[1])
        k = mb.expand_dims(x=mb.range_1d(start=0, end=5, step=1), axes=[0])
        mask = mb.logical_and(x=mb.less_equal(x=k, y=q), y=keep_pad)
        neg = mb.fill_like(ref_tensor=v, value=-1e4)
        return mb.softmax(x=mb.select(cond=mask, a=v, b=neg), axis=-1)

    causal = torch.ones(5, 5, dtype=torch.bool).tril() & _t(keep_pad)
    ref = torch.softmax(_t(scores).masked_fill(~causal, -1e4), -1).numpy()
    np.testing.assert_allclose(_run(scores.shape, body, scores), ref, rtol=1e-5, atol=1e-6)


def test_concat_of_scalars_builds_a_shape():
    x = RNG.standard_normal((2, 3, 4)).astype(np.float32)

    def body(v):
        s = mb.shape(x=v)
        a = mb.gather(x=s, indices=0, axis=0)
        b = mb.gather(x=s, indices=2, axis=0)
        return mb.reshape(x=v, shape=mb.concat(values=[a, -1, b], axis=0))

    np.testing.assert_array_equal(_run(x.shape, body, x), x.reshape(2, -1, 4))
