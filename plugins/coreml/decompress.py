"""Reading a Core ML model's weights back: decompression of quantized weights and weight metadata.

``decompress_weights(model)`` replaces every linearly quantized weight (``constexpr_affine_dequantize``,
``constexpr_blockwise_shift_scale``) by a float ``const`` holding ``(codes - zero_point) * scale``
(quanta's dequantization, computed in the scale's dtype as Core ML does); the model is not modified.
Weights compressed in ways quanta does not produce (palettized, sparse) are refused, naming the op.
``weights_metadata(model, weight_threshold)`` lists the float ``const`` weights with more than
``weight_threshold`` elements and the ops that consume them, as coremltools' ``get_weights_metadata``.
"""

from __future__ import annotations

from collections import OrderedDict

from typing import Any

import numpy as np

from quanta.errors import CoreMLPackageError

__all__ = ["decompress_weights", "weights_metadata", "dequantized_value"]

_LINEAR_OPS = ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale")


def _expand(param: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A per-block parameter of the weight's rank repeated to the weight's shape."""
    for axis, (n, m) in enumerate(zip(shape, param.shape)):
        if m != n:
            param = np.repeat(param, n // m, axis=axis)
    return param


def dequantized_value(op) -> np.ndarray:
    """The float value of a ``constexpr_affine_dequantize`` / ``constexpr_blockwise_shift_scale`` op."""
    if op.op_type == "constexpr_affine_dequantize":
        data = np.asarray(op.quantized_data.val)
        scale, zero = np.asarray(op.scale.val), np.asarray(op.zero_point.val)
        axis = int(op.axis.val) % data.ndim
        shape = [1] * data.ndim
        if scale.size > 1:
            shape[axis] = scale.size
        scale = scale.reshape(shape)
        zero = zero.reshape(shape if zero.size > 1 else [1] * data.ndim)
        return ((data.astype(np.float32) - zero.astype(np.float32)) * scale).astype(scale.dtype)
    data = np.asarray(op.data.val)
    scale = np.asarray(op.scale.val)
    offset = None if op.offset is None else np.asarray(op.offset.val)
    values = data.astype(np.float32)
    if offset is not None:
        values = values - _expand(offset.astype(np.float32), data.shape)
    return (values * _expand(scale, data.shape)).astype(scale.dtype)


def _decompress_pass() -> Any:
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.helper import block_context_manager

    class Decompress(AbstractGraphPass):
        def apply(self, prog: Any) -> None:
            @block_context_manager
            def apply_block(block: Any) -> None:
                for op in list(block.operations):
                    for b in op.blocks:
                        apply_block(b)
                    if not op.op_type.startswith("constexpr_"):
                        continue
                    if op.op_type not in _LINEAR_OPS:
                        raise CoreMLPackageError(
                            f"op {op.name!r} is {op.op_type}: quanta decompresses linearly quantized weights "
                            f"only ({', '.join(_LINEAR_OPS)}); palettized or sparse weights are not supported")
                    new_var = mb.const(val=dequantized_value(op), before_op=op, name=f"{op.name}_decompressed")
                    block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new_var,
                                                       no_check_var_types=True, force_replace=True)
                    block.remove_ops([op])

            for func in prog.functions.values():
                apply_block(func)

    return Decompress()


def decompress_weights(mlmodel: Any) -> Any:
    """A new ``MLModel`` whose linearly quantized weights are float consts (``mlmodel`` is not modified)."""
    from coremltools.models import utils as model_utils

    from quanta.plugins.coreml.backend import load_mlmodel

    return model_utils._apply_graph_pass(load_mlmodel(mlmodel), _decompress_pass(), skip_model_load=True)


def weights_metadata(mlmodel: Any, weight_threshold: int = 2048) -> Any:
    """``{const name: CoreMLWeightMetaData}`` for float const weights with more than ``weight_threshold``
    elements, each with its value, sparsity, unique value count and consuming ops (coremltools' classes)."""
    from coremltools.optimize.coreml._post_training_quantization import (
        CoreMLOpMetaData,
        CoreMLWeightMetaData,
        _MetaDataDict,
    )

    from quanta.plugins.coreml.backend import _load_program, load_mlmodel

    def eligible(val) -> bool:
        return isinstance(val, np.ndarray) and val.dtype.kind == "f" and val.size > weight_threshold

    program, _ = _load_program(load_mlmodel(mlmodel))
    out = _MetaDataDict({})

    def visit(block: Any) -> None:
        for op in block.operations:
            for b in op.blocks:
                visit(b)
            if op.op_type != "const" or not eligible(op.val.val):
                continue
            children, seen = [], set()
            for child in op.outputs[0].child_ops:
                if child in seen:
                    continue
                seen.add(child)
                names = OrderedDict((k, v.op.name) for k, v in child.inputs.items()
                                    if v.op is not None and v.op.op_type == "const" and eligible(v.val))
                children.append(CoreMLOpMetaData(op_type=child.op_type, name=child.name, params_name_mapping=names))
            out[op.name] = CoreMLWeightMetaData(op.val.val, child_ops=children)

    for func in program.functions.values():
        visit(func)
    return out
