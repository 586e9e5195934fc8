"""The op table of the MIL reference runner: ``OPS`` (op type -> numpy implementation), the
``op`` decorator that fills it, and the error for ops it lacks. Op modules
(:mod:`quanta.mil.ops`, :mod:`quanta.mil.ops_conv`) register into it; a third party can too."""

from __future__ import annotations

from typing import Callable

import numpy as np

from quanta.errors import QuantaError

__all__ = ["UnsupportedOpError", "OPS", "OpFn", "supported_ops", "op", "unsupported", "axis_shape"]


class UnsupportedOpError(QuantaError, NotImplementedError):
    """The runner has no numpy implementation of an op (or of one of its modes).

    ``op_type`` and ``op_name`` name the op in the MIL program.
    """

    def __init__(self, op_type: str, op_name: str, detail: str = ""):
        self.op_type, self.op_name = op_type, op_name
        extra = f": {detail}" if detail else ""
        super().__init__(
            f"MIL op {op_type!r} (named {op_name!r}) is not supported by the numpy runner{extra}"
        )


OpFn = Callable[..., "np.ndarray | tuple[np.ndarray, ...]"]
OPS: dict[str, OpFn] = {}


def supported_ops() -> list[str]:
    """Sorted op types the runner can execute."""
    return sorted(OPS)


def op(*names: str):
    """Decorator registering ``fn(op, a)`` as the implementation of MIL op types ``names``."""
    def deco(fn):
        for name in names:
            OPS[name] = fn
        return fn

    return deco


def unsupported(op, detail: str) -> "UnsupportedOpError":
    """The error to raise for an unsupported mode of ``op`` (names the op and its type)."""
    return UnsupportedOpError(op.op_type, op.name, detail)


def axis_shape(param: np.ndarray, rank: int, axis: int | None) -> np.ndarray:
    """Reshape a scalar or per-axis vector ``param`` so it broadcasts against rank ``rank``."""
    param = np.asarray(param)
    if param.ndim == 0 or param.ndim == rank:
        return param
    shape = [1] * rank
    shape[axis % rank] = param.size
    return param.reshape(shape)
