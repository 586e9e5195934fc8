"""GPTQ's large float32 products on x86 CPUs through oneDNN, where torch's ``mm`` is slower.

torch's CPU ``mm``/``addmm``/``linear`` call MKL, whose single-precision GEMM takes a generic
code path on AMD processors. On the benchmark machine (AMD EPYC, Zen 5, AVX-512; one thread)
it ran at 65-85 GFLOP/s where oneDNN's matmul, the library torch ships for its fused CPU
kernels, reached 140-190 GFLOP/s on the same shapes (``benchmarks/results/gemm_cpu.txt``). GPTQ
spends much of its time in such products: the Hessian's ``xᵀx`` blocks (:mod:`.hessian`),
the forward of a plain ``nn.Linear`` block whose outputs feed the next block
(:func:`linear_forward`) and the sweep's trailing updates (:func:`add_product_tn`).

**Which library, decided without timing.** oneDNN is used when this torch has it (x86-64 builds
with ``torch.backends.mkldnn``) and the product is CPU float32 of at least ``_MIN_WORK``
multiply-adds (:func:`uses_onednn`); otherwise torch's own call. The choice depends only on the platform, shapes and
dtypes, never on a measurement, so every rank of a distributed run and every resume makes the
same one, and the bit-identity of the Hessian across them holds. oneDNN's sums are the same for
1 and 2 threads (checked in ``tests/test_gptq_gemm.py``); for dot products of 512 terms and more
they round differently from MKL's (both are float32 sums in a fixed order).

``QUANTA_ONEDNN=0`` in the environment turns this off (torch's calls throughout), for comparing
the two on a new machine.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch
from torch import nn

__all__ = ["onednn_available", "uses_onednn", "product_nt", "add_product_tn", "linear_forward"]

#: Products of fewer multiply-adds take torch's call (oneDNN's per-call cost, about 25 µs, is
#: more than MKL's there).
_MIN_WORK = 1 << 20


def _linear_op() -> Any:
    if os.environ.get("QUANTA_ONEDNN", "1") == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        probe = torch.ones(2, 3)
        if not torch.equal(op(probe, probe, None, "none", [], ""), torch.full((2, 2), 3.0)):
            return None
    except (AttributeError, RuntimeError):  # a torch built without it, or with a different signature
        return None
    return op


_UNSET: Any = object()
#: The op, None where oneDNN is not used; looked up (and checked) on first use, not at import:
#: a run that never reaches GPTQ does not pay for it.
_OP: Any = _UNSET


def _op() -> Any:
    global _OP
    if _OP is _UNSET:
        _OP = _linear_op()
    return _OP


def onednn_available() -> bool:
    """Whether the products here go through oneDNN in this process (x86-64 torch with oneDNN,
    ``QUANTA_ONEDNN`` not ``0``)."""
    return _op() is not None


def uses_onednn(a: torch.Tensor, b: torch.Tensor, work: int) -> bool:
    """Whether a product of operands like ``a`` and ``b`` doing ``work`` multiply-adds goes through
    oneDNN: available, at least ``_MIN_WORK``, both CPU float32, and no autograd recording on an
    operand that requires grad (oneDNN's op has no backward)."""
    return (work >= _MIN_WORK and a.device.type == "cpu" and b.device.type == "cpu"
            and a.dtype == torch.float32 and b.dtype == torch.float32
            and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)) and _op() is not None)


def product_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ bᵀ`` for ``a`` ``[m, k]`` and ``b`` ``[n, k]``, a fresh ``[m, n]`` tensor: through
    oneDNN where :mod:`this module <quanta.plugins.gptq.gemm>` says, else ``torch.mm``.

    oneDNN is given contiguous operands (strided views take a slow reference path there)."""
    if not uses_onednn(a, b, a.shape[0] * b.shape[0] * a.shape[1]):
        return torch.mm(a, b.t())
    return _op()(a.contiguous(), b.contiguous(), None, "none", [], "")


#: Rows of ``target`` per oneDNN product in :func:`add_product_tn`: at most 256, and at most
#: ``_PRODUCT_VALUES`` values a product (at least 64 rows), so that each product is memory the
#: allocator hands back the next time rather than a fresh ``[m, r]`` block (a first call at
#: d = 2048 page-faulted 35k times in these updates with 8 MiB products, 2k in a warm call).
_ROWS_PER_PRODUCT = 256
_PRODUCT_VALUES = 1 << 19


def add_product_tn(target: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``target += leftᵀ right`` (``left`` ``[k, m]``, ``right`` ``[k, r]``, ``target`` ``[m, r]``,
    any strides), as ``target.addmm_(left.t(), right)``; through oneDNN where it applies, each
    slice of rows' product (256 rows, fewer for a wide ``r``) made on its own and then added (the sum ``addmm_`` gives on MKL
    while ``k`` fits one of its panels). Returns ``target``."""
    k, m, r = left.shape[0], left.shape[1], right.shape[1]
    if not uses_onednn(left, right, k * m * r) or not target.dtype == torch.float32:
        return target.addmm_(left.t(), right)
    op, rows = _op(), right.t().contiguous()
    step = max(64, min(_ROWS_PER_PRODUCT, _PRODUCT_VALUES // max(r, 1)))
    for c in range(0, m, step):
        part = left[:, c:c + step].t().contiguous()
        target[c:c + step].add_(op(part, rows, None, "none", [], ""))
    return target


def linear_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``module(x)`` for a plain ``nn.Linear`` (the class itself, no hooks of its own or global
    ones) on a CPU float32 input, through oneDNN; None where that does not apply (call the module).

    Used for the outputs one block passes to the next: a Linear's forward there is the product
    with its (just quantized) weight plus its bias, and the cached outputs are only ever read
    by the next block's Hessian, computed the same way on every rank."""
    if type(module) is not nn.Linear or not isinstance(x, torch.Tensor) or x.dim() < 1:
        return None
    weight, bias = module.weight, module.bias
    if (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
            or module._backward_pre_hooks or _global_hooks()):
        return None
    if x.shape[-1] != weight.shape[1] or (bias is not None and bias.dtype != torch.float32):
        return None
    if not uses_onednn(x, weight, x.numel() * weight.shape[0]):
        return None
    return _op()(x.contiguous(), weight.contiguous(), bias, "none", [], "")


def _global_hooks() -> bool:
    from torch.nn.modules import module as nn_module

    return any(getattr(nn_module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))
