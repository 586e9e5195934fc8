"""The GPTQ column solver against a slow, obvious float64 GPTQ written from the paper.

The reference below has no lazy batching, no Cholesky tricks and no threads: it inverts the
damped Hessian with ``torch.linalg.inv``, takes the upper Cholesky factor of that inverse and
walks the columns one by one, updating every remaining column after each.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from quanta.errors import QuantizationError
from quanta.plugins.gptq.solver import GPTQResult, gptq_quantize, inverse_hessian_factor


class MinMaxQuantizer:
    """coremltools' symmetric/affine n-bit math (``quantize_weight_by_dtype``), per row.

    Symmetric: range ``[-(2^(n-1)-1), 2^(n-1)-1]``, ``scale = 2 * max|w| / (qmax - qmin)``, no zero
    point. Affine (signed): ``[-2^(n-1), 2^(n-1)-1]``, range widened to include 0,
    ``zp = clamp(round((qmin * max - qmax * min) / (max - min)))``. A zero-range row gets
    ``scale = 1`` (and ``zp = 0``) instead of a division by zero, as quanta's schemes do.
    """

    def __init__(self, bits: int = 4, symmetric: bool = True):
        self.symmetric = symmetric
        if symmetric:
            self.qmin, self.qmax = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
        else:
            self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def fit(self, w):
        mn, mx = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        if self.symmetric:
            max_abs = torch.maximum(mn.abs(), mx.abs())
            scale = (max_abs - (-max_abs)) / (self.qmax - self.qmin)
            return torch.where(scale > 0, scale, torch.ones_like(scale)), None
        lo, hi = torch.clamp(mn, max=0), torch.clamp(mx, min=0)
        span = hi - lo
        scale = span / (self.qmax - self.qmin)
        zp = torch.round((self.qmin * hi - self.qmax * lo) / torch.where(span > 0, span, torch.ones_like(span)))
        zp = torch.where(span > 0, zp, torch.zeros_like(zp)).clamp(self.qmin, self.qmax)
        return torch.where(scale > 0, scale, torch.ones_like(scale)), zp

    def quantize(self, w, scale, zero_point):
        codes = torch.round(w / scale)
        if zero_point is not None:
            codes = codes + zero_point
        return codes.clamp(self.qmin, self.qmax)

    def dequantize(self, codes, scale, zero_point):
        return (codes - zero_point) * scale if zero_point is not None else codes * scale


def reference_gptq(weight, hessian, quantizer, *, block_size=None, damp=0.01, act_order=False,
                   static_groups=False):
    """GPTQ straight from the paper, float64, one column at a time. Returns (codes, weight, loss)."""
    w = weight.double().clone()
    h = hessian.double().clone()
    n = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    if act_order and block_size is not None:
        static_groups = True
    group_params = {}
    if block_size is None:
        group_params[0] = quantizer.fit(w)
    elif static_groups:
        for g in range(n // block_size):
            group_params[g] = quantizer.fit(w[:, g * block_size:(g + 1) * block_size])
    order = list(range(n))
    if act_order:
        order = torch.argsort(torch.diag(h), descending=True, stable=True).tolist()
    h = h[order][:, order]
    w = w[:, order]
    h = h + damp * torch.mean(torch.diag(h)) * torch.eye(n, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    codes = torch.zeros_like(w)
    q_all = torch.zeros_like(w)
    loss = 0.0
    for j in range(n):
        col = order[j]
        g = 0 if block_size is None else col // block_size
        if block_size is not None and not static_groups and col % block_size == 0:
            group_params[g] = quantizer.fit(w[:, j:j + block_size])  # current, error-updated weights
        scale, zp = group_params[g]
        c = quantizer.quantize(w[:, j:j + 1], scale, zp)
        q = quantizer.dequantize(c, scale, zp)
        err = (w[:, j:j + 1] - q) / u[j, j]
        loss += 0.5 * float((err ** 2).sum())
        w[:, j:] -= err * u[j:j + 1, j:]
        codes[:, j:j + 1] = c
        q_all[:, j:j + 1] = q
    inverse = torch.argsort(torch.tensor(order))
    return codes[:, inverse], q_all[:, inverse], loss


def correlated_layer(rows, cols, n_samples=512, seed=0, dead=()):
    """A weight and H = 2 X^T X / n from correlated inputs (X = Z A, a random mixing)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n_samples, cols, generator=gen)
    mix = torch.randn(cols, cols, generator=gen) / cols ** 0.5 + torch.eye(cols)
    x = z @ mix * torch.linspace(0.2, 3.0, cols)
    for i in dead:
        x[:, i] = 0
    w = torch.randn(rows, cols, generator=gen)
    return w, 2 * x.t() @ x / n_samples, x


def assert_matches_reference(res: GPTQResult, ref_codes, ref_weight, ref_loss, max_flip=0.01):
    flips = (res.codes.double() != ref_codes).double().mean().item()
    # float32 vs float64 error feedback: a code may land on the other side of a rounding tie,
    # after which its row legitimately diverges; such flips must stay rare.
    assert flips <= max_flip, f"{flips:.2%} of codes differ from the reference"
    rows_same = (res.codes.double() == ref_codes).all(dim=1)
    assert rows_same.double().mean() >= 0.9
    torch.testing.assert_close(res.weight[rows_same].double(), ref_weight[rows_same], rtol=1e-4, atol=1e-5)
    assert res.loss == pytest.approx(ref_loss, rel=2e-2 if flips else 1e-3)


CASES = [
    # (rows, cols, bits, symmetric, block_size, act_order, static_groups)
    *[(32, 64, b, s, bs, a, st) for b, s, bs, a, st in itertools.product(
        (4, 8), (True, False), (None, 16), (False, True), (False, True)) if not (bs is None and st)],
    (64, 256, 4, True, None, False, False),
    (64, 256, 4, True, 32, False, False),
    (64, 256, 4, False, 64, True, False),
    (64, 256, 8, True, 128, False, True),
]


@pytest.mark.parametrize("rows,cols,bits,symmetric,block_size,act_order,static_groups", CASES)
def test_matches_reference(rows, cols, bits, symmetric, block_size, act_order, static_groups):
    w, h, _ = correlated_layer(rows, cols, seed=rows + cols + bits)
    q = MinMaxQuantizer(bits, symmetric)
    kw = dict(block_size=block_size, act_order=act_order, static_groups=static_groups)
    ref = reference_gptq(w, h, q, **kw)
    # A lazy batch smaller than the layer exercises the batch-level updates and (per block) the
    # rule that a block fit on error-updated weights never straddles a batch end.
    res = gptq_quantize(w, h, q, processing_group_size=48, **kw)
    assert_matches_reference(res, *ref)
    assert res.codes.shape == w.shape and res.codes.dtype == torch.int32
    n_groups = 1 if block_size is None else cols // block_size
    assert res.scale.shape == (rows, n_groups)
    assert (res.zero_point is None) == symmetric
    assert int(res.codes.min()) >= q.qmin and int(res.codes.max()) <= q.qmax


@pytest.mark.parametrize("batch", [1, 7, 16, 64, 128, 1000])
@pytest.mark.parametrize("block_size", [None, 16, 48])
def test_batch_sizes_agree(batch, block_size):
    w, h, _ = correlated_layer(24, 96, seed=3)
    q = MinMaxQuantizer(4, True)
    ref = reference_gptq(w, h, q, block_size=block_size)
    assert_matches_reference(gptq_quantize(w, h, q, block_size=block_size, processing_group_size=batch), *ref)


@pytest.mark.parametrize("path", ["eager", "static"])
@pytest.mark.parametrize("block_size,act_order", [(None, False), (32, False), (128, False), (32, True)])
def test_static_buffer_path_matches_plain_path(path, block_size, act_order):
    """The CUDA-graph runner's buffers and per-column qparams, run without capture on CPU."""
    w, h, _ = correlated_layer(40, 256, seed=5)
    q = MinMaxQuantizer(4, False)
    kw = dict(block_size=block_size, act_order=act_order)
    plain = gptq_quantize(w, h, q, _path="eager", **kw)
    other = gptq_quantize(w, h, q, _path=path, **kw)
    assert torch.equal(plain.codes, other.codes)
    torch.testing.assert_close(plain.weight, other.weight)
    torch.testing.assert_close(plain.scale, other.scale)
    assert other.loss == pytest.approx(plain.loss, rel=1e-5)


def test_graph_path_falls_back_cleanly_without_cuda():
    w, h, _ = correlated_layer(40, 256, seed=8)
    q = MinMaxQuantizer(4, True)
    plain = gptq_quantize(w, h, q, block_size=64, _path="eager")
    with pytest.warns(RuntimeWarning, match="CUDA graph path unavailable"):
        fallback = gptq_quantize(w, h, q, block_size=64, _path="graph")
    assert torch.equal(plain.codes, fallback.codes)
    torch.testing.assert_close(plain.weight, fallback.weight)


def test_threads_split_rows_consistently(monkeypatch):
    # 600 rows go to two CPU threads; the same rows alone (one thread) must give the same codes.
    from quanta.plugins.gptq import solver
    monkeypatch.setattr(solver, "_MIN_ROWS_PER_THREAD", 128)
    assert len(solver._row_chunks(600, 64, torch.device("cpu"))[0]) == min(2, torch.get_num_threads())
    w, h, _ = correlated_layer(600, 64, seed=9)
    q = MinMaxQuantizer(4, True)
    both = gptq_quantize(w, h, q, block_size=16)
    few = gptq_quantize(w[:100], h, q, block_size=16)
    assert torch.equal(both.codes[:100], few.codes)


@pytest.mark.parametrize("act_order", [False, True])
def test_tall_weights_in_row_chunks_give_the_same_result(monkeypatch, act_order):
    # Over _WHOLE_BYTES a weight is solved in chunks of about _CHUNK_BYTES (memory); every
    # output must be bit for bit the one-piece solve's, also with narrower codes.
    from quanta.plugins.gptq import solver
    w, h, _ = correlated_layer(700, 64, seed=11)
    q = MinMaxQuantizer(4, act_order)  # with and without a zero point
    whole = gptq_quantize(w, h, q, block_size=16, act_order=act_order)
    monkeypatch.setattr(solver, "_MIN_ROWS_PER_THREAD", 64)
    monkeypatch.setattr(solver, "_WHOLE_BYTES", 100 * 64 * 4)
    monkeypatch.setattr(solver, "_CHUNK_BYTES", 96 * 64 * 4)
    chunks, _ = solver._row_chunks(700, 64, torch.device("cpu"))
    assert len(chunks) >= 7 and chunks[-1][1] == 700
    parts = gptq_quantize(w, h, q, block_size=16, act_order=act_order, codes_dtype=torch.int8)
    assert parts.codes.dtype == torch.int8
    assert torch.equal(parts.codes.int(), whole.codes)
    assert torch.equal(parts.weight, whole.weight) and torch.equal(parts.scale, whole.scale)
    assert (parts.zero_point is None) == (whole.zero_point is None)
    if whole.zero_point is not None:
        assert torch.equal(parts.zero_point, whole.zero_point)
    assert parts.loss == pytest.approx(whole.loss, rel=1e-5)


def test_result_is_consistent():
    w, h, _ = correlated_layer(48, 128, seed=1)
    q = MinMaxQuantizer(4, False)
    res = gptq_quantize(w, h, q, block_size=32)
    expanded = [t.repeat_interleave(32, dim=1) for t in (res.scale, res.zero_point)]
    torch.testing.assert_close(res.weight, (res.codes.float() - expanded[1]) * expanded[0])
    # loss = 1/2 tr((W - Q) H_damped (W - Q)^T), the identity behind the paper's Losses.
    h_damped = h + res.damp * h.diagonal().mean() * torch.eye(128)
    diff = (w - res.weight).double()
    assert res.loss == pytest.approx(0.5 * float(torch.trace(diff @ h_damped.double() @ diff.t())), rel=1e-3)


def test_gptq_beats_rtn_on_layer_output():
    # Strongly correlated inputs (32 latent factors + noise), where error feedback pays off.
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1024, 32, generator=gen) @ torch.randn(32, 128, generator=gen)
    x += 0.1 * torch.randn(1024, 128, generator=gen)
    w = torch.randn(64, 128, generator=gen)
    h = 2 * x.t() @ x / 1024
    q = MinMaxQuantizer(4, True)
    for block_size in (None, 32):
        res = gptq_quantize(w, h, q, block_size=block_size)
        groups = 1 if block_size is None else 128 // block_size
        wg = w.reshape(64 * groups, -1)
        s, z = q.fit(wg)
        rtn = q.dequantize(q.quantize(wg, s, z), s, z).reshape(64, 128)
        err_gptq = (x @ (w - res.weight).t()).norm()
        err_rtn = (x @ (w - rtn).t()).norm()
        assert err_gptq < 0.7 * err_rtn, (block_size, float(err_gptq), float(err_rtn))


def test_dead_inputs():
    w, h, _ = correlated_layer(32, 64, seed=4, dead=(0, 5, 63))
    assert float(h[5, 5]) == 0
    q = MinMaxQuantizer(4, False)
    for kw in (dict(), dict(block_size=16), dict(block_size=16, act_order=True)):
        res = gptq_quantize(w, h, q, **kw)
        assert torch.all(res.weight[:, [0, 5, 63]] == 0)
        assert torch.isfinite(res.weight).all()
        assert_matches_reference(res, *reference_gptq(w, h, q, **kw))


def test_cholesky_failure_raises_damp_with_warning():
    # Rank-deficient H (fewer samples than inputs) with no dampening is singular.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 32, generator=gen)
    h = 2 * x.t() @ x / 8
    w = torch.randn(16, 32, generator=gen)
    with pytest.warns(RuntimeWarning, match=r"retrying with damp=0\.0001") as record:
        res = gptq_quantize(w, h, MinMaxQuantizer(4, True), damp=0.0)
    assert res.damp > 0
    assert any(f"damp={res.damp:g}" in str(r.message) for r in record)
    assert torch.isfinite(res.weight).all()


def test_indefinite_hessian_gives_up_past_the_limit():
    h = -torch.eye(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(QuantizationError, match="not positive definite|mean diagonal"):
            gptq_quantize(torch.randn(4, 8), h, MinMaxQuantizer(4, True))
    h = torch.diag(torch.tensor([1.0, 1.0, -5.0, 10.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(QuantizationError, match="limit"):
            inverse_hessian_factor(h, 0.01)


def test_inverse_hessian_factor_matches_definition():
    _, h, _ = correlated_layer(1, 600, seed=7)  # 600 columns: exercises the split triangle inverse
    u, damp = inverse_hessian_factor(h, 0.01)
    assert damp == 0.01
    assert torch.equal(u, u.triu())
    h_damped = h.double() + 0.01 * h.diagonal().mean().double() * torch.eye(600, dtype=torch.float64)
    expected = torch.linalg.cholesky(torch.linalg.inv(h_damped), upper=True)
    torch.testing.assert_close(u.double(), expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("block_size", [0, 3, 48, -16, 2.0])
def test_invalid_block_size(block_size):
    w, h = torch.randn(8, 64), torch.eye(64)
    with pytest.raises(ValueError, match=rf"block_size={block_size!r}.*64 input columns"):
        gptq_quantize(w, h, MinMaxQuantizer(), block_size=block_size)


def test_invalid_inputs():
    q = MinMaxQuantizer()
    with pytest.raises(QuantizationError, match=r"hessian must be \[in, in\] = \[8, 8\]"):
        gptq_quantize(torch.randn(4, 8), torch.eye(7), q)
    with pytest.raises(QuantizationError, match="finite"):
        gptq_quantize(torch.full((4, 8), float("nan")), torch.eye(8), q)
    with pytest.raises(QuantizationError, match="processing_group_size"):
        gptq_quantize(torch.randn(4, 8), torch.eye(8), q, processing_group_size=0)
    with pytest.raises(QuantizationError, match="damp"):
        gptq_quantize(torch.randn(4, 8), torch.eye(8), q, damp=-1.0)


def test_inputs_not_modified():
    w, h, _ = correlated_layer(16, 64, seed=6, dead=(3,))
    w.requires_grad_(True)
    w0, h0 = w.detach().clone(), h.clone()
    res = gptq_quantize(w, h, MinMaxQuantizer(4, True), block_size=16, act_order=True)
    assert torch.equal(w.detach(), w0) and torch.equal(h, h0)
    assert not res.weight.requires_grad


@pytest.mark.parametrize("bits,symmetric", [(2, True), (3, False), (4, True), (8, False)])
def test_codes_in_range(bits, symmetric):
    w, h, _ = correlated_layer(32, 64, seed=bits)
    w[0] = 0  # a zero row: scale 1, codes 0
    w[1, :] = 1e4 * torch.randn(64)
    q = MinMaxQuantizer(bits, symmetric)
    res = gptq_quantize(w, h, q, block_size=16)
    assert int(res.codes.min()) >= q.qmin and int(res.codes.max()) <= q.qmax
    assert torch.all(res.weight[0] == 0)
    assert torch.isfinite(res.weight).all()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("block_size,batch", [(None, 48), (32, 32), (64, 48), (128, 48)])
def test_overlapped_trailing_updates_match_reference(threads, block_size, batch):
    # With 2 intra-op threads (CPU) each batch's far update runs in a worker thread while the
    # next batch is swept; with 1 it is one plain matmul per batch. Both are the paper's GPTQ.
    w, h, _ = correlated_layer(48, 384, seed=11)
    q = MinMaxQuantizer(4, True)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        res = gptq_quantize(w, h, q, block_size=block_size, processing_group_size=batch)
        assert torch.get_num_threads() == threads  # the sweep's own thread setting is undone
    finally:
        torch.set_num_threads(saved)
    assert_matches_reference(res, *reference_gptq(w, h, q, block_size=block_size))


@pytest.mark.parametrize("n", [1, 255, 256, 700])
def test_blocked_cholesky_in_place(n):
    from quanta.plugins.gptq.factor import _cholesky_in_place
    _, h, _ = correlated_layer(1, n, n_samples=2 * n + 8, seed=n)
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    a = torch.where(upper, 3.0 * h + 1.0, h)  # the strict upper triangle must not be read
    assert _cholesky_in_place(a)
    # Cholesky is backward stable: L Lᵀ reproduces h to float32 rounding whatever the thread count
    # (the factor itself may differ from a float64 one by h's conditioning).
    low = a.tril().double()
    torch.testing.assert_close(low @ low.t(), h.double(), rtol=1e-5, atol=1e-5 * float(h.abs().max()))
    assert bool((low.diagonal() > 0).all())
    bad = h.clone()
    bad[n // 2, n // 2] = -1.0
    assert not _cholesky_in_place(bad)


def test_feedback_factor_is_the_ul_factor():
    # G = R diag(R)^-1 with H_damped = R R^T, R upper; U = R^-1 is the paper's factor.
    from quanta.plugins.gptq.factor import error_feedback_factor
    _, h, _ = correlated_layer(1, 300, seed=12)
    h_damped = h + 0.01 * h.diagonal().mean() * torch.eye(300)
    g, d = error_feedback_factor(h_damped.flip(0, 1).contiguous())
    r = g.triu() * d
    torch.testing.assert_close((r.double() @ r.double().t()), h_damped.double(), rtol=1e-4,
                               atol=1e-4 * float(h_damped.abs().max()))
    u, _ = inverse_hessian_factor(h, 0.01)
    torch.testing.assert_close(d.reciprocal(), u.diagonal(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("n", [8, 1000, 1100, 2048])
def test_hessian_upper_blocks_mirrored(n):
    from quanta.plugins.gptq.hessian import accumulate_xtx, mirror_upper
    gen = torch.Generator().manual_seed(n)
    xs = [torch.randn(37, n, generator=gen), torch.randn(5, n, generator=gen)]
    xtx = torch.zeros(n, n)
    for x in xs:
        accumulate_xtx(xtx, x, alpha=0.5)
    mirror_upper(xtx)
    x = torch.cat(xs).double()
    torch.testing.assert_close(xtx.double(), 0.5 * x.t() @ x, rtol=1e-4, atol=1e-4)
    off_diagonal_blocks = xtx - xtx.t()
    assert float(off_diagonal_blocks.abs().max()) <= 1e-3  # exactly 0 outside the diagonal blocks


@pytest.mark.parametrize("n", [8, 1000, 1100, 2048])
def test_hessian_partials_by_row_block_equal_whole_partials(n):
    # The hooks' per-call partial, made one row block at a time in a small buffer, adds up to
    # the same sum, bit for bit, as a whole zeroed partial added at once (one order of addition).
    from quanta.plugins.gptq.hessian import accumulate_xtx, add_partial_xtx, mirror_upper, partial_rows
    gen = torch.Generator().manual_seed(n)
    xs = [torch.randn(37, n, generator=gen), torch.randn(5, n, generator=gen), torch.zeros(3, n)]
    xs[1][:, 2] = -0.0
    whole, by_block = torch.zeros(n, n), torch.zeros(n, n)
    buffer = torch.full((partial_rows(n), n), float("nan"))  # overwritten, never read
    assert partial_rows(n) <= max(n, 1024)
    for x in xs:
        whole.add_(accumulate_xtx(torch.zeros(n, n), x))
        add_partial_xtx(by_block, x, buffer)
    mirror_upper(whole), mirror_upper(by_block)
    assert torch.equal(whole.view(torch.int32), by_block.view(torch.int32))  # signs of zero too


@pytest.mark.parametrize("act_order", [False, True])
def test_overwritten_hessian_gives_the_same_result(act_order):
    # _overwrite_hessian (quanta's own callers) puts the factor in the Hessian's storage: the same
    # result as a solve that leaves it alone; a float64 Hessian is converted, never written.
    w, h, _ = correlated_layer(24, 128, seed=9, dead=(5,))
    kw = dict(block_size=32, act_order=act_order)
    kept = gptq_quantize(w, h, MinMaxQuantizer(4, False), **kw)
    spent = h.clone()
    over = gptq_quantize(w, spent, MinMaxQuantizer(4, False), _overwrite_hessian=True, **kw)
    for name in ("codes", "scale", "zero_point", "weight"):
        assert torch.equal(getattr(kept, name), getattr(over, name)), name
    assert kept.loss == over.loss and not torch.equal(spent, h)
    h64 = h.double()
    gptq_quantize(w, h64, MinMaxQuantizer(4, False), _overwrite_hessian=True, **kw)
    assert torch.equal(h64, h.double())
