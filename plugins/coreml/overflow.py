"""fp16 overflow of an exported program: found on the example inputs, and the ops that overflow kept in float32.

Core ML computes a ``float16`` program's activations in fp16, whose largest finite value is
65504. A model whose activations (or an intermediate such as an RMSNorm's ``x ** 2``) exceed
it gives ``inf`` on device, and often a wrong but finite output after a normalization.

The check: the exporter runs the converted program (:func:`find_fp16_overflow`) with the numpy
reference runner on the example inputs and compares it with the torch model. When the agreement
is below the tolerance and an fp16 op turned finite inputs into ``inf``/``NaN``, that op is named;
``compute_precision: float16`` refuses.

Per op (``compute_precision: auto``, the default), after an overflow: the exporter converts again
with :class:`Fp32WhereOverflowing` as the op selector of coremltools'
``ct.transform.FP16ComputePrecision``. When that conversion reaches its fp16 pass, the program is
still all float32; the selector runs it once (:func:`quanta.mil.runner.run_function`) on the
example inputs and keeps in float32 every op with a float input or output beyond
:data:`FP16_SAFE` in magnitude (an op whose output overflows, and the ops that read such a value,
which an fp16 op would cast to ``inf``). Every other op computes in fp16. The choice is made on
the very op objects the pass transforms, so no name has to survive from the check to the second
conversion. That program is checked again; should it still overflow, the exporter converts the
whole program in float32.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import attrs
import numpy as np

__all__ = ["FP16_MAX", "FP16_SAFE", "Overflow", "Fp32WhereOverflowing", "find_fp16_overflow"]

#: The largest finite float16 value.
FP16_MAX = 65504.0
#: Values beyond this magnitude in the float32 program keep their op in float32: fp16 rounding
#: of the ops before moves a value by far less than this margin (10%) below the overflow.
FP16_SAFE = 0.9 * FP16_MAX


@attrs.frozen
class Overflow:
    """An fp16 overflow found on the example inputs: the first op (name, type) whose fp16 result
    is not finite although its inputs are, and the figures of the package against torch."""

    op: str
    op_type: str
    figures: dict

    def describe(self) -> str:
        """One line for messages: where it overflows and how far the outputs are off."""
        return (f"the float16 program overflows (|value| > {FP16_MAX:g}) at op {self.op!r} ({self.op_type}) on the "
                f"example inputs: outputs agree with torch to cosine {self.figures['cosine']:.6f} only "
                f"(tolerance {self.figures['min_cosine']})")


def _values(op, env: Mapping[str, Any]) -> list:
    out = []
    for var in op.inputs.values():
        for v in (var if isinstance(var, (list, tuple)) else [var]):
            name = getattr(v, "name", None)
            out.append(env.get(name) if isinstance(name, str) else None)
    return out


def _too_large(value: Any) -> bool:
    if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating) or value.size == 0:
        return False
    with np.errstate(invalid="ignore"):
        return bool(np.nanmax(np.abs(value)) > FP16_SAFE)


class Fp32WhereOverflowing:
    """An ``op_selector`` for ``ct.transform.FP16ComputePrecision``: True (compute in fp16) for every
    op except those whose float inputs or outputs exceed :data:`FP16_SAFE` on ``inputs``.

    ``inputs``: the program's inputs by name, as numpy arrays of the declared dtypes. After the
    conversion, ``fp32_ops`` lists ``(op type, op name)`` of the ops kept in float32 and
    ``error`` why nothing could be chosen (an op the reference runner lacks: then every op is
    fp16, and :func:`find_fp16_overflow` is the only guard)."""

    def __init__(self, inputs: Mapping[str, np.ndarray]) -> None:
        self.inputs = dict(inputs)
        self.keep: set[int] | None = None
        self.fp32_ops: list[tuple[str, str]] = []
        self.error: str | None = None

    def _choose(self, func) -> set[int]:
        from quanta.errors import QuantaError
        from quanta.mil.runner import run_function

        try:
            with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)
                env = run_function(func, self.inputs, intermediates=True)
        except (QuantaError, KeyError, TypeError, ValueError) as exc:  # an op the runner lacks: no choice
            self.error = f"{type(exc).__name__}: {exc}"
            return set()
        keep = set()
        for op in func.operations:
            if op.op_type == "const":
                continue
            if any(_too_large(env.get(v.name)) for v in op.outputs) or any(_too_large(v) for v in _values(op, env)):
                keep.add(id(op))
                self.fp32_ops.append((op.op_type, op.name))
        return keep

    def __call__(self, op) -> bool:
        if self.keep is None:
            block = op.enclosing_block
            while getattr(block, "outer_op", None) is not None:
                block = block.outer_op.enclosing_block
            self.keep = self._choose(block)
        return id(op) not in self.keep


def _first_overflow(program, values: dict) -> tuple[str, str] | None:
    func = program.functions["main"]
    for op in func.operations:
        outs = [values.get(v.name) for v in op.outputs]
        if not any(isinstance(o, np.ndarray) and o.dtype == np.float16 and not np.isfinite(o).all() for o in outs):
            continue
        ins = _values(op, values)
        if all(not isinstance(i, np.ndarray) or not np.issubdtype(i.dtype, np.floating) or np.isfinite(i).all()
               for i in ins):
            return op.name, op.op_type
    return None


def find_fp16_overflow(program: Any, model: Any, example_inputs: Any) -> Overflow | None:
    """The fp16 overflow of ``program`` (a MIL ``Program``: the one ``ct.convert`` built, or a
    loaded package) on ``example_inputs``, or None.

    None when the program agrees with ``model`` within the tolerance, when its disagreement has
    no overflowing op behind it, or when the reference runner cannot run the program or compare it
    (an op it does not implement): then nothing can be said and the export goes on as before.
    """
    from quanta.errors import QuantaError
    from quanta.mil.runner import declared_numpy_dtype, run

    from .verify import _named_inputs, verify_program

    try:
        with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            figures = verify_program(program, model, example_inputs)
            if figures["within_tolerance"]:
                return None
            inputs, _ = _named_inputs(program, example_inputs)
            func = program.functions["main"]
            values = run(program, {n: t.numpy().astype(declared_numpy_dtype(func.inputs[n]))
                                   for n, t in inputs.items()}, intermediates=True)
    except QuantaError:  # an op the runner lacks (UnsupportedOpError), outputs it cannot pair: no verdict
        return None
    where = _first_overflow(program, values)
    return None if where is None else Overflow(where[0], where[1], figures)
