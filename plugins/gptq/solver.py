"""GPTQ column solver (Frantar et al. 2022, arXiv:2210.17323): pure tensor math, no modules.

``gptq_quantize(weight, hessian, quantizer)`` quantizes a ``[out, in]`` weight one input
column at a time, feeding each column's rounding error forward into the columns not yet
quantized through the upper Cholesky factor ``U`` of the inverse Hessian
(``H^-1 = U^T U``). The math is the paper's; the speed comes from

* never forming ``U``: with ``H = R R^T`` (``R`` upper, ``U = R^-1``) the feedback is a
  triangular substitution with ``R`` (see :func:`error_feedback_factor`), so one blocked,
  in-place Cholesky replaces Cholesky, ``cholesky_inverse`` and a second Cholesky;
* working on the transposed weight (one contiguous row per input column), in lazy batches
  of ``processing_group_size`` columns split again into sub-batches of 16: a rank-1 update
  per column inside the sub-batch, one matmul per sub-batch and one per batch;
* on CPU, for tall weights (>= 8192 rows), the output rows (independent in GPTQ) split
  between two threads, and weights over 128 MiB are solved in row chunks of about 32 MiB
  (memory: an LM head is never copied whole); otherwise each batch's bulk trailing update runs in a worker thread
  while the next batch's per-column loop runs;
* on CUDA, one lazy batch's per-column loop captured once in a CUDA graph and replayed,
  checked against the plain path on its first batch (falls back to the plain path with a
  warning when capture fails or disagrees).

See ``docs/gptq-solver.md`` for the math, the options and the loss convention.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, Sequence

import attrs
import torch

from quanta.errors import QuantizationError

from .trailing import _TrailingUpdates
from .batch import (SUB_BATCH, GraphRunner, ShiftedBounds, affine_range, dequantize_into, quantize_into,
                    sweep_batch, sweep_batch_affine)
from .factor import (  # noqa: F401 - inverse_hessian_factor re-exported: it lived here first
    inverse_hessian_factor,
    damped_factor,
    error_feedback_factor,
    flip_into,
    all_finite,
    InPlaceFactor,
)

__all__ = ["GPTQQuantizer", "GPTQResult", "WorkBuffers", "gptq_quantize", "inverse_hessian_factor"]

#: Rows per CPU thread below which splitting the rows costs more than it saves: each thread
#: repeats the whole per-column Python loop and they share the GIL. Measured on 2 cores, one
#: thread wins at 4096 rows (0.11 s vs 0.20 s for 4096x1024) unless the machine is
#: oversubscribed, where OpenMP regions stall and split threads (1 intra-op thread each) win.
_MIN_ROWS_PER_THREAD = 4096


class GPTQQuantizer(Protocol):
    """What the solver needs from a quantization scheme; every method broadcasts over ``[out, k]``."""

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``w`` ``[out, k]`` -> ``(scale [out, 1], zero_point [out, 1] or None)`` from each row's min/max."""

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
        """Integer-valued float codes of ``w``, clamped to the scheme's range."""

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
        """``(codes - zero_point) * scale`` (``codes * scale`` without a zero point)."""


@attrs.frozen(kw_only=True)
class GPTQResult:
    """Output of :func:`gptq_quantize`.

    ``codes`` int32 (or ``codes_dtype``) ``[out, in]``; ``scale`` float32 ``[out, n_groups]`` (1 group per channel,
    ``in // block_size`` per block, in original column order); ``zero_point`` like ``scale`` or
    ``None``; ``weight`` float32 ``[out, in]`` = ``quantizer.dequantize(codes, scale, zero_point)``
    per group. ``loss`` is the paper's ``Losses.sum()``: ``1/2 * sum_j ((w_j - q_j) / U_jj)^2``, which
    equals ``1/2 * trace((W - Q) H_damped (W - Q)^T)``. ``damp`` is the dampening fraction used.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    weight: torch.Tensor
    loss: float
    damp: float


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantizer: GPTQQuantizer,
    *,
    block_size: int | None = None,
    processing_group_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    codes_dtype: torch.dtype = torch.int32,
    _path: str = "auto",
    _overwrite_hessian: bool = False,
    _workspace: WorkBuffers | None = None,
) -> GPTQResult:
    """Quantize ``weight`` ``[out, in]`` with GPTQ against ``hessian`` ``[in, in]`` (= 2 X^T X / n).

    Args:
        weight: float ``[out, in]``; a conv weight must be flattened to ``[out, in * k]`` by the caller.
        hessian: float ``[in, in]``, symmetric positive semi-definite.
        quantizer: a :class:`GPTQQuantizer` (per-row qparams from min/max).
        block_size: ``None`` for per-channel qparams (fit once on the whole weight), else the
            number of contiguous input columns sharing one scale; must divide ``in``.
        processing_group_size: columns per lazy batch (the paper's ``B``, default 128).
        damp: fraction of ``mean(diag(H))`` added to the diagonal. When the Cholesky fails it is
            raised tenfold (from ``1e-4`` when 0) with a warning, up to 1.0.
        act_order: sweep columns by descending ``diag(H)``. With ``block_size`` this forces
            ``static_groups=True``: blocks stay contiguous in the original column order (one scale
            per block, as exported), so their qparams are fit up front.
        static_groups: fit every block's qparams up front on the original (dead-zeroed) weight
            instead of on the error-updated weight when the sweep reaches the block.
        codes_dtype: the integer dtype of ``codes`` (a narrower one, e.g. the scheme's storage
            dtype, saves memory on large weights; it must hold the quantizer's range).

    Returns:
        :class:`GPTQResult` on the device of ``weight``. The inputs are not modified (but for
        ``_overwrite_hessian=True``, quanta's own callers, whose Hessians are exactly symmetric: the
        Hessian's storage then receives the factor, made in place without act-order, saving one or
        two Hessian-sized buffers). ``_workspace`` (quanta's own callers): a :class:`WorkBuffers` the
        sweep takes its ``[in, out]`` work buffers from and gives them back to, so that the next layer
        of the same size reuses their memory.

    Raises:
        QuantizationError (a ``ValueError``): bad shapes or block size, non-finite inputs, or a
        Hessian that stays indefinite after the damp limit.
    """
    _check_inputs(weight, hessian, block_size, processing_group_size, damp)
    if act_order and block_size is not None:
        static_groups = True
    with torch.no_grad():
        return _solve(weight, hessian, quantizer, block_size, processing_group_size, damp,
                      act_order, static_groups, _path, codes_dtype, _overwrite_hessian, _workspace)


def _check_inputs(weight, hessian, block_size, processing_group_size, damp) -> None:
    if weight.dim() != 2:
        raise QuantizationError(f"gptq: weight must be [out, in], got shape {tuple(weight.shape)}")
    n_in = weight.shape[1]
    if tuple(hessian.shape) != (n_in, n_in):
        raise QuantizationError(
            f"gptq: hessian must be [in, in] = [{n_in}, {n_in}] for weight {tuple(weight.shape)}, "
            f"got {tuple(hessian.shape)}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                   or block_size <= 0 or n_in % block_size):
        raise QuantizationError(
            f"gptq: block_size={block_size!r} must be a positive integer dividing the {n_in} input "
            f"columns of weight {tuple(weight.shape)}")
    if isinstance(processing_group_size, bool) or not isinstance(processing_group_size, int) \
            or processing_group_size <= 0:
        raise QuantizationError(f"gptq: processing_group_size={processing_group_size!r} must be a positive integer")
    if not (math.isfinite(damp) and damp >= 0):
        raise QuantizationError(f"gptq: damp={damp!r} must be a finite number >= 0")



def _solve(weight, hessian, quantizer, block_size, batch, damp, act_order, static_groups, path,
           codes_dtype=torch.int32, overwrite_hessian=False, workspace=None) -> GPTQResult:
    device = weight.device
    w = weight.detach().to(dtype=torch.float32)  # read only: the sweep works on transposed copies
    h = hessian.detach().to(device=device, dtype=torch.float32)  # read only until the factor is made
    # Where the factor G goes: h's storage when h is ours (a converted copy, or the caller gave it
    # up) and contiguous, else a new buffer. h is only read until the factorization succeeded.
    own_h = (overwrite_hessian or h.data_ptr() != hessian.data_ptr()) and h.is_contiguous()
    max_abs = None
    if overwrite_hessian and own_h and not act_order:  # InPlaceFactor needs max|H|: one pass gives both
        lo, hi = (float(v) for v in torch.aminmax(h))  # NaN and inf propagate
        max_abs = max(-lo, hi)
        h_finite = math.isfinite(lo) and math.isfinite(hi)
    else:
        h_finite = all_finite(h)
    if not (all_finite(w) and h_finite):
        raise QuantizationError("gptq: weight and hessian must be finite (found NaN or inf)")
    rows, n = w.shape

    # Inputs that never fire carry no information: zero their weights, keep H invertible.
    diag = h.diagonal()
    dead = diag == 0
    any_dead = bool(dead.any())
    if any_dead:
        diag = diag.masked_fill(dead, 1)
        w = w.clone()
        w[:, dead] = 0

    perm = None
    if act_order:
        perm = torch.argsort(diag, descending=True, stable=True)
    # The factorization takes H in reversed sweep order (see error_feedback_factor) and works
    # in place; building that is the one copy of H the solver makes (again per damp retry),
    # a block of rows at a time (no second full-size temporary).
    rev = torch.arange(n - 1, -1, -1, device=device) if perm is None else perm.flip(0)
    def reversed_hessian(h=h) -> torch.Tensor:
        h_rev = flip_into(h, torch.empty_like(h, memory_format=torch.contiguous_format),
                          None if perm is None else rev)
        if any_dead:
            h_rev.diagonal()[dead[rev]] = 1
        return h_rev

    def factor(h_rev: torch.Tensor, out=h if own_h else None) -> Any:
        return error_feedback_factor(h_rev, out=out)

    if overwrite_hessian and own_h and perm is None:
        # The caller gave up the (exactly symmetric) Hessian: reversed, factored and flipped back
        # in its own storage, with no second [n, n] matrix.
        in_place = InPlaceFactor(h, dead if any_dead else None, max_abs)
        (feedback, r_diag), damp_used = damped_factor(in_place.make, damp, in_place.factor)
        del in_place
    else:
        (feedback, r_diag), damp_used = damped_factor(reversed_hessian, damp, factor)
    del h, reversed_hessian, factor, diag

    n_groups = 1 if block_size is None else n // block_size
    dynamic = block_size is not None and not static_groups
    # group_of[j]: qparam group of the j-th column in sweep order.
    if block_size is None:
        group_of = [0] * n
    else:
        orig = perm.tolist() if perm is not None else range(n)
        group_of = [c // block_size for c in orig]

    block_inverse = None
    if dynamic:
        # G_bb^-1 for every diagonal block of G (unit upper triangular), for the dynamic fits.
        blocks = torch.stack([feedback[i:i + block_size, i:i + block_size] for i in range(0, n, block_size)])
        eye = torch.eye(block_size, dtype=feedback.dtype, device=device).expand_as(blocks)
        block_inverse = torch.linalg.solve_triangular(blocks, eye, upper=True, unitriangular=True)
    plan = SweepPlan(n=n, batch=batch, block_size=block_size if dynamic else None, group_of=group_of,
                      n_groups=n_groups, feedback=feedback, r_diag=r_diag, block_inverse=block_inverse)

    n_groups_out = n_groups
    codes_out = torch.empty(rows, n, dtype=codes_dtype, device=device)
    weight_out = torch.empty(rows, n, dtype=torch.float32, device=device)
    scale_out = torch.empty(rows, n_groups_out, dtype=torch.float32, device=device)
    zp_out: list[torch.Tensor | None] = [None]
    inverse = None if perm is None else torch.argsort(perm)

    def store(r0: int, r1: int, result: Any) -> float:
        # One chunk's rows of every output, in original column order; the float codes and the
        # sweep's work copies are freed with the chunk. The sweep's dequantized values are the
        # codes dequantized element by element with their group's qparams: the weight as is.
        codes_t, values_t, scale_t, zp_t, sq_err = result
        # The codes narrowed first, in their own layout, then transposed: a float -> int8 copy
        # across the transpose is several times slower than the two (exact either way).
        codes_t = codes_t.to(codes_dtype)
        if inverse is not None:
            codes_t = codes_t.index_select(0, inverse)
            values_t = values_t.index_select(0, inverse)
        scale_out[r0:r1] = scale_t.t()
        if zp_t is not None:
            if zp_out[0] is None:
                zp_out[0] = torch.empty(rows, n_groups_out, dtype=torch.float32, device=device)
            zp_out[0][r0:r1] = zp_t.t()
        weight_out[r0:r1] = values_t.t()
        del values_t
        codes_out[r0:r1] = codes_t.t()
        return sq_err

    chunks, workers = _row_chunks(rows, n, device)
    kept = workspace if workspace is not None and workers == 1 else None  # chunks one at a time: no sharing
    def run_chunk(r0: int, r1: int, overlap: bool = False) -> float:
        spent: list[torch.Tensor] = []
        loss = store(r0, r1, _sweep_rows(w[r0:r1], plan, quantizer, perm, static_groups, path, overlap, kept, spent))
        if kept is not None:  # the codes and values are copied out: the buffers are free for the next chunk or layer
            for buffer in spent:
                kept.give(buffer)
        return loss
    if len(chunks) == 1:
        losses = [run_chunk(*chunks[0], overlap=device.type == "cpu" and torch.get_num_threads() >= 2)]
    else:
        # Each worker gets its share of the intra-op threads (1 of 2 here): on a busy machine,
        # OpenMP regions inside the per-column loop cost far more than they gain. The setting is
        # per thread for OpenMP but global for MKL, so the caller's value is put back after.
        threads = torch.get_num_threads()
        def work(chunk) -> float:
            torch.set_num_threads(max(1, threads // workers))
            return run_chunk(*chunk)
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                losses = list(pool.map(work, chunks))
        finally:
            torch.set_num_threads(threads)
    loss = 0.5 * sum(losses)
    return GPTQResult(codes=codes_out, scale=scale_out, zero_point=zp_out[0],
                      weight=weight_out, loss=float(loss), damp=float(damp_used))


#: Weights above this many float32 bytes are solved in row chunks of about ``_CHUNK_BYTES``
#: each, one at a time: the sweep holds about four working copies of its rows, so an
#: LM head (32000 x 2048, 250 MiB) no longer needs several full-size copies at once. Rows are
#: independent in GPTQ, so the codes do not depend on the split.
_WHOLE_BYTES = 128 * 2**20
_CHUNK_BYTES = 32 * 2**20


def _row_chunks(rows: int, n: int, device: torch.device) -> tuple[list[tuple[int, int]], int]:
    """Row ranges solved separately, and how many run at once. On CPU, for tall weights, two
    Python threads (torch releases the GIL in kernels) take half the rows each; a weight over
    ``_WHOLE_BYTES`` is solved in chunks one at a time (memory)."""
    n_threads = torch.get_num_threads() if device.type == "cpu" else 1
    workers = max(1, min(2, n_threads, rows // _MIN_ROWS_PER_THREAD))
    n_chunks = workers
    if rows * n * 4 > _WHOLE_BYTES:  # memory first: one chunk at a time
        per_chunk = max(_MIN_ROWS_PER_THREAD, _CHUNK_BYTES // (4 * n))
        n_chunks = -(-rows // per_chunk)
        workers = 1
    step = -(-rows // n_chunks)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)], workers


@attrs.frozen(kw_only=True)
class SweepPlan:
    """Everything about the sweep that does not depend on the rows being processed."""

    n: int
    batch: int
    block_size: int | None  # set only when qparams are fit dynamically
    group_of: Sequence[int]
    n_groups: int
    feedback: torch.Tensor  # G [n, n]: R with column k divided by R_kk (see error_feedback_factor)
    r_diag: torch.Tensor  # diag(R) = 1 / diag(U) [n]
    block_inverse: torch.Tensor | None  # dynamic blocks: G_bb^-1 [n // block_size, bs, bs]

    def batches(self, length: int | None = None) -> list[tuple[int, int]]:
        """Lazy batches ``[i1, i2)``; a dynamically fit block never straddles a batch end unless it
        starts the batch (its columns must be fully error-updated when it is fit). With ``length``
        (the graph runner's, which divides the block size) the batches are all that long but the last."""
        if length is not None:
            return [(i, min(i + length, self.n)) for i in range(0, self.n, length)]
        out, i1 = [], 0
        while i1 < self.n:
            i2 = min(i1 + self.batch, self.n)
            if self.block_size is not None:
                last = (i2 - 1) // self.block_size * self.block_size
                if i1 < last and last + self.block_size > i2:
                    i2 = last
            out.append((i1, i2))
            i1 = i2
        return out

    def sub_batches(self, i1: int, i2: int) -> list[int]:
        """Starts of the sub-batches of ``[i1, i2)`` (local offsets), cut at block starts."""
        cuts = set(range(0, i2 - i1, SUB_BATCH))
        if self.block_size is not None:
            first = -(-i1 // self.block_size) * self.block_size
            cuts.update(b - i1 for b in range(first, i2, self.block_size))
        return sorted(cuts)


def _sweep_rows(w: torch.Tensor, plan: SweepPlan, quantizer, perm, static_groups, path, overlap=False,
                pool: WorkBuffers | None = None, spent: list | None = None) -> Any:
    """GPTQ on a block of rows ``w`` ``[r, n]``: returns (codes_t [n, r] float codes in sweep order,
    values_t [n, r] the codes dequantized, scale_t [G, r], zero_point_t [G, r] or None,
    sum_j ((w_j - q_j) / U_jj)^2).

    With ``overlap`` (CPU), each batch's update of the columns past the next batch runs in a
    second thread while the next batch is swept (see :class:`_TrailingUpdates`)."""
    n, bs = plan.n, plan.block_size
    rows = w.shape[0]
    # Fit what can be fit up front (per-channel, static blocks, and the first dynamic block,
    # whose columns are still unmodified) before the sweep reorders and updates the weight.
    if plan.n_groups == 1:
        fits = [quantizer.fit(w)]
    elif static_groups:
        size = n // plan.n_groups
        fits = [quantizer.fit(w[:, g * size:(g + 1) * size]) for g in range(plan.n_groups)]
    else:
        fits = [quantizer.fit(w[:, :bs])]
    has_zp = fits[0][1] is not None
    scale_t = torch.zeros(plan.n_groups, rows, dtype=torch.float32, device=w.device)
    zp_t = torch.zeros_like(scale_t) if has_zp else None
    for g, (s, z) in enumerate(fits):
        scale_t[g] = s.reshape(rows)
        if has_zp:
            zp_t[g] = z.reshape(rows)

    if pool is None:
        w0_t = (w.t() if perm is None else w.t()[perm]).contiguous()  # [n, r], one row per input column
        wt = w0_t.clone()  # error-updated
        diff_t = torch.empty_like(wt)  # w0_j - q_j, with w0_j the column before any update
    else:  # the same copies, into buffers a previous chunk or layer of this size left
        w0_t, wt, diff_t = (pool.take(n, rows, w.device) for _ in range(3))
        w0_t.copy_(w.t() if perm is None else w.t()[perm])
        wt.copy_(w0_t)
        if spent is not None:  # handed back by the caller once the results are copied out of them
            spent.extend((w0_t, wt, diff_t))
    scale_views = scale_t.unsqueeze(2).unbind(0)  # [r, 1] per group
    zp_views = zp_t.unsqueeze(2).unbind(0) if has_zp else None

    # The dynamic fits' two [bs, r] temporaries, made once (a fresh pair per block would be
    # page-faulted in anew on CPU each time).
    fit_bufs = torch.empty(2, bs, rows, dtype=torch.float32, device=w.device).unbind(0) if bs is not None else ()

    def fit_block(col: int) -> None:
        # The substitution's partial sums are not the paper's intermediate weights: with all
        # columns j < col fed back, the paper's block is W0 + (W - W0) G_bb^-1 (G_bb the block's
        # diagonal block of G, unit upper triangular), from U = R^-1 blockwise.
        w0b = w0_t[col:col + bs]
        delta = torch.sub(wt[col:col + bs], w0b, out=fit_bufs[0])
        state = torch.addmm(w0b, plan.block_inverse[col // bs].t(), delta, out=fit_bufs[1])
        s, z = quantizer.fit(state.t())
        scale_t[col // bs] = s.reshape(rows)
        if has_zp:
            zp_t[col // bs] = z.reshape(rows)
            if bounds is not None:
                bounds.refresh(col // bs)

    runner = GraphRunner.create(wt, plan, quantizer, has_zp, path)
    affine = affine_range(quantizer) if runner is None else None
    bounds = None if affine is None else ShiftedBounds(affine, zp_t, rows, w.device)
    fb = plan.feedback
    g = plan.group_of
    batches = plan.batches(runner.length if runner is not None else None)
    with _TrailingUpdates(wt, fb, diff_t, batches, bs, enabled=overlap and runner is None) as trailing:
        for b, (i1, i2) in enumerate(batches):
            if runner is not None and runner.handles(i1, i2):
                if bs is not None and i1 % bs == 0 and i1 > 0:
                    fit_block(i1)
                runner.run(i1, i2, wt, w0_t, scale_t, zp_t, diff_t)
            else:
                def before(k: int, i1=i1) -> None:
                    col = i1 + k
                    if bs is not None and col % bs == 0 and col > 0:
                        fit_block(col)
                if bounds is not None:
                    sweep_batch_affine(wt[i1:i2], w0_t[i1:i2], fb[i1:i2, i1:i2],
                                       [scale_views[g[j]] for j in range(i1, i2)],
                                       [bounds.lows[g[j]] for j in range(i1, i2)],
                                       [bounds.highs[g[j]] for j in range(i1, i2)], bounds.zero,
                                       diff_t[i1:i2], plan.sub_batches(i1, i2), before)
                else:
                    sweep_batch(wt[i1:i2], w0_t[i1:i2], fb[i1:i2, i1:i2],
                                [scale_views[g[j]] for j in range(i1, i2)],
                                [zp_views[g[j]] for j in range(i1, i2)] if has_zp else None,
                                diff_t[i1:i2], quantizer, plan.sub_batches(i1, i2), before)
            trailing.after_batch(b)
    del runner, fit_bufs, bounds
    # Row j of wt still holds column j exactly as it was quantized (updates only ever touch
    # later columns), so one vectorized quantize gives the loop's codes bit for bit.
    if perm is None:  # group g holds sweep rows g*per .. (g+1)*per - 1: broadcast, no [n, r] qparams
        per = n // plan.n_groups
        shape: Any = (plan.n_groups, per, rows)
        wt_g = wt.view(shape)
        scale_g = scale_t.unsqueeze(1)
        zp_g = zp_t.unsqueeze(1) if has_zp else None
    else:
        groups = torch.tensor(list(g), dtype=torch.long, device=wt.device)
        wt_g, shape = wt, wt.shape
        scale_g = scale_t.index_select(0, groups)
        zp_g = zp_t.index_select(0, groups) if has_zp else None
    # The codes go into diff_t's storage and the values into w0_t's (both spent): no fresh
    # [n, r] buffers, which on CPU cost a round of page faults each.
    codes_t = quantize_into(quantizer, wt_g, scale_g, zp_g, diff_t.view(shape))
    values_t = dequantize_into(quantizer, codes_t, scale_g, zp_g, w0_t.view(shape))
    del w0_t, diff_t
    # The loss uses the error-updated columns: ((w_j - q_j) / U_jj)^2 = ((w_j - q_j) R_jj)^2.
    wt_g.sub_(values_t)
    sq_err = float(wt.square_().sum(dim=1).dot(plan.r_diag.square()))
    del wt, wt_g
    return codes_t.view(n, rows), values_t.view(n, rows), scale_t, zp_t, sq_err


class WorkBuffers:
    """The sweep's ``[n, r]`` float32 work buffers kept between layers (one run of quanta's GPTQ): a layer
    of the same size takes them again instead of fresh memory, which on CPU is page-faulted in anew each
    time (three buffers of 4 MiB at d = 512). Only the last size is kept; one chunk at a time uses it."""

    def __init__(self) -> None:
        self.free: list[torch.Tensor] = []

    def take(self, n: int, rows: int, device: torch.device) -> torch.Tensor:
        """A ``[n, rows]`` contiguous float32 buffer (contents undefined)."""
        for i, t in enumerate(self.free):
            if t.numel() == n * rows and t.device == device:
                return self.free.pop(i).view(n, rows)
        self.free = [t for t in self.free if t.numel() == n * rows]  # another size: drop the old ones
        return torch.empty(n, rows, dtype=torch.float32, device=device)

    def give(self, t: torch.Tensor) -> None:
        """Hand back a buffer :meth:`take` gave, once nothing reads or writes it any more."""
        self.free.append(t.view(-1))

    def clear(self) -> None:
        self.free.clear()
