"""Vectorised quantization math in torch: grouping a weight into qparam groups and back.

Conventions match coremltools.optimize (``compute_qparams``): a weight of shape ``S`` is
split by per-axis ``block_sizes`` (0 = whole axis), every group of elements that shares a
scale becomes one row of a ``[G, K]`` view, and qparams are stored with the weight's rank
(``scale_shape``: number of blocks on blocked axes, 1 elsewhere).
"""

from __future__ import annotations

import math

import torch

__all__ = ["scale_shape", "to_groups", "from_groups", "empty", "expand_qparam", "restricted_range", "full_range"]


def scale_shape(shape: tuple[int, ...], block_sizes: list[int]) -> tuple[int, ...]:
    """Shape of the scale/zero-point tensors for a weight ``shape`` split by ``block_sizes``."""
    return tuple(dim // b if b > 0 else 1 for dim, b in zip(shape, block_sizes))


def to_groups(weight: torch.Tensor, block_sizes: list[int]) -> torch.Tensor:
    """View ``weight`` as ``[G, K]``: one row per qparam group, in ``scale_shape`` row-major order.

    ``G = prod(scale_shape)`` and ``K = numel // G``. Returns a copy only when a permute is needed.
    """
    new_shape: list[int] = []
    keep: list[int] = []
    for dim, b in zip(weight.shape, block_sizes):
        if b > 0:
            keep.append(len(new_shape))
            new_shape.extend([dim // b, b])
        else:
            new_shape.append(dim)
    reduce = [i for i in range(len(new_shape)) if i not in keep]
    n_groups = math.prod(new_shape[i] for i in keep)
    order = keep + reduce
    if order == sorted(order):  # groups are already rows (per-tensor, per-channel on axis 0, ...)
        return weight.reshape(n_groups, -1)
    return weight.reshape(new_shape).permute(*order).reshape(n_groups, -1)


def from_groups(grouped: torch.Tensor, shape: tuple[int, ...], block_sizes: list[int]) -> torch.Tensor:
    """Inverse of :func:`to_groups`: a ``[G, K]`` tensor back to the weight ``shape``."""
    new_shape: list[int] = []
    keep: list[int] = []
    for dim, b in zip(shape, block_sizes):
        if b > 0:
            keep.append(len(new_shape))
            new_shape.extend([dim // b, b])
        else:
            new_shape.append(dim)
    order = keep + [i for i in range(len(new_shape)) if i not in keep]
    if order == sorted(order):
        return grouped.reshape(shape)
    inverse = [order.index(i) for i in range(len(new_shape))]
    return grouped.reshape([new_shape[i] for i in order]).permute(*inverse).reshape(shape)


def expand_qparam(param: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Broadcast a qparam of ``scale_shape`` to the full weight ``shape`` (repeat along blocked axes)."""
    out = param
    for axis, (n, dim) in enumerate(zip(param.shape, shape)):
        if n not in (1, dim):
            out = out.repeat_interleave(dim // n, dim=axis)
    return out


def restricted_range(bits: int, signed: bool) -> tuple[int, int]:
    """Symmetric range without the most negative code: int8 -> (-127, 127), uint8 -> (0, 254).

    Same as coremltools' ``get_quant_range(bits, signed, "LINEAR_SYMMETRIC")``.
    """
    if signed:
        return -(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1
    return 0, 2**bits - 2


def full_range(bits: int, signed: bool) -> tuple[int, int]:
    """Full integer range: int8 -> (-128, 127), uint4 -> (0, 15) (coremltools' ``LINEAR`` mode)."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised tensor from torch's allocator (ordinary 4 KiB pages on CPU).

    Quantized weights and dequantized loads are large fresh buffers, so their first-touch page
    faults are a real part of a user's first call. Buffers advised for transparent huge pages
    (numpy's ``np.empty``, which quanta used before) fault about 4x faster once a process has
    huge pages at hand, but a fresh process on a VM whose freed huge pages go back to the host
    (the 2-core benchmark machine) paid about 10x more for them: 4.1 s instead of 0.4 s to touch
    320 MiB (``benchmarks/results/rtn_cpu.txt`` has the first-call and warm figures).
    """
    return torch.empty(tuple(shape), dtype=dtype, device=device)
