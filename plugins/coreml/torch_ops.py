"""Torch op translations coremltools 9.0 lacks, registered with its public registration API.

transformers 5.x models trace to a few aten ops coremltools' torch frontend cannot convert:
``new_ones`` (the mask functions of ``transformers.masking_utils``, reached by BERT with an
``attention_mask`` input and by every decoder's causal mask) and ``diff`` (the packed-sequence
check on ``position_ids`` in Llama-style decoders). Each translation here builds MIL ops with
``coremltools.converters.mil.Builder`` and is registered once, lazily, by :func:`register`
(the exporter calls it before converting; ``import quanta`` never does). An op that a newer
coremltools already translates keeps coremltools' own translation.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

__all__ = ["TRANSLATIONS", "register", "registered", "gqa_expanded"]

_state: dict[str, Any] = {"done": False, "registered": ()}


def _inputs(context, node) -> list:
    """The MIL values of ``node``'s positional inputs (``None`` for an omitted optional one)."""
    return [context[name] if name else None for name in node.inputs]


def _torch_dtype_code(var) -> Any:
    """The numpy dtype for a torch ``ScalarType`` code held by ``var`` (``None`` when not given)."""
    from coremltools.converters.mil.frontend.torch.utils import NUM_TO_NUMPY_DTYPE

    if var is None or var.val is None:
        return None
    return NUM_TO_NUMPY_DTYPE[int(var.val)]


def new_ones(context, node) -> None:
    """``x.new_ones(size, dtype=...)``: a tensor of ones of ``size`` (dtype given, else x's)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.types import nptype_from_builtin

    args = _inputs(context, node)
    x, size = args[0], args[1]
    dtype = _torch_dtype_code(args[2]) if len(args) > 2 else None
    if dtype is None:
        dtype = nptype_from_builtin(x.dtype)
    if isinstance(size, (list, tuple)):  # a dynamic size arrives as a list of scalars
        size = mb.concat(values=[mb.expand_dims(x=s, axes=[0]) if s.rank == 0 else s for s in size], axis=0)
    if size.val is not None:
        shape = tuple(int(d) for d in np.atleast_1d(size.val)) if np.size(size.val) else ()
        context.add(mb.const(val=np.ones(shape, dtype=dtype), name=node.name))
        return
    ones = mb.fill(shape=mb.cast(x=size, dtype="int32"), value=1.0)
    context.add(_cast_to(ones, dtype, node.name))


def _cast_to(value, dtype, name) -> Any:
    from coremltools.converters.mil import Builder as mb

    if np.dtype(dtype) == np.bool_:
        return mb.cast(x=value, dtype="bool", name=name)
    if np.issubdtype(np.dtype(dtype), np.integer):
        return mb.cast(x=value, dtype="int32", name=name)
    return mb.identity(x=value, name=name)


def diff(context, node) -> None:
    """``torch.diff(x, n=1, dim=-1, prepend=None, append=None)``: ``x[..., 1:] - x[..., :-1]``
    along ``dim`` after concatenating ``prepend``/``append``; ``n`` > 1 repeats it."""
    from coremltools.converters.mil import Builder as mb

    args = _inputs(context, node) + [None] * 5
    x, n, dim, prepend, append = args[:5]
    n = 1 if n is None else int(n.val)
    dim = -1 if dim is None else int(dim.val)
    parts = [v for v in (prepend, x, append) if v is not None]
    if len(parts) > 1:
        x = mb.concat(values=parts, axis=dim)
    rank = x.rank
    axis = dim % rank
    for i in range(n):
        begin_hi = [0] * rank
        begin_hi[axis] = 1
        end_lo = [0] * rank
        end_lo[axis] = -1
        end_mask = [True] * rank
        end_mask_lo = list(end_mask)
        end_mask_lo[axis] = False
        hi = mb.slice_by_index(x=x, begin=begin_hi, end=[0] * rank, end_mask=end_mask)
        lo = mb.slice_by_index(x=x, begin=[0] * rank, end=end_lo, end_mask=end_mask_lo)
        x = mb.sub(x=hi, y=lo, name=node.name) if i == n - 1 else mb.sub(x=hi, y=lo)
    context.add(x)


#: torch op name -> translation function, registered by :func:`register`.
TRANSLATIONS = {"new_ones": new_ones, "diff": diff}


def register() -> tuple[str, ...]:
    """Register every translation coremltools lacks (once per process); returns the names registered."""
    if _state["done"]:
        return _state["registered"]
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op

    done = []
    for name, fn in TRANSLATIONS.items():
        try:
            register_torch_op(_func=fn)
        except ValueError:  # coremltools translates it itself (a newer version): keep its own
            continue
        done.append(name)
    _state.update(done=True, registered=tuple(done))
    return _state["registered"]


def registered() -> tuple[str, ...]:
    """The names :func:`register` added to coremltools' registry (empty before it ran)."""
    return _state["registered"]


def _repeat_heads(x, heads: int) -> Any:
    """``x`` ``[..., kv_heads, L, D]`` with each head repeated to ``heads`` (transformers' ``repeat_kv``:
    expand and reshape, which coremltools converts; ``repeat_interleave`` it does not)."""
    kv = x.shape[-3]
    expanded = x.unsqueeze(-3).expand(*x.shape[:-2], heads // kv, *x.shape[-2:])
    return expanded.reshape(*x.shape[:-3], heads, *x.shape[-2:])


@contextmanager
def gqa_expanded() -> Iterator[None]:
    """Within the block (the exporter's ``torch.jit.trace``), ``F.scaled_dot_product_attention(...,
    enable_gqa=True)`` repeats the key/value heads itself and calls the plain attention.

    transformers' Llama-style decoders pass ``enable_gqa=True`` (grouped-query attention: fewer
    key/value heads than query heads) when no attention mask is given; coremltools 9.0's
    translation ignores the flag and fails with ``Incompatible dim 1 in shapes (1, 4) vs. (1, 2)``.
    Repeating the heads is what ``enable_gqa`` means; the traced graph then converts. Restored after.
    """
    import torch
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, *args, enable_gqa=False, **kwargs) -> Any:
        if enable_gqa and key.dim() >= 3 and query.shape[-3] != key.shape[-3]:
            key, value = _repeat_heads(key, query.shape[-3]), _repeat_heads(value, query.shape[-3])
        return original(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
