"""Checks that a path is a readable Core ML package before coremltools opens it.

coremltools reports a broken package with raw errors (``RuntimeError`` for an empty folder, a
protobuf ``DecodeError`` for a truncated spec, ``ValueError: index out of bounds`` for a truncated
weight file). :func:`check_package` reads the package's structure itself and raises
:class:`~quanta.errors.CoreMLPackageError` naming the file at fault and the fix:

- the path exists and is a folder (an ``.mlpackage`` is a folder, not a file);
- ``Manifest.json`` exists, is JSON (within the metadata size limit, no key twice), every item's
  path and every symlink stays inside the package, and its ``rootModelIdentifier`` names an item
  whose file exists;
- the spec (``model.mlmodel``) parses as a Core ML ``Model`` protobuf and declares a model type;
- for an ML program, every weight the program references (``@model_path/weights/weight.bin``
  at an offset) lies inside the weight file: its 64-byte blob header carries the 0xDEADBEEF
  sentinel and its data ends before the end of the file.

Reading is done with the protobuf classes coremltools ships (no model compile, any OS).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from quanta.errors import CoreMLPackageError
from quanta._files.untrusted import inside
from quanta.mil.blobs import blob_refs

__all__ = ["check_package", "BLOB_SENTINEL"]

#: The marker every blob header in ``weight.bin`` starts with.
BLOB_SENTINEL = 0xDEADBEEF
_BLOB_HEADER = struct.Struct("<IIQQ")
_MODEL_PATH = "@model_path/"


def _fail(path: Path, message: str) -> CoreMLPackageError:
    return CoreMLPackageError(f"{str(path)!r}: {message}", str(path))


def _manifest_root(path: Path) -> Path:
    manifest = path / "Manifest.json"
    if not manifest.is_file():
        if not any(path.iterdir()):
            raise _fail(path, "is an empty folder, not a Core ML package (no Manifest.json); pass the "
                              ".mlpackage folder that ct.convert(...).save() or quanta.export wrote")
        raise _fail(path, "has no Manifest.json, so it is not a Core ML package; pass an .mlpackage folder")
    from quanta.mil.program import read_manifest

    data = read_manifest(path)  # bounded, no duplicate keys, every item path and link inside the package
    try:
        root = data["rootModelIdentifier"]
        entry = data["itemInfoEntries"][root]
        rel = entry["path"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise _fail(path, f"Manifest.json is not a valid package manifest ({type(exc).__name__}: {exc}); "
                          "the package is damaged: export or convert it again") from None
    spec_path = path / "Data" / rel
    if not spec_path.is_file():
        raise _fail(path, f"the manifest's root model file Data/{rel} is missing; the package is incomplete: "
                          "export or convert it again")
    return spec_path


def _parse_spec(path: Path, spec_path: Path) -> Any:
    from google.protobuf.message import DecodeError

    from .ct_import import import_coremltools

    import_coremltools()
    from coremltools.proto import Model_pb2

    raw = spec_path.read_bytes()
    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise _fail(path, f"{spec_path.name} ({len(raw)} bytes) is truncated or corrupt ({exc}); the package "
                          "is damaged: export or convert it again") from None
    if spec.WhichOneof("Type") is None or spec.specificationVersion == 0:
        raise _fail(path, f"{spec_path.name} ({len(raw)} bytes) holds no model (truncated or not a Core ML "
                          "spec); the package is damaged: export or convert it again")
    return spec


def _check_weights(path: Path, spec_path: Path, spec) -> None:
    refs: list[tuple[str, int]] = []
    blob_refs(spec.mlProgram, refs)
    sizes: dict[Path, int] = {}
    for name, offset in refs:
        rel = name[len(_MODEL_PATH):] if name.startswith(_MODEL_PATH) else name
        weight_file = inside(spec_path.parent, rel, "weight file the program names",
                             lambda message, _name=None: _fail(path, message))
        if weight_file not in sizes:
            if not weight_file.is_file():
                raise _fail(path, f"the program reads weights from {rel}, which is missing; the package is "
                                  "incomplete: export or convert it again")
            sizes[weight_file] = weight_file.stat().st_size
        size = sizes[weight_file]
        where = f"{rel} ({size} bytes)"
        if offset + _BLOB_HEADER.size > size:
            raise _fail(path, f"{where} is truncated: the program reads a weight at offset {offset}, past its "
                              "end; the package is damaged: export or convert it again")
        with open(weight_file, "rb") as fh:
            fh.seek(offset)
            sentinel, _dtype, nbytes, data_offset = _BLOB_HEADER.unpack(fh.read(_BLOB_HEADER.size))
        if sentinel != BLOB_SENTINEL:
            raise _fail(path, f"{where} is corrupt: no weight header at offset {offset}; the package is "
                              "damaged: export or convert it again")
        if data_offset + nbytes > size:
            raise _fail(path, f"{where} is truncated: the weight at offset {offset} needs bytes up to "
                              f"{data_offset + nbytes}; the package is damaged: export or convert it again")


def check_package(path: str | os.PathLike) -> Path:
    """Raise CoreMLPackageError unless ``path`` is a complete, readable Core ML package; returns the Path.

    Checks the manifest, the spec and (for ML programs) every referenced weight against the
    weight file's size. Reads headers only: cheap even for large packages.
    """
    path = Path(path)
    if not path.exists():
        raise CoreMLPackageError(f"no Core ML package at {str(path)!r}: the path does not exist", str(path))
    if not path.is_dir():
        hint = (" (a .mlmodel file is a neural-network model; quanta reads ML programs: convert with "
                "convert_to='mlprogram')" if path.suffix == ".mlmodel" else "")
        raise _fail(path, f"is a file, not a Core ML package (an .mlpackage is a folder){hint}")
    spec_path = _manifest_root(path)
    spec = _parse_spec(path, spec_path)
    if spec.WhichOneof("Type") == "mlProgram":
        _check_weights(path, spec_path, spec)
    return path
