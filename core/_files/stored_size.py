"""The size of a model as stored: every file of what was written, with the quantized and float weights apart.

A run's report counts the quantized layers only (their fp16 size before, codes and scales after);
what a user sees on disk also holds the weights left in float (embeddings, norms, biases), the
metadata and, for a transformers model, its config and tokenizer. :func:`stored_size` adds up the
files themselves, so its ``total`` is the size on disk (the sum of the file sizes), and splits it
into quantized weights, float weights and the rest by reading the safetensors headers (no tensor
is loaded). Exporters split their own formats (``Exporter.stored_size``; the coreml exporter
reads the package's spec).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import attrs

from quanta._files.saved_format import EXAMPLE_INPUTS_NAME, RECORD_SUFFIX

__all__ = ["StoredSize", "stored_size", "files_size", "safetensors_parts"]


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


@attrs.frozen(kw_only=True)
class StoredSize:
    """What ``path`` holds, in bytes: ``total`` is the sum of its files' sizes; ``quantized`` the
    quantized weights (codes, scales, zero points), ``float`` the weights and buffers stored as they
    are; ``other`` (the rest) headers, metadata, tokenizer files, example inputs. A format whose
    parts are not known has ``quantized = float = 0``."""

    path: str
    total: int
    quantized: int = 0
    float: int = 0

    @property
    def other(self) -> int:
        """Bytes that are neither quantized nor float weights (``total - quantized - float``)."""
        return self.total - self.quantized - self.float

    def describe(self) -> str:
        """One line: ``"52.13 MiB on disk: quantized weights 5.77 MiB, float weights 46.30 MiB, other 0.06 MiB"``."""
        if not self.quantized and not self.float:
            return f"{_mib(self.total)} on disk"
        return (f"{_mib(self.total)} on disk: quantized weights {_mib(self.quantized)}, float weights "
                f"{_mib(self.float)}, other {_mib(self.other)}")


def files_size(path: str | os.PathLike) -> int:
    """The sum of the sizes of the files at ``path`` (a file, or every file under a folder; links
    are not followed)."""
    path = Path(path)
    if not path.is_dir():
        return path.stat().st_size
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            total += st.st_size
    return total


def safetensors_parts(path: str | os.PathLike) -> dict[str, int]:
    """``{tensor name: data bytes}`` of the safetensors file at ``path``, from its header alone."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    return {name: int(entry["data_offsets"][1]) - int(entry["data_offsets"][0])
            for name, entry in header.items() if name != "__metadata__"}


def stored_size(path: str | os.PathLike) -> StoredSize:
    """The :class:`StoredSize` of ``path``: a folder written by ``quanta.save`` (its model
    safetensors split into quantized and float weights), a ``torch.save`` file or any other file
    or folder (total only). ``total`` always equals the sum of the file sizes."""
    path = Path(path)
    total = files_size(path)
    quantized = floats = 0
    if path.is_dir():
        for file in sorted(path.glob("*.safetensors")):
            if file.name == EXAMPLE_INPUTS_NAME:
                continue
            for name, nbytes in safetensors_parts(file).items():
                if RECORD_SUFFIX in name:
                    quantized += nbytes
                else:
                    floats += nbytes
    return StoredSize(path=str(path), total=total, quantized=quantized, float=floats)
