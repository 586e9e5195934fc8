"""The inverse-Hessian factor of GPTQ: damped, blocked Cholesky factorizations.

Split from ``solver`` (the column sweep); see ``docs/gptq-solver.md`` for the math.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch

from quanta.errors import QuantizationError

__all__ = ["inverse_hessian_factor", "damped_factor", "error_feedback_factor", "flip_into", "flip_in_place",
           "InPlaceFactor", "all_finite"]

#: Largest triangle inverted directly with a triangular solve; larger ones are split.
_TRIANGLE_BASE = 256
#: Columns per block of the blocked Cholesky (256 measured best of 256/512/1024 at n = 4096).
_CHOLESKY_BLOCK = 256
#: Damp retries multiply by 10 and stop above this fraction of mean(diag(H)).
_MAX_DAMP = 1.0
#: First retry when the caller asked for ``damp=0``.
_FIRST_NONZERO_DAMP = 1e-4


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1``, and the damp used.

    ``hessian`` float32 ``[n, n]`` with no zero diagonal (dead inputs already set to 1); it is not
    modified. Returns ``U`` float32 ``[n, n]`` upper triangular with ``U^T U = H_damped^-1``. When
    the factorization fails the damp is raised tenfold (from ``1e-4`` when 0) with a
    ``RuntimeWarning`` naming the new value; past 1.0 a :class:`QuantizationError` is raised.
    """
    return damped_factor(lambda: hessian.detach().to(torch.float32, copy=True), damp, _upper_inverse_cholesky)


def damped_factor(make: Callable[[], torch.Tensor], damp: float, factor: Callable[[torch.Tensor], object]) -> Any:
    # ``make()`` returns a fresh, undamped float32 copy of the Hessian (in whatever order
    # ``factor`` wants); the damping is added to its diagonal and ``factor(h)`` may destroy it,
    # returning None on failure, after which a fresh copy is made for the next damp.
    h = make()
    mean_diag = float(h.diagonal().mean())
    if not (math.isfinite(mean_diag) and mean_diag > 0):
        raise QuantizationError(f"gptq: the Hessian's mean diagonal is {mean_diag}; expected a positive number")
    while True:
        h.diagonal().add_(damp * mean_diag)
        out = factor(h)
        if out is not None:
            return out, damp
        new = damp * 10 if damp > 0 else _FIRST_NONZERO_DAMP
        if new > _MAX_DAMP:
            raise QuantizationError(
                f"gptq: the Hessian is not positive definite even with damp={damp:g} "
                f"(limit {_MAX_DAMP:g}); check the calibration data for NaN/inf or constant inputs")
        warnings.warn(f"gptq: Cholesky of the Hessian failed with damp={damp:g}; retrying with damp={new:g}",
                      RuntimeWarning, stacklevel=3)
        damp = new
        h = make()


def _upper_inverse_cholesky(h: torch.Tensor) -> torch.Tensor | None:
    # Cholesky of the reversed matrix gives H = R R^T with R upper triangular (an "UL"
    # factorization); then U = R^-1 is upper with U^T U = (R R^T)^-1 = H^-1, i.e. the upper
    # Cholesky factor of H^-1, for one factorization and one triangular inverse.
    lower = h.flip(0, 1)
    if not _cholesky_in_place(lower):
        return None
    u = _invert_upper(lower.flip(0, 1).triu_())
    if not all_finite(u):
        return None
    return u


def error_feedback_factor(h_rev: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(G, d)`` for the damped Hessian given reversed, ``h_rev = H.flip(0, 1)`` ``[n, n]``:
    ``H = R R^T`` with ``R`` upper triangular,
    ``d = diag(R)`` ``[n]`` and ``G = R diag(d)^-1`` ``[n, n]`` (column ``k`` divided by ``R_kk``);
    None when the Cholesky fails or ``G`` is not finite. ``G`` is written into ``out`` (``[n, n]``
    float32, contiguous, e.g. the Hessian's own storage once it is no longer needed) when given,
    else into a new tensor; ``h_rev`` is overwritten either way.

    GPTQ's feedback through ``U = R^-1`` (``W[:, k] -= sum_{j<k} (w_j - q_j) / U_jj * U_jk`` with
    ``w_j`` error-updated) unrolls to ``W[:, k] += sum_{j<k} (w0_j - q_j) * G_jk`` with ``w0_j`` the
    column before any update: from ``W0 - Q = Delta U`` (``Delta`` the scaled errors), ``Delta =
    (W0 - Q) R``. So the sweep is a triangular substitution with ``R`` and ``U`` is never formed.
    """
    # h_rev = L L^T, so H = (J L J)(J L J)^T. Only the lower triangle of L is written; the
    # upper keeps h_rev's values, which end up below G's diagonal where nothing reads them.
    if not _cholesky_in_place(h_rev):
        return None
    lower = h_rev
    # In place on the reversed factor (column b of lower is column n-1-b of R), then one flip.
    diag = lower.diagonal().clone()
    lower.div_(diag)
    if not all_finite(lower):
        return None
    return flip_into(lower, out if out is not None else torch.empty_like(lower)), diag.flip(0)


#: Rows per step of :func:`flip_into` (a temporary of this many rows).
_FLIP_ROWS = 256


def flip_into(src: torch.Tensor, out: torch.Tensor, rows_of: torch.Tensor | None = None) -> torch.Tensor:
    """``out`` ``[n, n]`` = ``src.flip(0, 1)`` (or, with ``rows_of`` an order of ``0..n-1``,
    ``src[rows_of][:, rows_of]``), written a block of rows at a time: no full-size temporary.
    ``out`` must not overlap ``src``. Returns ``out``."""
    n = src.shape[0]
    for i in range(0, n, _FLIP_ROWS):
        j = min(i + _FLIP_ROWS, n)
        if rows_of is None:
            out[i:j].copy_(src[n - j:n - i].flip(0, 1))
        else:
            torch.index_select(src.index_select(0, rows_of[i:j]), 1, rows_of, out=out[i:j])
    return out


def flip_in_place(a: torch.Tensor) -> torch.Tensor:
    """``a`` ``[n, n]`` = ``a.flip(0, 1)``, in place: row blocks ``i`` and ``n - 1 - i`` swapped and reversed a
    block at a time (temporaries of one block, no second matrix). Returns ``a``."""
    n = a.shape[0]
    half = n // 2
    for i in range(0, half, _FLIP_ROWS):
        j = min(i + _FLIP_ROWS, half)
        top = a[i:j].flip(0, 1)
        a[i:j].copy_(a[n - j:n - i].flip(0, 1))
        a[n - j:n - i].copy_(top)
    if n % 2:
        a[half].copy_(a[half].flip(0))
    return a


class InPlaceFactor:
    """:func:`error_feedback_factor` made in the Hessian's own storage, for :func:`damped_factor`: no
    second ``[n, n]`` matrix, and no fresh one to fault in.

    ``h`` ``[n, n]`` float32, contiguous, exactly symmetric (quanta's Hessian hooks mirror one triangle),
    the solver's to overwrite; ``dead`` the inputs whose diagonal is set to 1. :meth:`make` reverses
    ``h`` in place the first time (the same matrix :func:`flip_into` makes) and keeps its diagonal
    blocks (``n x`` ``_CHOLESKY_BLOCK`` floats); :meth:`factor` runs the blocked Cholesky on it, divides
    only the factor's panels (the strict upper triangle, outside the diagonal blocks, still holds the
    reversed Hessian) and checks finiteness as :func:`error_feedback_factor` does over the whole
    matrix, then flips ``G`` back in place. After a failure :meth:`make` rebuilds the reversed Hessian
    from that upper triangle (symmetry) and the kept diagonal blocks: the same matrix, for the next damp.
    """

    def __init__(self, h: torch.Tensor, dead: torch.Tensor | None, max_abs: float | None = None) -> None:
        self.h, self.dead = h, dead
        self.max_abs = max_abs  # max|h| when the caller has it (the solver's finiteness check), else measured
        n = h.shape[0]
        self.blocks = [(k, min(k + _CHOLESKY_BLOCK, n)) for k in range(0, n, _CHOLESKY_BLOCK)]
        self.kept: list[torch.Tensor] | None = None

    def make(self) -> torch.Tensor:
        """The reversed, undamped Hessian in ``h``'s storage (first call: flipped; later: rebuilt)."""
        a = self.h
        if self.kept is None:
            if self.max_abs is None:
                lo, hi = torch.aminmax(a)
                self.max_abs = max(-float(lo), float(hi))  # bounds the strict upper triangle kept in a
            flip_in_place(a)
            if self.dead is not None:
                a.diagonal()[self.dead.flip(0)] = 1
            self.kept = [a[k:e, k:e].clone() for k, e in self.blocks]
            return a
        for (k, e), block in zip(self.blocks, self.kept):
            a[k:e, k:e].copy_(block)
            a[e:, k:e].copy_(a[k:e, e:].t())
        return a

    def factor(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(G, d)`` as :func:`error_feedback_factor` (``G`` in ``a``'s storage), or None (``a`` can be rebuilt)."""
        if not _cholesky_in_place(a):
            return None
        diag = a.diagonal().clone()
        finite = True
        for k, e in self.blocks:
            finite = finite and all_finite(a[k:, k:e].div_(diag[k:e]))
        # The copying path's check also saw the strict upper triangle divided by the diagonal (d > 0):
        # no |x| / d overflows when max|x| / min d does not (rounding is monotonic); else each column's
        # maximum decides, as x / d overflows exactly when max|x| / d does.
        bound = self.max_abs if self.max_abs is not None else math.inf  # set by make(), which runs first
        if finite and not math.isfinite(_div(bound, float(diag.min()))):
            for k, e in self.blocks[1:]:
                lo, hi = torch.aminmax(a[:k, k:e], dim=0)
                finite = finite and all_finite(torch.maximum(hi, lo.neg()).div_(diag[k:e]))
        if not finite:
            return None
        return flip_in_place(a), diag.flip(0)


def _div(x: float, y: float) -> float:
    """``x / y`` rounded to float32 as torch would (inf on overflow, nan for 0 / 0)."""
    return float(torch.tensor(x, dtype=torch.float32) / torch.tensor(y, dtype=torch.float32))


def _cholesky_in_place(a: torch.Tensor) -> bool:
    """Overwrite the lower triangle of the symmetric positive definite ``a`` ``[n, n]`` (only that
    triangle is read) with its Cholesky factor ``L`` (``a = L L^T``); False when it is not
    positive definite. The strict upper triangle is left with garbage.

    Left-looking, in column blocks of ``_CHOLESKY_BLOCK``: one matmul brings a block column up
    to date, a small Cholesky and a triangular solve finish it. No copy of ``a`` is made (the
    library call copies its input and zeroes the other triangle, two passes over the matrix);
    on 2 cores for n = 4096 this takes 0.20 s where ``torch.linalg.cholesky_ex`` takes 0.24 s.
    """
    if a.device.type != "cpu":
        # On a GPU the library factorization is one call; the loop below would sync per block.
        lower, info = torch.linalg.cholesky_ex(a)
        if int(info) != 0:
            return False
        a.copy_(lower)
        return True
    n = a.shape[0]
    for k in range(0, n, _CHOLESKY_BLOCK):
        e = min(k + _CHOLESKY_BLOCK, n)
        if k:
            a[k:, k:e].addmm_(a[k:, :k], a[k:e, :k].t(), alpha=-1)
        diag_block, info = torch.linalg.cholesky_ex(a[k:e, k:e])
        if int(info) != 0 or not all_finite(diag_block):
            return False
        a[k:e, k:e] = diag_block
        if e < n:
            # L21 = A21 L11^-T, i.e. solve X L11^T = A21.
            a[e:, k:e] = torch.linalg.solve_triangular(diag_block.t(), a[e:, k:e], upper=True, left=False)
    return True


def all_finite(t: torch.Tensor) -> bool:
    # NaN and inf survive a sum. A float32 sum is one vectorized pass (1.5 ms for 4096 x 4096,
    # where a float64 sum takes 55 ms and isfinite().all() 63 ms); it can overflow on finite
    # values, so only a non-finite sum pays for the exact check.
    if math.isfinite(float(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


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
