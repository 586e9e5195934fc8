"""One lazy batch of the GPTQ column sweep: the plain loop (``sweep_batch``) and, on CUDA,
the same loop captured once as a graph and replayed (``GraphRunner``).

Split from ``solver`` (which plans the sweep and owns the factor); see ``docs/gptq-solver.md``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

if TYPE_CHECKING:
    from .solver import SweepPlan

__all__ = ["SUB_BATCH", "sweep_batch", "sweep_batch_affine", "GraphRunner", "ShiftedBounds", "SameForAll",
           "affine_range", "quantize_into", "dequantize_into"]

#: Columns per inner sub-batch: small enough that its slab stays in L1/L2 on CPU.
SUB_BATCH = 16


def _columns(wb: torch.Tensor, w0b: torch.Tensor, diff: torch.Tensor, starts: Sequence[int]) -> tuple:
    """``[r, 1]`` views of every column of ``wb``, ``w0b`` and ``diff`` (each made in one call),
    ``diff``'s rows, and the sub-batches ``(start, end)``."""
    ends = list(starts[1:]) + [wb.shape[0]]
    return (wb.unsqueeze(2).unbind(0), w0b.unsqueeze(2).unbind(0), diff.unsqueeze(2).unbind(0), diff.unbind(0),
            list(zip(starts, ends)))


def sweep_batch(wb: torch.Tensor, w0b: torch.Tensor, gb: torch.Tensor, scales, zero_points, diff: torch.Tensor,
                 quantizer, starts: Sequence[int],
                 before: Callable[[int], None] | None = None) -> None:
    """Quantize the lazy batch ``wb`` ``[L, r]`` (transposed weight, updated in place) column by column.

    ``w0b`` ``[L, r]`` is the same batch before any error update; ``gb`` ``[L, L]`` the batch's
    diagonal block of ``G`` (see :func:`error_feedback_factor`); ``scales[j]``/``zero_points[j]``
    ``[r, 1]`` are column ``j``'s qparams. Writes ``w0_j - q_j`` to ``diff`` ``[L, r]``; row ``j`` of
    ``wb`` is left as the column was quantized. ``starts`` are the sub-batch starts (each followed
    by one matmul update of the rest of the batch); ``before(k)`` runs at each.
    """
    n_cols = wb.shape[0]
    # The codes are a fresh tensor: dequantized in place where the quantizer can (the same ops).
    in_place = getattr(quantizer, "dequantize_", None)
    w_cols, w0_cols, d_cols, d_rows, batches = _columns(wb, w0b, diff, starts)
    for k1, k2 in batches:
        if before is not None:
            before(k1)
        for j in range(k1, k2):
            w, s = w_cols[j], scales[j]
            z = zero_points[j] if zero_points is not None else None
            c = quantizer.quantize(w, s, z)
            q = in_place(c, s, z) if in_place is not None and c.data_ptr() != w.data_ptr() else \
                quantizer.dequantize(c, s, z)
            torch.sub(w0_cols[j], q, out=d_cols[j])
            if j + 1 < k2:
                wb[j + 1:k2].addr_(gb[j, j + 1:k2], d_rows[j])
        if k2 < n_cols:
            wb[k2:].addmm_(gb[k1:k2, k2:].t(), diff[k1:k2])


def sweep_batch_affine(wb: torch.Tensor, w0b: torch.Tensor, gb: torch.Tensor, scales, lows, highs, zero: torch.Tensor,
                       diff: torch.Tensor, starts: Sequence[int],
                       before: Callable[[int], None] | None = None) -> None:
    """:func:`sweep_batch` for a quantizer of the affine form (the built-in schemes: codes
    ``c = clamp(round(w / s) + z, qmin, qmax)``, values ``(c - z) * s``), with the same results bit for bit
    in five tensor operations a column instead of seven, and no Python calls into the scheme.

    ``lows[j]``/``highs[j]`` ``[r, 1]`` are column ``j``'s ``qmin - z`` and ``qmax - z`` (``qmin``, ``qmax``
    without a zero point); ``zero`` is ``[r, 1]`` zeros. Per column, ``c - z = clamp(round(w / s), qmin - z,
    qmax - z)``: the same number as the scheme's ``c - z`` (both sides are small integers, exact in float32,
    and a rounded value outside the range clamps to the same bound either way), but it may be ``-0.0`` where
    the scheme's difference is ``0.0``; ``q = 0 + (c - z) * s`` (``addcmul``: adding zero turns ``-0.0`` into
    ``0.0`` and changes nothing else) is then the scheme's ``(c - z) * s`` exactly, and ``diff = w0 - q`` as in
    :func:`sweep_batch`. ``q`` is made in ``diff``'s row, so no temporaries.

    With one intra-op thread (the benchmark's setting, and the sweep's whenever the trailing updates
    overlap it), each column's rank-1 update covers the whole sub-batch, with ``G``'s row zeroed on and
    before the diagonal (one ``triu`` per batch), so its views are made once per sub-batch instead of
    twice per column. The columns after ``j`` get exactly what :func:`sweep_batch` adds (one thread: each
    row is one inner loop of the same kernel either way, so every element takes the same vector or
    scalar path); those already quantized get ``+ 0 * d``, which leaves every value as it is but may turn
    a ``-0.0`` into ``0.0``. Those rows are read once more, by the final codes and the loss, where the
    sign of a zero changes nothing: the built-in schemes' codes are ``round(w / s) + z`` or ``+ 0.0`` (a
    zero of either sign gives the same code) and ``(w - q)²`` is the same. So the results are
    :func:`sweep_batch`'s bit for bit. With more threads a wider update could be split between them at
    other places than the narrower one (a row cut in two takes the kernel's scalar path for other
    elements), so the per-column views are made as :func:`sweep_batch` makes them.
    """
    n_cols = wb.shape[0]
    w_cols, w0_cols, d_cols, d_rows, batches = _columns(wb, w0b, diff, starts)
    div, addcmul, sub = torch.div, torch.addcmul, torch.sub
    whole = torch.get_num_threads() == 1
    strict = gb.triu(1) if whole else gb  # G's strictly upper part: the feedback to later columns only
    for k1, k2 in batches:
        if before is not None:
            before(k1)
        slab, g_rows = wb[k1:k2], strict[k1:k2, k1:k2].unbind(0)
        for j in range(k1, k2):
            d, s = d_cols[j], scales[j]
            div(w_cols[j], s, out=d).round_().clamp_(lows[j], highs[j])
            addcmul(zero, d, s, out=d)
            sub(w0_cols[j], d, out=d)
            if j + 1 < k2:
                if whole:
                    slab.addr_(g_rows[j - k1], d_rows[j])
                else:
                    wb[j + 1:k2].addr_(g_rows[j - k1][j + 1 - k1:], d_rows[j])
        if k2 < n_cols:
            wb[k2:].addmm_(gb[k1:k2, k2:].t(), diff[k1:k2])


class GraphRunner:
    """Runs whole lazy batches of one fixed length from static buffers; on CUDA, as a replayed graph.

    The launch-bound per-column loop of a batch (about 8 kernels per column) is captured once
    and replayed for every batch of that length; qparams come per column from a buffer, so a
    batch may only need a fit at its first column (done outside the graph). The first replay is
    compared with the plain path on the same inputs; on any failure the solver warns and uses
    the plain path. ``path="static"`` runs the same buffers without capture (tests on CPU).
    """

    def __init__(self, length: int, rows: int, device, plan: SweepPlan, quantizer, has_zp: bool, capture: bool) -> None:
        self.length, self.plan, self.quantizer, self.capture = length, plan, quantizer, capture
        f32 = dict(dtype=torch.float32, device=device)
        self.wb = torch.empty(length, rows, **f32)
        self.w0b = torch.empty(length, rows, **f32)
        self.gb = torch.empty(length, length, **f32)
        self.scale = torch.empty(length, rows, 1, **f32)
        self.zp = torch.empty(length, rows, 1, **f32) if has_zp else None
        self.diff = torch.empty(length, rows, **f32)
        self.group_of = torch.tensor(list(plan.group_of), dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False

    @classmethod
    def create(cls, wt, plan: SweepPlan, quantizer, has_zp, path) -> GraphRunner | None:
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
        starts = list(range(0, self.length, SUB_BATCH))
        sweep_batch(self.wb, self.w0b, self.gb, self.scale.unbind(0), None if self.zp is None else self.zp.unbind(0),
                     self.diff, self.quantizer, starts)

    def _load(self, i1, i2, wt, w0_t, scale_t, zp_t) -> None:
        groups = self.group_of[i1:i2]
        self.wb.copy_(wt[i1:i2])
        self.w0b.copy_(w0_t[i1:i2])
        self.gb.copy_(self.plan.feedback[i1:i2, i1:i2])
        self.scale.copy_(scale_t.index_select(0, groups).unsqueeze(2))
        if self.zp is not None:
            self.zp.copy_(zp_t.index_select(0, groups).unsqueeze(2))

    def run(self, i1, i2, wt, w0_t, scale_t, zp_t, diff_t) -> None:
        if self.capture and self.graph is None:
            self._capture_and_check(i1, i2, wt, w0_t, scale_t, zp_t)
        if self.failed:
            # Same math on the same buffers, without the graph.
            self._load(i1, i2, wt, w0_t, scale_t, zp_t)
            self._body()
        else:
            self._load(i1, i2, wt, w0_t, scale_t, zp_t)
            if self.graph is not None:
                self.graph.replay()
            else:
                self._body()
        diff_t[i1:i2].copy_(self.diff)
        wt[i1:i2].copy_(self.wb)  # the columns as quantized, for the final codes

    def _capture_and_check(self, i1, i2, wt, w0_t, scale_t, zp_t) -> None:
        try:
            stream = torch.cuda.Stream(device=wt.device)
            stream.wait_stream(torch.cuda.current_stream(wt.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up allocations and cuBLAS handles off the capture
                    self._load(i1, i2, wt, w0_t, scale_t, zp_t)
                    self._body()
            torch.cuda.current_stream(wt.device).wait_stream(stream)
            expected_diff, expected_w = self.diff.clone(), self.wb.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._body()
            self._load(i1, i2, wt, w0_t, scale_t, zp_t)
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


class ShiftedBounds:
    """The clamp bounds of :func:`sweep_batch_affine`, ``qmin - z`` and ``qmax - z`` ``[r, 1]`` per group
    (exact: small integers), and a ``[r, 1]`` zero. Without a zero point one pair serves every group."""

    def __init__(self, qrange: tuple[int, int], zp_t: torch.Tensor | None, rows: int, device) -> None:
        self.qmin, self.qmax = qrange
        self.zp_t = zp_t
        self.zero = torch.zeros(rows, 1, dtype=torch.float32, device=device)
        if zp_t is None:
            lo = torch.full((rows, 1), float(self.qmin), dtype=torch.float32, device=device)
            hi = torch.full((rows, 1), float(self.qmax), dtype=torch.float32, device=device)
            self.lows: Any = SameForAll(lo)
            self.highs: Any = SameForAll(hi)
        else:
            self.lo_t, self.hi_t = self.qmin - zp_t, self.qmax - zp_t  # [G, r]
            self.lows = self.lo_t.unsqueeze(2).unbind(0)
            self.highs = self.hi_t.unsqueeze(2).unbind(0)

    def refresh(self, group: int) -> None:
        """After a dynamic fit wrote the group's zero point."""
        if self.zp_t is not None:
            self.lo_t[group].copy_(self.qmin - self.zp_t[group])
            self.hi_t[group].copy_(self.qmax - self.zp_t[group])


class SameForAll:
    """``x[g]`` is the same tensor for every group."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def __getitem__(self, group: int) -> torch.Tensor:
        return self.value


def quantize_into(quantizer, w: torch.Tensor, scale, zero_point, out: torch.Tensor) -> torch.Tensor:
    """``quantizer.quantize(w, scale, zero_point)``, written into ``out`` when the quantizer has a
    ``quantize_into`` (the same operations; the built-in schemes' work in place), else a new tensor."""
    into = getattr(quantizer, "quantize_into", None)
    if into is None:
        return quantizer.quantize(w, scale, zero_point)
    return into(w, scale, zero_point, out)


def dequantize_into(quantizer, codes: torch.Tensor, scale, zero_point, out: torch.Tensor) -> torch.Tensor:
    """``quantizer.dequantize(codes, scale, zero_point)`` in ``out``'s storage where the quantizer allows it:
    the affine form's own operations (``(codes - zero_point) * scale``, ``codes * scale``), or ``codes`` copied
    and dequantized in place by ``dequantize_``; else a new tensor."""
    if affine_range(quantizer) is not None:
        if zero_point is None:
            return torch.mul(codes, scale, out=out)
        return torch.sub(codes, zero_point, out=out).mul_(scale)
    in_place = getattr(quantizer, "dequantize_", None)
    if in_place is None:
        return quantizer.dequantize(codes, scale, zero_point)
    return in_place(out.copy_(codes), scale, zero_point)


def affine_range(quantizer) -> tuple[int, int] | None:
    """``(qmin, qmax)`` when ``quantizer.affine_range()`` says its quantize and dequantize are exactly
    ``clamp(round(w / s) + z, qmin, qmax)`` (``+ 0.0`` without a zero point) and ``(c - z) * s``
    (``c * s``), operation for operation; else None (the general path)."""
    probe = getattr(quantizer, "affine_range", None)
    return probe() if probe is not None else None
