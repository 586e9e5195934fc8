"""The solver's factorization in the Hessian's own storage (``_overwrite_hessian``, no act-order).

``InPlaceFactor`` reverses the Hessian in place, factors it and flips the factor back, with no second
``[n, n]`` matrix; after a failed Cholesky it rebuilds the reversed Hessian for the next damp from the
untouched upper triangle and the diagonal blocks it kept. Every path must give what the copying path
gives, bit for bit.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from quanta.plugins.gptq.factor import InPlaceFactor, damped_factor, error_feedback_factor, flip_in_place
from quanta.plugins.gptq.hessian import add_partial_xtx, mirror_upper, partial_rows
from quanta.plugins.gptq.solver import gptq_quantize

from test_gptq_solver import MinMaxQuantizer


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _hook_hessian(n: int, samples: int, seed: int, dead=()) -> torch.Tensor:
    """A Hessian made as quanta's hooks make it (row-block partials, mirrored), so exactly symmetric."""
    gen = torch.Generator().manual_seed(seed)
    xtx, buffer = torch.zeros(n, n), torch.empty(partial_rows(n), n)
    for _ in range(3):
        x = torch.randn(samples, n, generator=gen) @ (torch.eye(n) + torch.randn(n, n, generator=gen) / n ** 0.5)
        x[:, list(dead)] = 0
        add_partial_xtx(xtx, x, buffer)
    return mirror_upper(xtx).mul_(2.0 / (3 * samples))


@pytest.mark.parametrize("n", [1, 2, 255, 256, 257, 513, 1001])
def test_flip_in_place(n):
    a = torch.randn(n, n)
    expected = a.flip(0, 1)
    assert torch.equal(flip_in_place(a), expected)


@pytest.mark.parametrize("n", [8, 700, 1100])
def test_hessian_is_exactly_symmetric(n):
    h = _hook_hessian(n, 64, seed=n)
    assert torch.equal(_bits(h), _bits(h.t()))


@pytest.mark.parametrize("n", [40, 300, 600])
def test_in_place_factor_equals_the_copying_one(n):
    h = _hook_hessian(n, 2 * n, seed=n)
    h_rev = h.flip(0, 1).contiguous()
    h_rev.diagonal().add_(0.01 * float(h.diagonal().mean()))
    g, d = error_feedback_factor(h_rev)
    spent = h.clone()
    factor = InPlaceFactor(spent, None)
    a = factor.make()
    a.diagonal().add_(0.01 * float(h.diagonal().mean()))
    g2, d2 = factor.factor(a)
    assert g2.data_ptr() == spent.data_ptr()
    upper = torch.ones(n, n, dtype=torch.bool).triu()  # what the sweep reads (and the unit diagonal)
    assert torch.equal(_bits(g[upper]), _bits(g2[upper])) and torch.equal(_bits(d), _bits(d2))


@pytest.mark.parametrize("n,samples", [(32, 8), (600, 100)])
def test_damp_retries_rebuild_the_same_hessian(n, samples):
    # Rank-deficient and undamped: the Cholesky fails (for n = 600 in a later block, after earlier
    # panels were written), the in-place factor rebuilds the reversed Hessian and raises the damp.
    h = _hook_hessian(n, samples, seed=n, dead=(3,))
    dead = h.diagonal() == 0
    calls = []

    def copy():  # what the copying path makes for every damp
        out = h.flip(0, 1).contiguous()
        out.diagonal()[dead.flip(0)] = 1
        return out

    def counting(a):
        calls.append(1)
        return error_feedback_factor(a)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (g, d), damp = damped_factor(copy, 0.0, counting)
        in_place = InPlaceFactor(h.clone(), dead)
        (g2, d2), damp2 = damped_factor(in_place.make, 0.0, in_place.factor)
    assert len(calls) > 1 and damp == damp2 > 0
    upper = torch.ones(n, n, dtype=torch.bool).triu()
    assert torch.equal(_bits(g[upper]), _bits(g2[upper])) and torch.equal(_bits(d), _bits(d2))


@pytest.mark.parametrize("block_size", [None, 32])
def test_solver_results_with_and_without_overwriting(block_size):
    gen = torch.Generator().manual_seed(1)
    h = _hook_hessian(96, 20, seed=2, dead=(7,))  # rank-deficient: retried with damp=0
    w = torch.randn(24, 96, generator=gen)
    with warnings.catch_warnings(record=True) as kept_warnings:
        warnings.simplefilter("always")
        kept = gptq_quantize(w, h, MinMaxQuantizer(4, False), block_size=block_size, damp=0.0)
    with warnings.catch_warnings(record=True) as over_warnings:
        warnings.simplefilter("always")
        over = gptq_quantize(w, h.clone(), MinMaxQuantizer(4, False), block_size=block_size, damp=0.0,
                             _overwrite_hessian=True)
    assert [str(x.message) for x in kept_warnings] == [str(x.message) for x in over_warnings] != []
    for name in ("codes", "scale", "zero_point", "weight"):
        assert torch.equal(getattr(kept, name), getattr(over, name)), name
    assert torch.equal(_bits(kept.weight), _bits(over.weight))
    assert kept.loss == over.loss and kept.damp == over.damp > 0


@pytest.mark.parametrize("tiny", [1e-40, 1e-36])
def test_upper_triangle_finiteness_decided_as_the_copying_path(tiny, monkeypatch):
    # A huge entry and a tiny pivot: max|H| / min(d) overflows, so the column-wise check runs (the
    # copying path divides the whole matrix, upper triangle included, and checks it): same decision.
    n = 300
    h = torch.eye(n)
    h[0, 0] = h[n - 1, n - 1] = 1e21
    h[0, n - 1] = h[n - 1, 0] = 1e20
    h[150, 150] = tiny
    columns = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: columns.append(k.get("dim")) or real(*a, **k))

    def copy():
        return h.flip(0, 1).contiguous()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            expected = damped_factor(copy, 0.0, error_feedback_factor)
        except Exception as e:  # noqa: BLE001 - the same failure is expected of both
            expected = type(e)
        in_place = InPlaceFactor(h.clone(), None)
        try:
            got = damped_factor(in_place.make, 0.0, in_place.factor)
        except Exception as e:  # noqa: BLE001
            got = type(e)
    assert 0 in columns  # the column-wise check ran
    if isinstance(expected, type):
        assert got is expected
        return
    (g, d), damp = expected
    (g2, d2), damp2 = got
    upper = torch.ones(n, n, dtype=torch.bool).triu()
    assert damp == damp2 and torch.equal(_bits(g[upper]), _bits(g2[upper])) and torch.equal(_bits(d), _bits(d2))


@pytest.fixture
def torch_products(monkeypatch):
    """GPTQ's products through torch's calls, as on a platform without oneDNN (gemm.py): the
    path whose row blocks the addmm_ probe decides."""
    from quanta.plugins.gptq import gemm

    monkeypatch.setattr(gemm, "_OP", None)


@pytest.mark.parametrize("n,tokens", [(8, 3), (512, 128), (700, 128), (1100, 64), (600, 300), (600, 1000)])
def test_hessian_blocks_added_by_addmm_where_exact(n, tokens, torch_products):
    # add_partial_xtx adds a row block's product with addmm_ where the probe found that exact for the
    # block's shapes (short inputs on MKL/OpenBLAS), else through the buffer: the sum is the one the
    # whole zeroed partials give, bit for bit (signs of zero too), whichever path each block took.
    from quanta.plugins.gptq.hessian import _EXACT, accumulate_xtx
    gen = torch.Generator().manual_seed(n + tokens)
    xs = [torch.randn(tokens, n, generator=gen), torch.zeros(tokens, n), torch.randn(tokens, n, generator=gen)]
    xs[2][:, 1] = -0.0
    whole, fused, buffered = torch.zeros(n, n), torch.zeros(n, n), torch.zeros(n, n)
    for x in xs:
        whole.add_(accumulate_xtx(torch.zeros(n, n), x))
        add_partial_xtx(fused, x)  # buffer made only if a block needs it
    keys = [k for k in _EXACT if k[6][0] == tokens]  # the probed blocks of these inputs (right: [tokens, *])
    assert keys
    saved = {k: _EXACT[k] for k in keys}
    try:
        for k in keys:  # as on a BLAS where no block adds exactly: every block through the buffer
            _EXACT[k] = False
        for x in xs:
            add_partial_xtx(buffered, x, torch.full((partial_rows(n), n), float("nan")))
    finally:
        _EXACT.update(saved)
    for sums in (whole, fused, buffered):
        mirror_upper(sums)
    assert torch.equal(_bits(whole), _bits(fused)) and torch.equal(_bits(whole), _bits(buffered))


@pytest.mark.parametrize("first", ["zeros", "integers"])
@pytest.mark.parametrize("n,tokens", [(8, 3), (600, 300), (600, 1000)])
def test_addmm_probe_is_not_fooled_by_the_first_inputs(n, tokens, first, torch_products):
    # The probe decides once per block shape; a first batch whose sums are exact in any order
    # (padding zeros, small integers) must not make it take addmm_ for shapes where that rounds
    # differently: the later batches' sum is still the whole partials' one, bit for bit.
    from quanta.plugins.gptq.hessian import _EXACT, accumulate_xtx
    gen = torch.Generator().manual_seed(n * tokens)
    degenerate = torch.zeros(tokens, n) if first == "zeros" else torch.randint(-2, 3, (tokens, n), generator=gen).float()
    xs = [degenerate, torch.randn(tokens, n, generator=gen), torch.randn(tokens, n, generator=gen)]
    saved = dict(_EXACT)
    _EXACT.clear()  # as in a fresh process: these shapes not probed yet
    try:
        whole, summed = torch.zeros(n, n), torch.zeros(n, n)
        for x in xs:
            whole.add_(accumulate_xtx(torch.zeros(n, n), x))
            add_partial_xtx(summed, x)
    finally:
        _EXACT.clear()
        _EXACT.update(saved)
    assert torch.equal(_bits(mirror_upper(whole)), _bits(mirror_upper(summed)))


def test_addmm_probe_is_cached_per_shape_and_refuses_other_devices_and_dtypes():
    from quanta.plugins.gptq.hessian import _EXACT, adds_exactly
    x = torch.randn(16, 96)
    before = len(_EXACT)
    first = adds_exactly(torch.zeros(96, 96)[:32, :], x[:, :32].t(), x)
    assert len(_EXACT) == before + 1 and adds_exactly(torch.zeros(96, 96)[:32, :], x[:, :32].t(), x) is first
    assert len(_EXACT) == before + 1  # answered from the cache
    assert not adds_exactly(torch.zeros(96, 96, dtype=torch.float64), x.double().t(), x.double())
    assert not adds_exactly(torch.zeros(96, 96, device="meta"), x.t().to("meta"), x.to("meta"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [(0, 0), (5, 3), (39, 39)])
def test_overwritten_hessian_with_non_finite_values_is_refused(bad, where):
    # The in-place path checks the Hessian with the one aminmax that also gives InPlaceFactor its max|H|.
    h = _hook_hessian(40, 80, seed=3)
    h[where] = bad
    with pytest.raises(ValueError, match="must be finite"):
        gptq_quantize(torch.randn(8, 40), h, MinMaxQuantizer(4, False), block_size=8, _overwrite_hessian=True)


def test_in_place_factor_given_max_abs_equals_measured():
    h = _hook_hessian(300, 600, seed=4)
    mean = float(h.diagonal().mean())
    lo, hi = torch.aminmax(h)
    results = []
    for max_abs in (None, max(-float(lo), float(hi))):
        factor = InPlaceFactor(h.clone(), None, max_abs)
        (g, d), used = damped_factor(factor.make, 0.01, factor.factor)
        results.append((g, d, factor.max_abs))
    assert torch.equal(_bits(results[0][0]), _bits(results[1][0])) and torch.equal(results[0][1], results[1][1])
    assert results[0][2] == results[1][2] and mean > 0
