"""Read a saved Core ML ``.mlpackage`` back into its MIL program, on any OS.

``coremltools`` can only *run* a model on macOS, but its protobuf loader works anywhere:
``load_program`` gives the :class:`~coremltools.converters.mil.mil.Program` (ops, declared
dtypes and shapes, stored weights), which :mod:`quanta.mil.runner` executes
with numpy. ``read_compressed_weights`` lists what each compressed-weight (``constexpr_*``)
op stores, so tests can compare exported integer codes with the ones quanta computed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Union

import attrs
import numpy as np

__all__ = [
    "WEIGHTS_DIR",
    "ModelLike",
    "CompressedWeight",
    "load_program",
    "read_compressed_weights",
    "read_manifest",
    "read_spec",
    "spec_path",
]

WEIGHTS_DIR = "Data/com.apple.CoreML/weights"
"""Where an ``.mlpackage`` keeps ``weight.bin``, relative to the package root."""

ModelLike = Union[str, "os.PathLike[str]", Any]
"""A path to an ``.mlpackage``, a ``coremltools.models.MLModel``, or a loaded MIL ``Program``."""


def _program_class():
    from coremltools.converters.mil.mil import Program

    return Program


def read_manifest(path: str | os.PathLike) -> dict:
    """The ``Manifest.json`` of the ``.mlpackage`` at ``path``, read as untrusted data: within the
    metadata size limit, no duplicate keys, every item's ``path`` inside the package's ``Data``
    folder, and no symlink anywhere in the package leading out of it. Raises
    :class:`~quanta.errors.CoreMLPackageError` naming the entry otherwise."""
    from quanta.errors import CoreMLPackageError
    from quanta._files.untrusted import check_tree, inside, read_json  # core's reading rules for foreign files

    path = Path(path)

    def error(message: str, name: str | None = None) -> CoreMLPackageError:
        return CoreMLPackageError(f"{str(path)!r}: {message}" if str(path) not in message else message, str(path))

    check_tree(path, "Core ML package", error)
    manifest = inside(path, "Manifest.json", "file", error)
    def damaged(message: str, name: str | None = None) -> CoreMLPackageError:
        return error(f"Manifest.json is not a valid package manifest ({message}); the package is damaged: export "
                     "or convert it again")

    data = read_json(manifest, "the file", damaged)
    entries = data.get("itemInfoEntries") if isinstance(data, dict) else None
    if isinstance(entries, dict):
        for item in entries.values():
            rel = item.get("path") if isinstance(item, dict) else None
            if rel is not None:
                inside(path / "Data", rel, "Manifest.json item path", error)
    return data


def spec_path(path: str | os.PathLike) -> Path:
    """The root model file (``Data/<item>/model.mlmodel``) the package's ``Manifest.json`` names.

    The manifest is read with :func:`read_manifest`'s rules (bounded, every
    item and link inside the package). Raises ValueError for a manifest without a root item."""
    path = Path(path)
    manifest = read_manifest(path)
    try:
        rel = manifest["rootModelIdentifier"]
        rel = manifest["itemInfoEntries"][rel]["path"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{str(path)!r}: Manifest.json names no root model ({exc})") from None
    return path / "Data" / rel


def read_spec(path: str | os.PathLike) -> Any:
    """The ``coremltools.proto.Model_pb2.Model`` of the ``.mlpackage`` at ``path``, parsed from its
    root model file; nothing in the package is written (coremltools' ``MLModel(path)`` rewrites
    ``Manifest.json`` when it opens a package)."""
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path(path).read_bytes())
    return spec


def _load_package(path: Path):
    """The MIL program of the ``.mlpackage`` at ``path`` (weights are read eagerly)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    if not path.exists():
        raise FileNotFoundError(f"no Core ML package at {str(path)!r}")
    if path.is_dir():
        # Parsed from the root model file itself, never through coremltools' package reader
        # (``MLModel(path)`` rewrites Manifest.json): reading a package leaves it as it was.
        spec = read_spec(path)  # the manifest first: nothing outside the package is opened
    else:
        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError(
            f"{str(path)!r} is a {spec.WhichOneof('Type')!r} model, not an ML program; "
            "convert with convert_to='mlprogram'"
        )
    return load(
        spec,
        specification_version=spec.specificationVersion,
        file_weights_dir=str(path / WEIGHTS_DIR),
    )


def load_program(model: ModelLike):
    """Load ``model`` into its MIL ``Program``.

    ``model`` is a path to a saved ``.mlpackage``, an ``MLModel`` (saved to a temporary
    folder first, so an in-memory model from ``ct.convert`` works too), or a ``Program``,
    returned as is. Weight values are read while loading: the returned program does not
    refer back to the files.
    """
    import coremltools as ct

    if isinstance(model, _program_class()):
        return model
    if isinstance(model, ct.models.MLModel):
        with tempfile.TemporaryDirectory(prefix="quanta-mlpackage-") as tmp:
            path = Path(tmp) / "model.mlpackage"
            model.save(str(path))
            return _load_package(path)
    if isinstance(model, (str, os.PathLike)):
        return _load_package(Path(model))
    raise TypeError(
        f"expected a path to an .mlpackage, a coremltools MLModel or a MIL Program, "
        f"got {type(model).__name__}"
    )


@attrs.frozen(kw_only=True)
class CompressedWeight:
    """What one ``constexpr_*`` op stores, read back from the saved model.

    - ``op_type``, ``op_name``: the MIL op (e.g. ``"constexpr_blockwise_shift_scale"``).
    - ``shape``: the shape of the weight the op produces (e.g. ``(out, in)``).
    - ``dtype``: the stored element type as MIL names it: ``"int4"``, ``"uint4"``,
      ``"int8"``, ``"uint8"``, ``"fp16"``... (``None`` for op types without one code array).
    - ``data``: the stored codes (``quantized_data``/``data``/``indices``), with the same
      shape as the weight; 4-bit codes are held in ``int8``/``uint8`` arrays.
    - ``scale``: fp16 or fp32 array: shape ``()`` or ``(n,)`` for
      ``constexpr_affine_dequantize`` (per tensor / per ``axis``), the same rank as
      ``data`` for ``constexpr_blockwise_shift_scale`` (one entry per block).
    - ``zero_point``: the ``zero_point``/``offset`` array, or ``None`` where not stored
      (iOS18 omits the offset when every zero point is 0).
    - ``axis``: the per-channel axis of ``constexpr_affine_dequantize``, else ``None``.
    - ``block_size``: per dimension, ``data.shape[i] // scale.shape[i]`` for
      ``constexpr_blockwise_shift_scale`` (1 = a scale per element along that axis), else
      ``None``.
    - ``inputs``: every constant input of the op by name, as stored (covers op types the
      fields above do not describe, such as ``constexpr_lut_to_dense``).
    """

    op_type: str
    op_name: str
    shape: tuple[int, ...]
    dtype: str | None
    data: np.ndarray | None
    scale: np.ndarray | None
    zero_point: np.ndarray | None
    axis: int | None
    block_size: tuple[int, ...] | None
    inputs: dict[str, Any] = attrs.field(factory=dict)


def _const_value(var) -> Any:
    val = var.val
    return np.asarray(val) if val is not None else None


def _record(op) -> CompressedWeight:
    from coremltools.converters.mil.mil import types

    inputs = {
        name: _const_value(var)
        for name, var in op.inputs.items()
        if not isinstance(var, (list, tuple))
    }
    data_key = next((k for k in ("quantized_data", "data", "indices") if k in op.inputs), None)
    data = inputs.get(data_key) if data_key else None
    dtype = types.builtin_to_string(op.inputs[data_key].dtype) if data_key else None
    scale = inputs.get("scale")
    zero_point = inputs.get("zero_point", inputs.get("offset"))
    axis = block_size = None
    if op.op_type == "constexpr_affine_dequantize":
        axis = int(inputs["axis"])
    elif op.op_type == "constexpr_blockwise_shift_scale" and scale is not None:
        block_size = tuple(int(d // s) for d, s in zip(data.shape, scale.shape))
    return CompressedWeight(
        op_type=op.op_type,
        op_name=op.name,
        shape=tuple(int(d) for d in op.outputs[0].shape),
        dtype=dtype,
        data=data,
        scale=scale,
        zero_point=zero_point,
        axis=axis,
        block_size=block_size,
        inputs=inputs,
    )


def read_compressed_weights(model: ModelLike, function: str = "main") -> dict[str, CompressedWeight]:
    """Map each ``constexpr_*`` op's output name to a :class:`CompressedWeight`.

    ``model`` is anything :func:`load_program` takes. The output name is the variable the
    consuming ops (``linear``, ``conv``...) reference, e.g. ``"var_0_weight_cast_fp16"``.
    Arrays are exactly what the package stores: compare codes with ``np.array_equal``.
    """
    program = load_program(model)
    if function not in program.functions:
        raise KeyError(f"no function {function!r} in the program (has {sorted(program.functions)})")
    return {
        op.outputs[0].name: _record(op)
        for op in program.functions[function].operations
        if op.op_type.startswith("constexpr_")
    }
