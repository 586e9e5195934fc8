"""A saved ``.mlpackage``'s compressed weights read straight from its files, without building its program.

:func:`quanta.mil.program.read_compressed_weights` loads the whole MIL program (every op, every
float weight) to list what the ``constexpr_*`` ops store. An exporter that only needs to check
its codes after saving pays for a second full parse that way. :func:`read_constexpr_weights`
parses the spec (a small protobuf: the ops and where their values lie in ``weight.bin``) and
reads just the blobs of the two quantization ops, ``constexpr_affine_dequantize`` (iOS16/17)
and ``constexpr_blockwise_shift_scale`` (iOS18): its cost grows with the quantized weights, not
with the model. The files are opened for reading only (:func:`~quanta.mil.program.read_spec` never goes through
coremltools' package reader, which rewrites ``Manifest.json``).

``weight.bin`` layout (COREML_FACTS.md): a 64-byte file header, then per blob a 64-byte record
``<IIQQ`` (0xDEADBEEF, dtype, nbytes, data offset) and the data, 64-byte aligned; 4-bit values
are packed two per byte, low nibble first, ``int4`` in two's complement.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from .program import WEIGHTS_DIR, CompressedWeight, read_spec

__all__ = ["read_constexpr_weights", "weight_bytes", "blob_refs", "QUANTIZATION_OPS"]

#: The ``constexpr_*`` ops whose stored arrays :func:`read_constexpr_weights` reads.
QUANTIZATION_OPS = ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale")
_BLOB_HEADER = struct.Struct("<IIQQ")
_SENTINEL = 0xDEADBEEF
_MODEL_PATH = "@model_path/"


def _dtype_names() -> dict[int, str]:
    from coremltools.proto import MIL_pb2

    names = {"FLOAT16": "fp16", "FLOAT32": "fp32", "INT8": "int8", "UINT8": "uint8", "INT4": "int4",
             "UINT4": "uint4", "INT16": "int16", "UINT16": "uint16", "INT32": "int32", "BOOL": "bool"}
    return {MIL_pb2.DataType.Value(k): v for k, v in names.items()}


_NUMPY = {"fp16": np.float16, "fp32": np.float32, "int8": np.int8, "uint8": np.uint8, "int16": np.int16,
          "uint16": np.uint16, "int32": np.int32, "bool": np.bool_}


class _Blobs:
    """The weight files of one package, each opened once, read at the offsets the spec names."""

    def __init__(self, weights_dir: Path) -> None:
        self.weights_dir = weights_dir
        self.files: dict[str, Any] = {}

    def header(self, file_name: str, offset: int) -> tuple[Any, str, int, int]:
        """(open file, its name in the weights folder, byte count, data offset) of the blob at ``offset``."""
        rel = file_name[len(_MODEL_PATH):] if file_name.startswith(_MODEL_PATH) else file_name
        rel = rel.removeprefix("weights/")
        fh = self.files.get(rel)
        if fh is None:
            fh = self.files[rel] = open(self.weights_dir / rel, "rb")
        fh.seek(offset)
        sentinel, _dtype, nbytes, data_offset = _BLOB_HEADER.unpack(fh.read(_BLOB_HEADER.size))
        if sentinel != _SENTINEL:
            raise ValueError(f"{rel}: no weight header at offset {offset}")
        return fh, rel, nbytes, data_offset

    def read(self, file_name: str, offset: int) -> bytes:
        fh, rel, nbytes, data_offset = self.header(file_name, offset)
        fh.seek(data_offset)
        data = fh.read(nbytes)
        if len(data) != nbytes:
            raise ValueError(f"{rel}: the weight at offset {offset} is truncated")
        return data

    def close(self) -> None:
        for fh in self.files.values():
            fh.close()


def _array(value, dtype_names: dict[int, str], blobs: _Blobs) -> tuple[np.ndarray, str]:
    """(array, MIL dtype name) of one ``MIL_pb2.Value``: an immediate tensor or a blob."""
    tensor_type = value.type.tensorType
    dtype = dtype_names.get(tensor_type.dataType)
    if dtype is None:
        raise ValueError(f"stored type {tensor_type.dataType} is not read here")
    shape = tuple(int(d.constant.size) for d in tensor_type.dimensions)
    count = int(np.prod(shape, dtype=np.int64))
    tensor = value.immediateValue.tensor
    kind = None if value.WhichOneof("value") == "blobFileValue" else tensor.WhichOneof("value")
    if kind is None or kind == "bytes":  # a blob, or an immediate packed like one (4-bit values too)
        raw = (blobs.read(value.blobFileValue.fileName, int(value.blobFileValue.offset)) if kind is None
               else tensor.bytes.values)
        if dtype in ("int4", "uint4"):
            packed = np.frombuffer(raw, dtype=np.uint8)
            nibbles = np.empty(packed.size * 2, dtype=np.uint8)
            nibbles[0::2] = packed & 0x0F
            nibbles[1::2] = packed >> 4
            nibbles = nibbles[:count]
            arr = ((nibbles.astype(np.int8) ^ 8) - 8) if dtype == "int4" else nibbles
        else:
            arr = np.frombuffer(raw, dtype=_NUMPY[dtype], count=count)
    else:
        arr = np.asarray(list(getattr(tensor, kind).values), dtype=np.int8 if dtype == "int4" else
                         np.uint8 if dtype == "uint4" else _NUMPY[dtype])
    return arr.reshape(shape), dtype


def _input(op, key: str, consts: dict) -> Any:
    """The ``MIL_pb2.Value`` of input or attribute ``key`` of ``op`` (following a name to its const op)."""
    if key in op.attributes:
        return op.attributes[key]
    if key not in op.inputs or len(op.inputs[key].arguments) != 1:
        return None
    arg = op.inputs[key].arguments[0]
    if arg.WhichOneof("binding") == "value":
        return arg.value
    const = consts.get(arg.name)
    return None if const is None else const.attributes.get("val")


def read_constexpr_weights(path: str | os.PathLike, function: str = "main",
                           spec: Any = None) -> dict[str, CompressedWeight]:
    """Map each quantization op's output name to a :class:`~quanta.mil.program.CompressedWeight`,
    as :func:`~quanta.mil.program.read_compressed_weights` does for these ops (``inputs`` holds
    the stored arrays by name), reading only the spec and these ops' blobs.

    ``spec``: the package's parsed spec when the caller has it (else :func:`~quanta.mil.program.read_spec`). Ops
    other than :data:`QUANTIZATION_OPS` (lookup tables, sparse weights) are not listed.
    Raises ValueError for a package whose files do not hold what the spec says."""
    path = Path(path)
    spec = read_spec(path) if spec is None else spec
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError(f"{str(path)!r} is a {spec.WhichOneof('Type')!r} model, not an ML program")
    functions = spec.mlProgram.functions
    if function not in functions:
        raise KeyError(f"no function {function!r} in the program (has {sorted(functions)})")
    func = functions[function]
    block = func.block_specializations[func.opset]
    dtype_names = _dtype_names()
    consts = {op.outputs[0].name: op for op in block.operations if op.type == "const" and op.outputs}
    blobs = _Blobs(path / WEIGHTS_DIR)
    out = {}
    try:
        for op in block.operations:
            if op.type not in QUANTIZATION_OPS or not op.outputs:
                continue
            data_key = "quantized_data" if op.type == "constexpr_affine_dequantize" else "data"
            inputs: dict[str, Any] = {}
            dtype = None
            for key in (data_key, "scale", "zero_point", "offset", "axis"):
                value = _input(op, key, consts)
                if value is None:
                    continue
                inputs[key], stored = _array(value, dtype_names, blobs)
                if key == data_key:
                    dtype = stored
            data, scale = inputs.get(data_key), inputs.get("scale")
            axis = block_size = None
            if op.type == "constexpr_affine_dequantize" and "axis" in inputs:
                axis = int(inputs["axis"].reshape(-1)[0])
            elif scale is not None and data is not None:
                block_size = tuple(int(d // s) for d, s in zip(data.shape, scale.shape))
            name_attr = op.attributes.get("name")
            op_name = (name_attr.immediateValue.tensor.strings.values[0] if name_attr is not None
                       and name_attr.immediateValue.tensor.strings.values else op.outputs[0].name)
            out[op.outputs[0].name] = CompressedWeight(
                op_type=op.type, op_name=op_name,
                shape=tuple(int(d.constant.size) for d in op.outputs[0].type.tensorType.dimensions),
                dtype=dtype, data=data, scale=scale, zero_point=inputs.get("zero_point", inputs.get("offset")),
                axis=axis, block_size=block_size, inputs=inputs)
    finally:
        blobs.close()
    return out


def blob_refs(message: Any, out: list) -> None:
    """Every ``BlobFileValue`` (fileName, offset) inside a protobuf message."""
    if message.DESCRIPTOR.name == "BlobFileValue":
        out.append((message.fileName, int(message.offset)))
        return
    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        if hasattr(value, "ListFields"):
            blob_refs(value, out)
            continue
        items = value.values() if callable(getattr(value, "values", None)) else value  # map or repeated
        for item in items:
            if hasattr(item, "ListFields"):
                blob_refs(item, out)


def weight_bytes(path: str | os.PathLike, spec: Any = None) -> tuple[int, int]:
    """``(quantized, float)``: the data bytes of the weight-file blobs the package's ops read,
    those of compressed-weight ops (``constexpr_*``: codes, scales, offsets, lookup tables) and
    those of every other op (float constants). Each blob counts once; blob headers, padding and
    constants small enough to be stored inside the spec itself are in neither. Reads the spec and the blob headers only."""
    path = Path(path)
    spec = read_spec(path) if spec is None else spec
    seen: dict[tuple[str, int], bool] = {}
    for func in spec.mlProgram.functions.values():
        for block in func.block_specializations.values():
            for op in block.operations:
                refs: list = []
                blob_refs(op, refs)
                for ref in refs:
                    seen[ref] = seen.get(ref, False) or op.type.startswith("constexpr_")
    blobs = _Blobs(path / WEIGHTS_DIR)
    quantized = floats = 0
    try:
        for (file_name, offset), compressed in seen.items():
            nbytes = blobs.header(file_name, offset)[2]
            if compressed:
                quantized += nbytes
            else:
                floats += nbytes
    finally:
        blobs.close()
    return quantized, floats
