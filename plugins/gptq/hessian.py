"""Accumulating GPTQ's Hessian ``Σ xᵀx`` with half the matmul work.

``xᵀx`` is symmetric, so only the blocks on and above the diagonal are multiplied: the columns
are cut into row blocks of about ``_BLOCK_COLUMNS`` and row block ``i`` gets
``x[:, i]ᵀ x[:, i:]`` (one matmul per row block per call). Once all inputs are in,
:func:`mirror_upper` copies the upper blocks into the lower ones. For in = 4096 and 2048 tokens
on 2 cores this takes 0.26 s instead of 0.39 s for one full ``addmm_`` (8 row blocks; 16 are no
better, and separate block products or ``triu(h) + triu(h, 1).T`` cost more). With GPTQ's
calls of 128 tokens, blocks of 256 columns beat 512 on one thread at every width from 512 to
8192 (4-22% less time: less of the lower triangle is multiplied), with the same sums bit for bit
(each product's entries do not depend on how the output is cut).

Usage::

    xtx = torch.zeros(n, n)
    for x in inputs:                 # x [tokens, n]
        accumulate_xtx(xtx, x)
    hessian = mirror_upper(xtx).mul_(2 / total_tokens)

GPTQ's hooks add each call's product to the sum as a *partial* (one order of addition, see
:class:`HessianHook`); :func:`add_partial_xtx` does that one row block at a time through a
buffer of one row block (``[~256, n]``, not ``[n, n]``): each block's product is written
(not added: no zeroing pass) and then added to the sum, the same values as a whole partial.
Where the BLAS gives that same sum in one call (``sum.addmm_(a, b)`` adding each entry's whole
dot product to the sum once, as MKL and OpenBLAS do while ``K`` fits one of their panels), the
block is added that way, with no buffer and no separate add; a probe of each block's exact shapes,
once per process, decides (:func:`adds_exactly`). On x86 with oneDNN (:mod:`.gemm`) neither
applies: each block's product comes from oneDNN on its own and is then added, in both functions.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from quanta.contracts import Ranks
from quanta.errors import QuantizationError

from .gemm import product_nt, uses_onednn

__all__ = ["accumulate_xtx", "add_partial_xtx", "adds_exactly", "partial_rows", "mirror_upper", "HessianHook",
           "solve_cost"]

#: Columns per row block (rounded to a multiple of 64); below two blocks the full product is used.
_BLOCK_COLUMNS = 256


def _edges(n: int) -> list[int]:
    k = max(1, n // _BLOCK_COLUMNS)
    inner = [i * n // k // 64 * 64 for i in range(1, k)]
    return [0, *inner, n]


def accumulate_xtx(xtx: torch.Tensor, x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``xtx`` ``[n, n]`` += ``alpha * xᵀx`` for ``x`` ``[m, n]``, on and above the diagonal blocks only.

    The blocks below the diagonal are left as they are (a single block, for small ``n``, is the
    whole product); call :func:`mirror_upper` once after the last input. Returns ``xtx``.
    """
    edges = _edges(x.shape[1])
    rows = _rows(x)
    if rows is not None:
        for a, b in zip(edges, edges[1:]):
            xtx[a:b, a:].add_(product_nt(rows[a:b], rows[a:]), alpha=alpha)
        return xtx
    if len(edges) == 2:
        return xtx.addmm_(x.t(), x, alpha=alpha)
    for a, b in zip(edges, edges[1:]):
        xtx[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:], alpha=alpha)
    return xtx


def partial_rows(n: int) -> int:
    """Rows of the buffer :func:`add_partial_xtx` needs for ``n`` columns (the widest row block)."""
    edges = _edges(n)
    return max(b - a for a, b in zip(edges, edges[1:]))


def add_partial_xtx(xtx: torch.Tensor, x: torch.Tensor, buffer: torch.Tensor | Callable[[], torch.Tensor] | None = None
                    ) -> torch.Tensor:
    """``xtx`` ``[n, n]`` += ``xᵀx`` on and above the diagonal blocks, each row block's product made
    on its own in ``buffer`` (``[partial_rows(n), n]``, overwritten; or a function returning it, called
    only when needed; None: made here when needed) and then added, or added by ``addmm_`` where
    :func:`adds_exactly` found that to give the same sum for the block's shapes; where
    :func:`.gemm.uses_onednn` says, by oneDNN (no buffer, no probe).

    The sum is the same, bit for bit, as ``xtx.add_(accumulate_xtx(zeros(n, n), x))``: each block
    of the partial is the same product, and the blocks below the diagonal (zeros there) are
    left for :func:`mirror_upper`. Returns ``xtx``."""
    n = x.shape[1]
    edges = _edges(n)
    rows = _rows(x)
    if rows is not None:  # oneDNN: each block's product made on its own, then added
        for a, b in zip(edges, edges[1:]):
            xtx[a:b, a:].add_(product_nt(rows[a:b], rows[a:]))
        return xtx
    for a, b in zip(edges, edges[1:]):
        target, left, right = xtx[a:b, a:], x[:, a:b].t(), x[:, a:]
        key = _key(target, left, right)
        exact = _EXACT.get(key) if key is not None else False
        if exact:
            target.addmm_(left, right)
            continue
        if buffer is None or callable(buffer):
            buffer = buffer() if buffer is not None else torch.empty(partial_rows(n), n, dtype=xtx.dtype,
                                                                       device=xtx.device)
        part = buffer[:b - a, :n - a]
        torch.mm(left, right, out=part)
        target.add_(part)
        if exact is None and key is not None:  # first time for these shapes in this process
            _EXACT[key] = _probe(target, left, right, part)
    return xtx


def _rows(x: torch.Tensor) -> torch.Tensor | None:
    """``xᵀ`` contiguous (``[n, m]``: row ``i`` is input column ``i``) when the products of ``x``'s
    row blocks go through oneDNN (:mod:`.gemm`: the same choice for every block of a call, from
    the shapes alone), else None."""
    n, m = x.shape[1], x.shape[0]
    last = n - _edges(n)[-2]  # the last row block's product is the smallest: last x last x m
    return x.t().contiguous() if uses_onednn(x, x, last * last * m) else None


#: Per process: block shapes -> whether ``addmm_`` adds their product as ``mm`` then ``add_`` would.
_EXACT: dict[tuple, bool] = {}


def _key(target: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> tuple | None:
    if target.device.type != "cpu" or not target.dtype == left.dtype == right.dtype == torch.float32:
        return None
    return (tuple(target.shape), target.stride(), target.storage_offset() % 16, tuple(left.shape), left.stride(),
            left.storage_offset() % 16, tuple(right.shape), right.stride(), right.storage_offset() % 16,
            torch.get_num_threads())


def adds_exactly(target: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> bool:
    """Whether ``target.addmm_(left, right)`` gives, bit for bit, ``target.add_(torch.mm(left, right))``
    for tensors of these shapes, strides and alignments (CPU float32; else False).

    A BLAS that accumulates each dot product in registers and adds it to the output once (MKL and
    OpenBLAS while ``K`` fits one panel) does; one that splits ``K`` (long inputs) or starts from the
    output does not. Answered once per process and shape by a probe: the product made both ways
    onto a sum that already holds it, compared bit for bit. The arithmetic a BLAS does for given
    shapes does not depend on the values, so the answer holds for every input of those shapes; the
    probe runs on random values of its own laid out as the caller's, since the caller's could hide a
    difference (zeros, or small integers, whose sums are exact in any order)."""
    key = _key(target, left, right)
    if key is None:
        return False
    if key not in _EXACT:
        part = torch.empty(target.shape[0], max(target.stride(0), target.shape[1]))[:, :target.shape[1]]
        _EXACT[key] = _probe(target, left, right, part)
    return _EXACT[key]


def _span(t: torch.Tensor) -> int:
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else 0


def _probe(target: torch.Tensor, left: torch.Tensor, right: torch.Tensor, product: torch.Tensor) -> bool:
    """Does ``addmm_`` of operands laid out as ``left`` and ``right`` onto a sum laid out as ``target``
    give what ``mm`` into a buffer laid out as ``product`` and then ``add_`` give? Asked of random
    values (a fixed seed), never the caller's, in fresh memory with the same shapes, strides and
    alignments (storage offsets mod 16 values; torch's CPU allocator aligns storages to 64 bytes)."""
    if target.numel() == 0:
        return True

    def laid_out_as(t: torch.Tensor) -> torch.Tensor:
        space = torch.empty(_span(t) + 16, dtype=t.dtype)
        return space.as_strided(tuple(t.shape), t.stride(), t.storage_offset() % 16)

    total, lhs, rhs, part = (laid_out_as(t) for t in (target, left, right, product))
    for i, t in enumerate((total, lhs, rhs)):
        t.copy_(_random_values(t.numel() + i)[i:i + t.numel()].view(t.shape))
    expected = total.clone().add_(torch.mm(lhs, rhs, out=part))
    return torch.equal(total.addmm_(lhs, rhs), expected)


_RANDOM: list[torch.Tensor] = []


def _random_values(count: int) -> torch.Tensor:
    """At least ``count`` standard normal float32 values (a fixed seed), made once per process and
    grown by doubling: the probes of a run's block shapes share them (``randn`` costs more than a copy)."""
    if not _RANDOM or _RANDOM[0].numel() < count:
        size = max(count, 2 * _RANDOM[0].numel() if _RANDOM else 1 << 16)
        _RANDOM[:] = [torch.randn(size, generator=torch.Generator().manual_seed(0))]
    return _RANDOM[0]


def mirror_upper(xtx: torch.Tensor) -> torch.Tensor:
    """Overwrite the blocks below the diagonal of ``xtx`` ``[n, n]`` (in place) with the transposed
    blocks above it, as :func:`accumulate_xtx` cut them, and the strict lower triangle of each
    diagonal block with its strict upper one (a product ``x[:, a:b]ᵀ x[:, a:b]`` is symmetric with
    any BLAS seen so far; this makes it so by construction). Returns ``xtx``, exactly symmetric."""
    edges = _edges(xtx.shape[0])
    for i, (a, b) in enumerate(zip(edges, edges[1:])):
        for c, d in zip(edges[i + 1:], edges[i + 2:]):
            xtx[c:d, a:b].copy_(xtx[a:b, c:d].t())
        block = xtx[a:b, a:b]
        lower = torch.ones(b - a, b - a, dtype=torch.bool, device=xtx.device).tril_(-1)
        block.copy_(torch.where(lower, block.t(), block))  # a selection: no arithmetic, zeros keep their sign
    return xtx


class HessianHook:
    """Accumulates ``Σ xᵀx`` (float32, upper blocks; mirrored once in :meth:`hessian`) and the
    sample count for one Linear/Conv module.

    ``H = 2/n Σ xᵀx`` with ``n`` the number of samples (the leading batch dimension of a
    batched input, 1 for an unbatched 2-D Linear input), as the GPTQ reference code and
    coremltools count them, not the number of rows: the scale of ``H`` matters where inputs are
    dead (their diagonal is set to 1 and enters the dampening ``mean(diag(H))``), and with this
    count quanta's GPTQ gives coremltools' weights.

    **One order of addition.** Each call's ``xᵀx`` is computed on its own (a *partial*) and added
    to the sum in the global order of the calls: calibration batch by batch, and within a batch
    in the order the model calls the module. In one process a partial is added as soon as it is
    made (one scratch buffer per size, ``scratch``); under ``torch.distributed`` the partials of a
    step wait in ``pending`` until :meth:`flush` folds every rank's partials into the sum on the
    hook's ``owner`` rank (:meth:`quanta.contracts.Ranks.fold`). The sum is the same, bit for
    bit, for any number of ranks. Only the owner holds the sum. In one process the partial is
    made and added one row block at a time (:func:`add_partial_xtx`; ``scratch`` holds one
    ``[partial_rows(n), n]`` buffer per size, made only for blocks not added by ``addmm_``).
    """

    def __init__(self, module: nn.Module, device, weight: torch.Tensor | None = None, attach: bool = True,
                 ranks: Ranks | None = None, owner: int = 0, scratch: dict | None = None) -> None:
        self.module = module
        self.device = device
        self.cols = (module.get_parameter("weight") if weight is None else weight)[0].numel()
        self.ranks = ranks if ranks is not None else Ranks()
        self.owner = owner
        holds = not self.ranks.active or self.ranks.rank == owner
        self.xtx = torch.zeros(self.cols, self.cols, dtype=torch.float32, device=device) if holds else None
        self.pending: list[torch.Tensor] = []
        self.scratch = scratch if scratch is not None else {}
        self.samples = 0
        # attach=False: fed through add() by an AttentionFeed, which sets the handle.
        self.handle = module.register_forward_pre_hook(self._hook) if attach else None

    def _hook(self, module, args) -> None:
        self.add(args[0])

    def add(self, x: torch.Tensor) -> None:
        """Accumulate one input ``x`` of the module (as its forward receives it)."""
        module = self.module
        x = x.detach()
        self.samples += x.shape[0] if x.dim() > 2 else 1
        if not isinstance(module, (nn.Conv1d, nn.Conv2d)):  # Linear, or an attention input projection
            x = x.reshape(-1, x.shape[-1])
        elif isinstance(module, nn.Conv1d):
            x = F.unfold(x.unsqueeze(-1), (module.kernel_size[0], 1), dilation=(module.dilation[0], 1),
                         padding=(module.padding[0], 0) if not isinstance(module.padding, str) else 0,
                         stride=(module.stride[0], 1))
            x = x.transpose(1, 2).reshape(-1, x.shape[1])
        else:
            if isinstance(module.padding, str):
                raise QuantizationError("gptq needs numeric padding for convolutions", None)
            x = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
            x = x.transpose(1, 2).reshape(-1, x.shape[1])
        x = x.to(self.device, torch.float32)
        if self.ranks.active:
            fresh = torch.zeros(self.cols, self.cols, dtype=torch.float32, device=self.device)
            self.pending.append(accumulate_xtx(fresh, x))
            return
        add_partial_xtx(self.xtx, x, self._buffer)  # type: ignore[arg-type]

    def _buffer(self) -> torch.Tensor:
        """The partial-product buffer for this size (shared through ``scratch``), made when first needed."""
        key = (self.cols, str(self.device))
        buffer: torch.Tensor | None = self.scratch.get(key)
        if buffer is None:
            buffer = self.scratch[key] = torch.empty(partial_rows(self.cols), self.cols, dtype=torch.float32,
                                                     device=self.device)
        return buffer

    def flush(self) -> None:
        """*Collective* (after every step of :meth:`quanta.contracts.Ranks.chunks`): fold this step's
        partials of every rank into the owner's sum, in chunk order."""
        if self.ranks.active:
            self.ranks.fold(self.pending, self.xtx, self.owner)
        self.pending.clear()

    def finish(self) -> None:
        """*Collective*: the sample count, summed over the ranks."""
        if self.handle is not None:
            self.handle.remove()
        self.samples = self.ranks.sum_int(self.samples)

    def hessian(self) -> torch.Tensor:
        """``2/n Σ xᵀx`` (on the owner; call :meth:`finish` first)."""
        if self.handle is not None:
            self.handle.remove()
        if self.xtx is None:
            raise RuntimeError(f"rank {self.ranks.rank} does not own this Hessian (owner: rank {self.owner})")
        return mirror_upper(self.xtx).mul_(2.0 / max(self.samples, 1))


def solve_cost(rows: int, cols: int) -> float:
    """The GPTQ solve's cost of a ``[rows, cols]`` weight, in multiply-adds (up to a constant):
    the Hessian's factorisation ``cols³`` plus the column sweep's updates ``rows·cols²``."""
    return float(cols) ** 3 + float(rows) * float(cols) ** 2
