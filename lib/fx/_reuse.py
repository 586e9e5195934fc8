"""Activation-sized buffers the fake-quantization modules reuse from step to step.

On CPU, fresh activation-sized memory costs page faults that took longer than the passes
written into it; these hand out last step's memory where no one else can see it.
"""

from __future__ import annotations

import sys
import weakref

import torch

__all__: list[str] = []


#: torch's count of the tensors and storages holding a storage's memory (a private function of
#: torch 2.x; where a release lacks it, no buffer counts as alone and every step takes fresh memory).
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _storage_holders(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    if _USE_COUNT is None:
        return (-1, -1)  # never _ALONE (None then)
    return _USE_COUNT(st._cdata), sys.getrefcount(st)


class _Reusable:
    """A buffer handed out again while nothing but this object references its memory.

    ``take(like)`` gives a tensor of ``like``'s shape, dtype, device and layout: on the last call's
    memory when ``like`` is contiguous and no tensor but this object's own, and no storage object,
    holds that memory (torch's storage use count), else on fresh memory.
    """

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None

    def take(self, like: torch.Tensor) -> torch.Tensor:
        b = self.buf
        if (b is None or not like.is_contiguous() or b.shape != like.shape or b.dtype != like.dtype
                or b.device != like.device or b.is_inference() != torch.is_inference_mode_enabled()
                or _storage_holders(b) != _ALONE):
            b = self.buf = torch.empty_like(like)  # (like's layout: reused only when contiguous)
        return b.detach()

    def __deepcopy__(self, memo) -> "_Reusable":
        return _Reusable()

    def __reduce__(self):  # pickled (torch.save of a prepared model) empty
        return (_Reusable, ())


class _MaskWorkspace:
    """One quantizer's activation-sized buffers, reused from step to step: the gradient mask,
    the forward's output and the backward's gradient.

    On CPU, fresh activation-sized memory costs page faults that took longer than the passes
    written into it (a Net's step: 1.30x float with fresh buffers, 1.21x reusing them).
    ``take(like)`` returns the mask buffer of the last call when it fits ``like`` (shape, strides,
    dtype, device, inference mode) and the graph that saved it is gone (its backward node is no
    longer alive: the step's graph was freed), else a fresh one. So a graph kept alive
    (``retain_graph``, an output still referenced, a quantizer called twice in one forward) never
    sees its mask overwritten. The output and gradient buffers (:class:`_Reusable`) are handed out
    again only while nothing else references their memory (an output or an alias of it kept by the
    caller, a gradient kept as a leaf's ``.grad``). Between steps they hold up to three
    activation-sized buffers per quantizer. Not copied or pickled with the module (a copy starts empty).
    """

    __slots__ = ("mask", "node", "output", "grad", "_zero")

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.node: weakref.ref | None = None
        self.output = _Reusable()
        self.grad = _Reusable()
        self._zero: torch.Tensor | None = None

    def zero(self, like: torch.Tensor) -> torch.Tensor:
        """A 0-d zero of ``like``'s dtype and device (an operand only: never written), kept from call to call."""
        z = self._zero
        if z is None or z.dtype != like.dtype or z.device != like.device:
            z = self._zero = torch.zeros((), dtype=like.dtype, device=like.device)
        return z

    def take(self, like: torch.Tensor) -> torch.Tensor:
        m = self.mask
        if (m is None or (self.node is not None and self.node() is not None) or m.shape != like.shape
                or m.stride() != like.stride() or m.dtype != like.dtype or m.device != like.device
                or m.is_inference() != torch.is_inference_mode_enabled()):
            m = self.mask = torch.empty_like(like)
        self.node = None
        return m

    def hold(self, node) -> None:
        """Mark the buffer as saved by ``node`` (the backward node) until that node is freed."""
        self.node = weakref.ref(node)

    def __deepcopy__(self, memo) -> "_MaskWorkspace":
        return _MaskWorkspace()

    def __reduce__(self):  # pickled (torch.save of a prepared model) as an empty workspace
        return (_MaskWorkspace, ())


_ALONE = _storage_holders(torch.empty(1)) if _USE_COUNT is not None else None
