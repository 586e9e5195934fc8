"""fp16 overflow of an exported program, found on the example inputs before the package ships.

Core ML computes a ``float16`` program's activations in fp16, whose largest finite value is
65504. A model whose activations (or an intermediate such as an RMSNorm's ``x ** 2``) exceed
it gives ``inf`` on device, and often a wrong but finite output after a normalization. The
exporter runs the saved program with the numpy reference runner (:mod:`quanta.mil.runner`,
which rounds every op's result to fp16 as Core ML does) on the example inputs and compares it
with the torch model (:func:`.verify.verify_package`). When the agreement is below the
tolerance and an fp16 op turned finite inputs into ``inf``/``NaN``, :func:`find_fp16_overflow`
names that op; the exporter then converts with ``compute_precision="float32"`` (the default
``compute_precision: auto``) or refuses (``compute_precision: float16`` asked for explicitly).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import attrs
import numpy as np

__all__ = ["FP16_MAX", "Overflow", "find_fp16_overflow"]

#: The largest finite float16 value.
FP16_MAX = 65504.0


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


def _first_overflow(program, values: dict) -> tuple[str, str] | None:
    func = program.functions["main"]
    for op in func.operations:
        outs = [values.get(v.name) for v in op.outputs]
        if not any(isinstance(o, np.ndarray) and o.dtype == np.float16 and not np.isfinite(o).all() for o in outs):
            continue
        ins = []
        for var in op.inputs.values():
            for v in (var if isinstance(var, (list, tuple)) else [var]):
                ins.append(values.get(v.name) if hasattr(v, "name") else None)
        if all(not isinstance(i, np.ndarray) or not np.issubdtype(i.dtype, np.floating) or np.isfinite(i).all()
               for i in ins):
            return op.name, op.op_type
    return None


def find_fp16_overflow(path: str | os.PathLike, model: Any, example_inputs: Any) -> Overflow | None:
    """The fp16 overflow of the package at ``path`` on ``example_inputs``, or None.

    None when the package agrees with ``model`` within the tolerance, when its disagreement has
    no overflowing op behind it, or when the reference runner cannot run the program or compare it
    (an op it does not implement): then nothing can be said and the export goes on as before.
    """
    from quanta.errors import QuantaError
    from quanta.mil.program import load_program
    from quanta.mil.runner import declared_numpy_dtype, run

    from .verify import _named_inputs, verify_package

    try:
        with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            figures = verify_package(path, model, example_inputs)
            if figures["within_tolerance"]:
                return None
            program = load_program(os.fspath(path))
            inputs, _ = _named_inputs(program, example_inputs)
            func = program.functions["main"]
            values = run(program, {n: t.numpy().astype(declared_numpy_dtype(func.inputs[n]))
                                   for n, t in inputs.items()}, intermediates=True)
    except QuantaError:  # an op the runner lacks (UnsupportedOpError), outputs it cannot pair: no verdict
        return None
    where = _first_overflow(program, values)
    return None if where is None else Overflow(where[0], where[1], figures)
