"""What an out-of-core run keeps between blocks: the hidden states of the calibration samples
(kept on disk beyond a memory budget) and the fingerprint that ties a checkpoint directory to its
model, recipe, calibration data, dtype and quanta version."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from quanta._files.checkpoints import CheckpointSource, safetensors_header

__all__ = ["Activations", "fingerprint", "write_json_atomic"]

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_DTYPE_OF = {v: k for k, v in _ST_DTYPES.items()}


class Activations:
    """The hidden states between blocks, one per calibration sample; beyond ``budget`` bytes they
    are kept in safetensors files under ``spill`` (memory-mapped when read back)."""

    def __init__(self, budget: int | None, spill: Path):
        self.budget, self.spill = budget, spill
        self.items: list[Any] = []
        self.in_memory = 0

    def set(self, i: int, t: torch.Tensor) -> None:
        t = t.detach().contiguous()
        nbytes = t.numel() * t.element_size()
        old = self.items[i] if i < len(self.items) else None
        if isinstance(old, torch.Tensor):
            self.in_memory -= old.numel() * old.element_size()
        if self.budget is not None and self.in_memory + nbytes > self.budget:
            from safetensors.torch import save_file

            self.spill.mkdir(parents=True, exist_ok=True)
            path = self.spill / f"sample-{i:06d}.safetensors"
            tmp = path.with_suffix(".tmp")
            save_file({"hidden": t}, str(tmp))
            os.replace(tmp, path)
            value: Any = path
        else:
            value = t
            self.in_memory += nbytes
        if i < len(self.items):
            self.items[i] = value
        else:
            self.items.append(value)

    def get(self, i: int) -> torch.Tensor:
        value = self.items[i]
        if isinstance(value, Path):
            from safetensors.torch import load_file

            return load_file(str(value))["hidden"]
        return value

    def save(self, path: Path) -> None:
        """Write every hidden state to one safetensors file (keys ``sample.<i>``), atomically, one
        sample in memory at a time (``safetensors.torch.save_file`` would copy them all first)."""
        entries, offset, shapes = {}, 0, []
        for i in range(len(self.items)):
            shape, dtype = self._shape(i)
            nbytes = math.prod(shape) * dtype.itemsize
            entries[f"sample.{i}"] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                                      "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header = json.dumps(entries, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(len(header).to_bytes(8, "little"))
            fh.write(header)
            for i in range(len(self.items)):
                t = self.get(i).contiguous()
                fh.write(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
        os.replace(tmp, path)

    def _shape(self, i: int) -> tuple[tuple[int, ...], torch.dtype]:
        value = self.items[i]
        if isinstance(value, Path):
            from safetensors import safe_open

            with safe_open(str(value), "pt") as fh:
                sl = fh.get_slice("hidden")
                return tuple(sl.get_shape()), _DTYPE_OF[sl.get_dtype()]
        return tuple(value.shape), value.dtype

    def __len__(self) -> int:
        return len(self.items)

    def nbytes(self) -> int:
        return sum(self.get(i).numel() * self.get(i).element_size() if isinstance(v, Path) else
                   v.numel() * v.element_size() for i, v in enumerate(self.items))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _recipe_bytes(config: Any) -> bytes:
    if config is None:
        return b"null"
    if isinstance(config, (str, os.PathLike)) and Path(config).is_file():
        return Path(config).read_bytes()
    if isinstance(config, dict):
        return json.dumps(config, sort_keys=True, default=repr).encode()
    return repr(config).encode()


def _data_bytes(samples: list) -> bytes:
    h = hashlib.sha256()

    def feed(v):
        if isinstance(v, torch.Tensor):
            h.update(str((tuple(v.shape), v.dtype)).encode())
            h.update(v.detach().contiguous().cpu().numpy().tobytes())
        elif isinstance(v, dict):
            for k in sorted(v):
                h.update(str(k).encode())
                feed(v[k])
        elif isinstance(v, (tuple, list)):
            for x in v:
                feed(x)
        else:
            h.update(repr(v).encode())

    for s in samples:
        feed(s)
    return h.digest()


def fingerprint(source: CheckpointSource, config: Any, samples: list, dtype: torch.dtype) -> dict:
    from quanta import __version__

    model = hashlib.sha256((source.path / "config.json").read_bytes())
    for name in sorted(set(source.weight_map.values())):
        header, nbytes = safetensors_header(source.path / name)
        model.update(name.encode() + header + str(nbytes).encode())
    return {"model": model.hexdigest(), "recipe": _sha(_recipe_bytes(config)), "data": _sha(_data_bytes(samples)),
            "quanta_version": __version__, "dtype": str(dtype)}


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)
