"""quanta's fp16 cast pass: coremltools' ``common::add_fp16_cast`` with its overflow scan in chunks.

coremltools decides, for every op with a float32 constant input, whether that constant holds a
finite value beyond float16's range (then the op stays float32). Its test,
``np.max(abs(v)[np.where(abs(v) < 1e38)]) > 65504``, builds several temporaries the size of the
constant: for an embedding table of 11.7M values (MiniLM) that is about 190 MB of fresh memory per
scan, 0.8-1.9 s of CPU on this project's machines, most of it page faults. :func:`overflows_fp16`
answers the same question over 64K-value chunks (nothing large allocated), and the pass
``quanta::add_fp16_cast`` is coremltools' own pass with only that test replaced, and its
underflow check counting a constant's values without copying it first: the same ops are cast,
the same program comes out. :func:`pass_pipeline` puts it in place of coremltools' pass.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = ["PASS_NAME", "FP16_MAX", "CHECKED_VERSIONS", "overflows_fp16", "register", "pass_pipeline"]

#: The registered name of quanta's pass (coremltools' is ``common::add_fp16_cast``).
PASS_NAME = "quanta::add_fp16_cast"
#: The largest finite float16 value.
FP16_MAX = 65504.0
#: Values above this count as infinities (coremltools' threshold): they may become fp16 inf.
_INFINITE = 1e38
_CHUNK = 1 << 16


def overflows_fp16(value: Any) -> bool:
    """Whether ``value`` holds a value whose magnitude is above :data:`FP16_MAX` and below 1e38
    (coremltools' definition: larger magnitudes, inf and NaN are not an overflow), scanned in
    chunks of 64K values."""
    flat = np.asarray(value).reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        magnitude = np.abs(flat[start:start + _CHUNK])
        top = magnitude.max()
        if top <= FP16_MAX:  # the usual chunk: one reduction (NaN compares False and is checked below)
            continue
        if np.any((magnitude > FP16_MAX) & (magnitude < _INFINITE)):
            return True
    return False


def _fp16_overflow(op) -> bool:
    # coremltools' FP16ComputePrecision.fp16_overflow, the same loop, with overflows_fp16 as the test.
    for inputs in op.inputs.values():
        for var in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
            if (var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32")
                    and overflows_fp16(var.op.val.val)):
                return True
    return False


#: The coremltools releases whose ``add_fp16_cast`` this pass was compared with (the tests convert
#: through both); with any other release :func:`register` declines and coremltools' pass runs.
CHECKED_VERSIONS = ("9.0",)


def register() -> bool:
    """Register ``quanta::add_fp16_cast`` with coremltools' pass registry (once per process);
    False, registering nothing, where coremltools is not a release in :data:`CHECKED_VERSIONS`."""
    import coremltools

    if ".".join(coremltools.__version__.split(".")[:2]) not in CHECKED_VERSIONS:
        return False
    from coremltools.converters.mil.mil.passes.defs.quantization import add_fp16_cast
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    if PASS_NAME in PASS_REGISTRY:
        return True

    class chunked_add_fp16_cast(add_fp16_cast):  # noqa: N801 - coremltools names passes in lower case
        """coremltools' ``add_fp16_cast`` whose overflow test scans constants in chunks."""

        fp16_overflow = staticmethod(_fp16_overflow)

        def _check_underflow_to_zero(self, new_var, var) -> None:
            # coremltools only looks at constants under 400 values, but counts them with a flattened
            # copy of every constant (47 MB for MiniLM's embedding table): count without copying.
            if np.size(var.val) < 400:
                super()._check_underflow_to_zero(new_var, var)

    namespace, name = PASS_NAME.split("::")
    PASS_REGISTRY.add(namespace, chunked_add_fp16_cast, override=False, name=name)
    return True


def pass_pipeline(pipeline: Any, compute_precision: str, op_selector: Callable | None = None) -> Any:
    """``pipeline`` (a ``ct.PassPipeline``) with coremltools' fp16 cast pass replaced by
    :data:`PASS_NAME` when ``compute_precision`` is ``"float16"`` (``op_selector``: the ops to cast,
    as ``ct.transform.FP16ComputePrecision`` takes it), or removed for ``"float32"``. With a
    coremltools release not in :data:`CHECKED_VERSIONS`, coremltools' own pass stays, with the
    ``op_selector`` as its option. Convert with ``compute_precision=ct.precision.FLOAT16`` (not an ``FP16ComputePrecision``, whose
    options coremltools would attach to the pass that is no longer there)."""
    theirs = "common::add_fp16_cast"
    if compute_precision == "float32":
        pipeline.remove_passes([theirs, "common::add_int16_cast"])
        return pipeline
    name = PASS_NAME if register() else theirs
    passes = list(pipeline.passes)
    if theirs in passes:
        passes[passes.index(theirs)] = name
        pipeline.passes = passes
        if op_selector is not None:
            pipeline.set_options(name, {"op_selector": op_selector})
    return pipeline
