"""Accumulating GPTQ's Hessian ``Σ xᵀx`` with half the matmul work.

``xᵀx`` is symmetric, so only the blocks on and above the diagonal are multiplied: the columns
are cut into row blocks of about ``_BLOCK_COLUMNS`` and row block ``i`` gets
``x[:, i]ᵀ x[:, i:]`` (one matmul per row block per call). Once all inputs are in,
:func:`mirror_upper` copies the upper blocks into the lower ones. For in = 4096 and 2048 tokens
on 2 cores this takes 0.26 s instead of 0.39 s for one full ``addmm_`` (8 row blocks; 16 are no
better, and separate block products or ``triu(h) + triu(h, 1).T`` cost more).

Usage::

    xtx = torch.zeros(n, n)
    for x in inputs:                 # x [tokens, n]
        accumulate_xtx(xtx, x)
    hessian = mirror_upper(xtx).mul_(2 / total_tokens)
"""

from __future__ import annotations

import torch

__all__ = ["accumulate_xtx", "mirror_upper"]

#: Columns per row block (rounded to a multiple of 64); below two blocks the full product is used.
_BLOCK_COLUMNS = 512


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
    if len(edges) == 2:
        return xtx.addmm_(x.t(), x, alpha=alpha)
    for a, b in zip(edges, edges[1:]):
        xtx[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:], alpha=alpha)
    return xtx


def mirror_upper(xtx: torch.Tensor) -> torch.Tensor:
    """Overwrite the blocks below the diagonal of ``xtx`` ``[n, n]`` (in place) with the transposed
    blocks above it, as :func:`accumulate_xtx` cut them. Returns ``xtx``, exactly symmetric off
    the diagonal blocks."""
    edges = _edges(xtx.shape[0])
    for i, (a, b) in enumerate(zip(edges, edges[1:])):
        for c, d in zip(edges[i + 1:], edges[i + 2:]):
            xtx[c:d, a:b].copy_(xtx[a:b, c:d].t())
    return xtx
