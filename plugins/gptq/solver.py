"""GPTQ column solver (Frantar et al. 2022, arXiv:2210.17323): pure tensor math, no modules.

``gptq_quantize(weight, hessian, quantizer)`` quantizes a ``[out, in]`` weight one input
column at a time, feeding each column's rounding error forward into the columns not yet
quantized through the upper Cholesky factor ``U`` of the inverse Hessian
(``H^-1 = U^T U``). The math is the paper's; the speed comes from

* computing ``U`` with one Cholesky factorization and one triangular inverse
  (``H = R R^T`` with ``R`` upper, ``U = R^-1``) instead of Cholesky, ``cholesky_inverse``
  and a second Cholesky;
* working on the transposed weight (one contiguous row per input column), in lazy batches
  of ``processing_group_size`` columns split again into sub-batches of 16: a rank-1 update
  per column inside the sub-batch, one matmul per sub-batch and one per batch;
* on CPU, for tall weights (>= 8192 rows), the output rows (independent in GPTQ) split
  between two threads;
* on CUDA, one lazy batch's per-column loop captured once in a CUDA graph and replayed,
  checked against the plain path on its first batch (falls back to the plain path with a
  warning when capture fails or disagrees).

See ``docs/gptq-solver.md`` for the math, the options and the loss convention.
"""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Protocol, Sequence

import attrs
import torch

from quanta.errors import QuantizationError

__all__ = ["GPTQQuantizer", "GPTQResult", "gptq_quantize", "inverse_hessian_factor"]

#: Columns per inner sub-batch: small enough that its slab stays in L1/L2 on CPU.
_SUB_BATCH = 16
#: Largest triangle inverted directly with a triangular solve; larger ones are split.
_TRIANGLE_BASE = 256
#: Damp retries multiply by 10 and stop above this fraction of mean(diag(H)).
_MAX_DAMP = 1.0
#: First retry when the caller asked for ``damp=0``.
_FIRST_NONZERO_DAMP = 1e-4
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

    ``codes`` int32 ``[out, in]``; ``scale`` float32 ``[out, n_groups]`` (1 group per channel,
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
    _path: str = "auto",
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

    Returns:
        :class:`GPTQResult` on the device of ``weight``. The inputs are not modified.

    Raises:
        QuantizationError (a ``ValueError``): bad shapes or block size, non-finite inputs, or a
        Hessian that stays indefinite after the damp limit.
    """
    _check_inputs(weight, hessian, block_size, processing_group_size, damp)
    if act_order and block_size is not None:
        static_groups = True
    with torch.no_grad():
        return _solve(weight, hessian, quantizer, block_size, processing_group_size, damp,
                      act_order, static_groups, _path)


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


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1``, and the damp used.

    ``hessian`` float32 ``[n, n]`` with no zero diagonal (dead inputs already set to 1); it is not
    modified. Returns ``U`` float32 ``[n, n]`` upper triangular with ``U^T U = H_damped^-1``. When
    the factorization fails the damp is raised tenfold (from ``1e-4`` when 0) with a
    ``RuntimeWarning`` naming the new value; past 1.0 a :class:`QuantizationError` is raised.
    """
    return _factor_in_place(hessian.detach().to(torch.float32, copy=True), damp)


def _factor_in_place(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    # Like inverse_hessian_factor, but adds the damping to ``h``'s diagonal in place.
    mean_diag = float(h.diagonal().mean())
    if not (math.isfinite(mean_diag) and mean_diag > 0):
        raise QuantizationError(f"gptq: the Hessian's mean diagonal is {mean_diag}; expected a positive number")
    added = 0.0
    while True:
        h.diagonal().add_(damp * mean_diag - added)
        added = damp * mean_diag
        u = _upper_inverse_cholesky(h)
        if u is not None:
            return u, damp
        new = damp * 10 if damp > 0 else _FIRST_NONZERO_DAMP
        if new > _MAX_DAMP:
            raise QuantizationError(
                f"gptq: the Hessian is not positive definite even with damp={damp:g} "
                f"(limit {_MAX_DAMP:g}); check the calibration data for NaN/inf or constant inputs")
        warnings.warn(f"gptq: Cholesky of the Hessian failed with damp={damp:g}; retrying with damp={new:g}",
                      RuntimeWarning, stacklevel=3)
        damp = new


def _upper_inverse_cholesky(h: torch.Tensor) -> torch.Tensor | None:
    # Cholesky of the reversed matrix gives H = R R^T with R upper triangular (an "UL"
    # factorization); then U = R^-1 is upper with U^T U = (R R^T)^-1 = H^-1, i.e. the upper
    # Cholesky factor of H^-1, for one factorization and one triangular inverse.
    lower, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if int(info) != 0:
        return None
    u = _invert_upper(lower.flip(0, 1))
    if not _all_finite(u):
        return None
    return u


def _all_finite(t: torch.Tensor) -> bool:
    # One pass instead of isfinite's several: NaN and inf survive a float64 sum, and float32
    # values cannot overflow it.
    return math.isfinite(float(t.sum(dtype=torch.float64)))


def _invert_upper(r: torch.Tensor) -> torch.Tensor:
    """Inverse of the upper-triangular ``r`` ``[n, n]`` (float32; result upper triangular)."""
    out = torch.zeros_like(r)
    eye = torch.eye(min(r.shape[0], _TRIANGLE_BASE), dtype=r.dtype, device=r.device)
    _invert_upper_into(r, out, eye)
    return out


def _invert_upper_into(r: torch.Tensor, out: torch.Tensor, eye: torch.Tensor) -> None:
    # inv([[A, B], [0, C]]) = [[A^-1, -A^-1 B C^-1], [0, C^-1]]: the work is two matmuls per
    # level, which run near peak on CPU and GPU (a triangular solve against I does not).
    # Results are written in place (strided GEMM output): on a busy CPU every extra
    # elementwise pass over the matrix costs a scheduler time slice.
    n = r.shape[0]
    if n <= _TRIANGLE_BASE:
        torch.linalg.solve_triangular(r, eye[:n, :n], upper=True, out=out)
        return
    m = (n // 2) // 64 * 64
    _invert_upper_into(r[:m, :m], out[:m, :m], eye)
    _invert_upper_into(r[m:, m:], out[m:, m:], eye)
    right = torch.mm(out[:m, :m], r[:m, m:])
    torch.addmm(out[:m, m:], right, out[m:, m:], beta=0, alpha=-1, out=out[:m, m:])


def _solve(weight, hessian, quantizer, block_size, batch, damp, act_order, static_groups, path) -> GPTQResult:
    device = weight.device
    w = weight.detach().to(dtype=torch.float32)  # read only: the sweep works on transposed copies
    h = hessian.detach().to(device=device, dtype=torch.float32, copy=True)
    if not (_all_finite(w) and _all_finite(h)):
        raise QuantizationError("gptq: weight and hessian must be finite (found NaN or inf)")
    rows, n = w.shape

    # Inputs that never fire carry no information: zero their weights, keep H invertible.
    dead = h.diagonal() == 0
    if bool(dead.any()):
        h.diagonal()[dead] = 1
        w = w.clone()
        w[:, dead] = 0

    perm = None
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        h = h[perm][:, perm]
    u, damp_used = _factor_in_place(h, damp)
    del h
    # Row j of U divided by U_jj: the error feedback of column j is then (w_j - q_j) times that
    # row, and the per-column division drops out of the loop.
    invd = u.diagonal().reciprocal()
    u.mul_(invd.unsqueeze(1))

    n_groups = 1 if block_size is None else n // block_size
    dynamic = block_size is not None and not static_groups
    # group_of[j]: qparam group of the j-th column in sweep order.
    if block_size is None:
        group_of = [0] * n
    else:
        orig = perm.tolist() if perm is not None else range(n)
        group_of = [c // block_size for c in orig]

    plan = _SweepPlan(n=n, batch=batch, block_size=block_size if dynamic else None, group_of=group_of,
                      n_groups=n_groups, u=u, invd=invd)

    chunks = _row_chunks(rows, device)
    def run_chunk(r0: int, r1: int):
        return _sweep_rows(w[r0:r1], plan, quantizer, perm, static_groups, path)
    if len(chunks) == 1:
        results = [run_chunk(*chunks[0])]
    else:
        # Each worker gets its share of the intra-op threads (1 of 2 here): on a busy machine,
        # OpenMP regions inside the per-column loop cost far more than they gain. The setting is
        # per thread for OpenMP but global for MKL, so the caller's value is put back after.
        threads = torch.get_num_threads()
        def work(chunk):
            torch.set_num_threads(max(1, threads // len(chunks)))
            return run_chunk(*chunk)
        try:
            with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
                results = list(pool.map(work, chunks))
        finally:
            torch.set_num_threads(threads)

    codes_t = torch.cat([r[0] for r in results], dim=1)
    scale_t = torch.cat([r[1] for r in results], dim=1)
    zp_t = None if results[0][2] is None else torch.cat([r[2] for r in results], dim=1)
    loss = 0.5 * sum(r[3] for r in results)

    if perm is not None:
        codes_t = codes_t.index_select(0, torch.argsort(perm))
    codes_f = codes_t.t().contiguous()
    scale = scale_t.t().contiguous()
    zero_point = None if zp_t is None else zp_t.t().contiguous()
    per_group = n // n_groups
    scale_full = scale.repeat_interleave(per_group, dim=1)
    zp_full = None if zero_point is None else zero_point.repeat_interleave(per_group, dim=1)
    dequantized = quantizer.dequantize(codes_f, scale_full, zp_full).to(torch.float32)
    return GPTQResult(codes=codes_f.to(torch.int32), scale=scale, zero_point=zero_point,
                      weight=dequantized, loss=float(loss), damp=float(damp_used))


def _row_chunks(rows: int, device: torch.device) -> list[tuple[int, int]]:
    # Rows are independent in GPTQ. On CPU, for very tall weights, two Python threads (torch
    # releases the GIL in kernels) each take half the rows.
    n_threads = torch.get_num_threads() if device.type == "cpu" else 1
    n_chunks = max(1, min(2, n_threads, rows // _MIN_ROWS_PER_THREAD))
    step = -(-rows // n_chunks)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


@attrs.frozen(kw_only=True)
class _SweepPlan:
    """Everything about the sweep that does not depend on the rows being processed."""

    n: int
    batch: int
    block_size: int | None  # set only when qparams are fit dynamically
    group_of: Sequence[int]
    n_groups: int
    u: torch.Tensor
    invd: torch.Tensor

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
        cuts = set(range(0, i2 - i1, _SUB_BATCH))
        if self.block_size is not None:
            first = -(-i1 // self.block_size) * self.block_size
            cuts.update(b - i1 for b in range(first, i2, self.block_size))
        return sorted(cuts)


def _sweep_rows(w: torch.Tensor, plan: _SweepPlan, quantizer, perm, static_groups, path):
    """GPTQ on a block of rows ``w`` ``[r, n]``: returns (codes_t [n, r] float codes in sweep order,
    scale_t [G, r], zero_point_t [G, r] or None, sum_j ((w_j - q_j) / U_jj)^2)."""
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

    wt = (w.t() if perm is None else w.t()[perm]).contiguous()  # [n, r], one row per input column
    diff_t = torch.empty_like(wt)  # w_j - q_j, with w_j the error-updated column
    scale_views = scale_t.unsqueeze(2).unbind(0)  # [r, 1] per group
    zp_views = zp_t.unsqueeze(2).unbind(0) if has_zp else None

    def fit_block(col: int) -> None:
        s, z = quantizer.fit(wt[col:col + bs].t())
        scale_t[col // bs] = s.reshape(rows)
        if has_zp:
            zp_t[col // bs] = z.reshape(rows)

    runner = _GraphRunner.create(wt, plan, quantizer, has_zp, path)
    u = plan.u
    g = plan.group_of
    for i1, i2 in plan.batches(runner.length if runner is not None else None):
        if runner is not None and runner.handles(i1, i2):
            if bs is not None and i1 % bs == 0 and i1 > 0:
                fit_block(i1)
            runner.run(i1, i2, wt, scale_t, zp_t, diff_t)
        else:
            def before(k: int, i1=i1) -> None:
                col = i1 + k
                if bs is not None and col % bs == 0 and col > 0:
                    fit_block(col)
            _sweep_batch(wt[i1:i2], u[i1:i2, i1:i2],
                         [scale_views[g[j]] for j in range(i1, i2)],
                         [zp_views[g[j]] for j in range(i1, i2)] if has_zp else None,
                         diff_t[i1:i2], quantizer, plan.sub_batches(i1, i2), before)
        if i2 < n:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), diff_t[i1:i2], alpha=-1)
    sq_err = float(diff_t.square().sum(dim=1).dot(plan.invd.square()))
    # Row j of wt still holds column j exactly as it was quantized (updates only ever touch
    # later columns), so one vectorized quantize gives the loop's codes bit for bit.
    groups = torch.tensor(list(g), dtype=torch.long, device=wt.device)
    codes_t = quantizer.quantize(wt, scale_t.index_select(0, groups),
                                 zp_t.index_select(0, groups) if has_zp else None)
    return codes_t, scale_t, zp_t, sq_err


def _sweep_batch(wb: torch.Tensor, ub: torch.Tensor, scales, zero_points, diff: torch.Tensor,
                 quantizer, starts: Sequence[int],
                 before: Callable[[int], None] | None = None) -> None:
    """Quantize the lazy batch ``wb`` ``[L, r]`` (transposed weight, updated in place) column by column.

    ``ub`` ``[L, L]`` is the batch's diagonal block of ``U`` with row ``j`` divided by ``U_jj``;
    ``scales[j]``/``zero_points[j]`` ``[r, 1]`` are column ``j``'s qparams. Writes ``w_j - q_j`` to
    ``diff`` ``[L, r]``; row ``j`` of ``wb`` is left as the column was quantized. ``starts`` are the
    sub-batch starts (each followed by one matmul update of the rest of the batch); ``before(k)``
    runs at each.
    """
    n_cols = wb.shape[0]
    w_cols = wb.unsqueeze(2).unbind(0)  # [r, 1] views, made in one call
    d_cols = diff.unsqueeze(2).unbind(0)
    d_rows = diff.unbind(0)
    ends = list(starts[1:]) + [n_cols]
    for k1, k2 in zip(starts, ends):
        if before is not None:
            before(k1)
        for j in range(k1, k2):
            w, s = w_cols[j], scales[j]
            z = zero_points[j] if zero_points is not None else None
            c = quantizer.quantize(w, s, z)
            torch.sub(w, quantizer.dequantize(c, s, z), out=d_cols[j])
            if j + 1 < k2:
                wb[j + 1:k2].addr_(ub[j, j + 1:k2], d_rows[j], alpha=-1)
        if k2 < n_cols:
            wb[k2:].addmm_(ub[k1:k2, k2:].t(), diff[k1:k2], alpha=-1)


class _GraphRunner:
    """Runs whole lazy batches of one fixed length from static buffers; on CUDA, as a replayed graph.

    The launch-bound per-column loop of a batch (about 8 kernels per column) is captured once
    and replayed for every batch of that length; qparams come per column from a buffer, so a
    batch may only need a fit at its first column (done outside the graph). The first replay is
    compared with the plain path on the same inputs; on any failure the solver warns and uses
    the plain path. ``path="static"`` runs the same buffers without capture (tests on CPU).
    """

    def __init__(self, length: int, rows: int, device, plan: _SweepPlan, quantizer, has_zp: bool, capture: bool):
        self.length, self.plan, self.quantizer, self.capture = length, plan, quantizer, capture
        f32 = dict(dtype=torch.float32, device=device)
        self.wb = torch.empty(length, rows, **f32)
        self.ub = torch.empty(length, length, **f32)
        self.scale = torch.empty(length, rows, 1, **f32)
        self.zp = torch.empty(length, rows, 1, **f32) if has_zp else None
        self.diff = torch.empty(length, rows, **f32)
        self.group_of = torch.tensor(list(plan.group_of), dtype=torch.long, device=device)
        self.graph = None
        self.failed = False

    @classmethod
    def create(cls, wt, plan: _SweepPlan, quantizer, has_zp, path) -> _GraphRunner | None:
        if path == "eager" or (path == "auto" and wt.device.type != "cuda"):
            return None
        if path not in ("auto", "static", "graph"):
            raise ValueError(f"_path={path!r}; allowed: 'auto', 'eager', 'static', 'graph'")
        length = plan.batch
        if plan.block_size is not None:
            # Fits happen outside the graph, so every block start must be a batch start.
            bs = plan.block_size
            length = bs if bs <= plan.batch else max(d for d in range(1, plan.batch + 1) if bs % d == 0)
        if length < 2 or length > plan.n:
            return None
        return cls(length, wt.shape[1], wt.device, plan, quantizer, has_zp, capture=path != "static")

    def handles(self, i1: int, i2: int) -> bool:
        return not self.failed and i2 - i1 == self.length

    def _body(self) -> None:
        starts = list(range(0, self.length, _SUB_BATCH))
        _sweep_batch(self.wb, self.ub, self.scale.unbind(0), None if self.zp is None else self.zp.unbind(0),
                     self.diff, self.quantizer, starts)

    def _load(self, i1, i2, wt, scale_t, zp_t) -> None:
        groups = self.group_of[i1:i2]
        self.wb.copy_(wt[i1:i2])
        self.ub.copy_(self.plan.u[i1:i2, i1:i2])
        self.scale.copy_(scale_t.index_select(0, groups).unsqueeze(2))
        if self.zp is not None:
            self.zp.copy_(zp_t.index_select(0, groups).unsqueeze(2))

    def run(self, i1, i2, wt, scale_t, zp_t, diff_t) -> None:
        if self.capture and self.graph is None:
            self._capture_and_check(i1, i2, wt, scale_t, zp_t)
        if self.failed:
            # Same math on the same buffers, without the graph.
            self._load(i1, i2, wt, scale_t, zp_t)
            self._body()
        else:
            self._load(i1, i2, wt, scale_t, zp_t)
            if self.graph is not None:
                self.graph.replay()
            else:
                self._body()
        diff_t[i1:i2].copy_(self.diff)
        wt[i1:i2].copy_(self.wb)  # the columns as quantized, for the final codes

    def _capture_and_check(self, i1, i2, wt, scale_t, zp_t) -> None:
        try:
            stream = torch.cuda.Stream(device=wt.device)
            stream.wait_stream(torch.cuda.current_stream(wt.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up allocations and cuBLAS handles off the capture
                    self._load(i1, i2, wt, scale_t, zp_t)
                    self._body()
            torch.cuda.current_stream(wt.device).wait_stream(stream)
            expected_diff, expected_w = self.diff.clone(), self.wb.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._body()
            self._load(i1, i2, wt, scale_t, zp_t)
            graph.replay()
            torch.cuda.synchronize(wt.device)
            if not (torch.allclose(self.wb, expected_w, rtol=1e-4, atol=1e-6)
                    and torch.allclose(self.diff, expected_diff, rtol=1e-4, atol=1e-6)):
                raise RuntimeError("the replayed graph disagrees with the plain path")
            self.graph = graph
        except Exception as e:  # noqa: BLE001 - any capture problem means: use the plain path
            warnings.warn(f"gptq: CUDA graph path unavailable ({type(e).__name__}: {e}); using the plain path",
                          RuntimeWarning, stacklevel=2)
            self.failed = True
            self.graph = None
