"""A transformers checkpoint directory read lazily: its config, which file holds each tensor, a
model skeleton with its parameters on the ``meta`` device, and one part of it filled at a time
from its safetensors files by plain reads (the out-of-core run in :mod:`quanta._run.out_of_core` uses it)."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import attrs
import torch
from torch import nn

from quanta._files.saved_format import INDEX_NAME
from quanta.errors import ModelError

__all__ = ["CheckpointSource", "CheckpointTensors", "open_checkpoint", "safetensors_header", "params_on_meta",
           "materialize", "release", "meta_left", "blocks_of"]


@attrs.frozen
class CheckpointSource:
    """A transformers checkpoint directory: its config, model class and which file holds each tensor."""

    path: Path
    hf_config: Any
    model_class: type
    weight_map: dict  # tensor key -> file name (inside ``path``)

    def tensor_bytes(self) -> int:
        """Bytes of every tensor in the checkpoint's safetensors files (from their headers)."""
        total = 0
        for name in sorted(set(self.weight_map.values())):
            total += safetensors_header(self.path / name)[1]
        return total


def safetensors_header(file: Path) -> tuple[bytes, int]:
    """A safetensors file's JSON header bytes and the tensor bytes it describes."""
    with open(file, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if size <= 0 or size > 100_000_000:
            raise ModelError(f"{str(file)!r} is not a safetensors file (header size {size})")
        header = fh.read(size)
    try:
        entries = json.loads(header)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{str(file)!r} has an unreadable safetensors header: {exc}") from None
    nbytes = sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in entries.items() if k != "__metadata__")
    return header, nbytes


def _inside(root: Path, name: str, what: str) -> Path:
    """``root / name``, refused when it would leave ``root`` (absolute, ``..``, a link out of it)."""
    path = (root / name)
    resolved = path.resolve()
    if os.path.isabs(name) or not resolved.is_relative_to(root.resolve()):
        raise ModelError(f"{what} {name!r} in {str(root)!r} points outside the checkpoint directory")
    return path


def open_checkpoint(path: str | os.PathLike) -> CheckpointSource:
    """Read a transformers checkpoint directory's ``config.json`` and safetensors index, without weights.

    Only architectures transformers itself implements are built (``trust_remote_code=False``): a
    checkpoint whose config names its own code (``auto_map``) is refused.
    """
    root = Path(path)
    if not (root / "config.json").is_file():
        raise ModelError(f"{str(root)!r} is not a transformers checkpoint directory (no config.json)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is in the examples extra
        raise ModelError("out-of-core quantization reads transformers checkpoints: pip install transformers") from None
    from quanta._files.untrusted import check_tree, read_json

    def error(message: str, name: str | None = None) -> ModelError:
        return ModelError(message)

    check_tree(root, "checkpoint directory", error)  # no link out of it (docs/security.md)
    raw = read_json(root / "config.json", "config.json", error)  # bounded, no key twice
    if isinstance(raw, dict) and raw.get("auto_map"):
        raise ModelError(f"{str(root)!r} names its own model code (config.json auto_map); quanta builds only "
                         "architectures transformers implements, and runs no code a checkpoint ships")
    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(root), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{str(root)!r}: transformers cannot read its config.json: {exc}") from None
    arch = (getattr(hf_config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ModelError(f"{str(root)!r}: config.json names architecture {arch!r}, which transformers "
                         f"{transformers.__version__} does not have")
    if (root / INDEX_NAME).is_file():
        index = read_json(root / INDEX_NAME, INDEX_NAME, error)
        weight_map = dict((index.get("weight_map") if isinstance(index, dict) else None) or {})
    elif (root / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(root / "model.safetensors"), "pt") as fh:
            weight_map = {k: "model.safetensors" for k in fh.keys()}
    else:
        raise ModelError(f"{str(root)!r} has no model.safetensors or {INDEX_NAME} (out-of-core reads safetensors)")
    for name in set(weight_map.values()):
        if not _inside(root, name, "shard").is_file():
            raise ModelError(f"shard {name!r} listed in {INDEX_NAME} is missing from {str(root)!r}")
    return CheckpointSource(root, hf_config, cls, weight_map)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class CheckpointTensors:
    """Reads of a checkpoint's tensors with plain file reads into fresh tensors (no memory map: a
    mapped page read stays in the process's resident memory as long as the file is mapped, on
    top of the copy). Files are opened for one :meth:`reading` block and closed after it."""

    def __init__(self, source: CheckpointSource, dtype: torch.dtype):
        self.source, self.dtype = source, dtype
        self._handles: dict[str, Any] | None = None
        self._headers: dict[str, tuple[dict, int]] = {}

    @contextlib.contextmanager
    def reading(self) -> Iterator["CheckpointTensors"]:
        self._handles = {}
        try:
            yield self
        finally:
            handles, self._handles = self._handles, None
            for fh in handles.values():
                fh.close()

    def _entry(self, name: str, key: str) -> tuple[dict, int]:
        if name not in self._headers:
            header, _ = safetensors_header(self.source.path / name)
            self._headers[name] = (json.loads(header), 8 + len(header))
        entries, base = self._headers[name]
        if key not in entries:
            raise ModelError(f"checkpoint shard {name!r} lacks tensor {key!r} its index lists")
        return entries[key], base

    def _locate(self, key: str) -> tuple[Any, int, torch.dtype, tuple[int, ...]]:
        """(open file, offset of the tensor's first byte, stored dtype, shape) of tensor ``key``."""
        if self._handles is None:
            raise RuntimeError("CheckpointTensors read outside reading()")
        name = self.source.weight_map[key]
        entry, base = self._entry(name, key)
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise ModelError(f"checkpoint tensor {key!r} in {name!r} has dtype {entry.get('dtype')!r}, which "
                             f"quanta does not read (allowed: {', '.join(_DTYPES)})")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ModelError(f"checkpoint tensor {key!r} in {name!r}: {end - begin} bytes for shape {shape}")
        if name not in self._handles:
            self._handles[name] = open(self.source.path / name, "rb", buffering=0)
        return self._handles[name], base + begin, dtype, shape

    def _read(self, fh: Any, offset: int, nbytes: int, key: str) -> torch.Tensor:
        raw = torch.empty(nbytes, dtype=torch.uint8)
        fh.seek(offset)
        view, done = memoryview(raw.numpy()), 0
        while done < nbytes:
            n = fh.readinto(view[done:])
            if not n:
                raise ModelError(f"checkpoint file {fh.name!r} ends inside tensor {key!r}")
            done += n
        return raw

    def _compute(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if t.is_floating_point() else t

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key`` (floating point ones in the compute dtype), in memory of its own."""
        fh, offset, dtype, shape = self._locate(key)
        raw = self._read(fh, offset, math.prod(shape) * dtype.itemsize, key)
        return self._compute(raw.view(dtype).reshape(shape))

    def get_rows(self, key: str, rows: list[int]) -> torch.Tensor:
        """Tensor ``key`` with only ``rows`` (indices of its first dimension) read. The other rows
        are left unwritten, so a large tensor's memory for them is never touched (an embedding's
        rows that no calibration token looks up cost no resident memory)."""
        fh, offset, dtype, shape = self._locate(key)
        out = torch.empty(shape, dtype=self.dtype if dtype.is_floating_point else dtype)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        ids = sorted(set(rows))
        if ids and not (0 <= ids[0] and ids[-1] < shape[0]):
            raise ModelError(f"rows {ids[0]}..{ids[-1]} of checkpoint tensor {key!r} of shape {shape}")
        i = 0
        while i < len(ids):
            j = i
            while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
                j += 1
            raw = self._read(fh, offset + ids[i] * row_bytes, (j - i + 1) * row_bytes, key)
            out[ids[i]:ids[j] + 1] = self._compute(raw.view(dtype).reshape(j - i + 1, *shape[1:]))
            i = j + 1
        return out


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Parameters created inside go to the ``meta`` device; buffers stay real (they are computed)."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def materialize(module: nn.Module, prefix: str, tensors: CheckpointTensors) -> None:
    """Fill ``module``'s meta parameters (and stored buffers) from the checkpoint, keys ``prefix + name``."""
    with tensors.reading():
        _fill(module, prefix, tensors)
    if hasattr(module, "tie_weights"):
        module.tie_weights()


def release(module: nn.Module) -> None:
    """Put ``module``'s parameters back on the ``meta`` device (their memory is freed)."""
    for sub in module.modules():
        for pname, param in list(sub._parameters.items()):
            if param is not None and param.device.type != "meta":
                sub._parameters[pname] = nn.Parameter(param.detach().to("meta"), requires_grad=False)
    if hasattr(module, "tie_weights"):
        module.tie_weights()


def _fill(module: nn.Module, prefix: str, tensors: CheckpointTensors) -> None:
    for mname, sub in module.named_modules():
        base = f"{prefix}{mname}." if mname else prefix
        for pname, param in list(sub._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            key = base + pname
            if key not in tensors.source.weight_map:
                continue  # a tied weight, filled by tie_weights
            value = tensors.get(key)
            if tuple(value.shape) != tuple(param.shape):
                raise ModelError(f"checkpoint tensor {key!r} has shape {tuple(value.shape)}, the model "
                                 f"expects {tuple(param.shape)}")
            sub._parameters[pname] = nn.Parameter(value, requires_grad=False)
        for bname, buf in list(sub._buffers.items()):
            key = base + bname
            if buf is not None and key in tensors.source.weight_map and bname not in sub._non_persistent_buffers_set:
                sub._buffers[bname] = tensors.get(key).to(buf.dtype)


def meta_left(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.device.type == "meta"]


def blocks_of(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The largest ``nn.ModuleList`` (by parameter count): the blocks processed one at a time
    (the rule the ``gptq`` algorithm uses on a model in memory)."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) >= 2]
    if not lists:
        raise ModelError(f"{type(model).__name__} has no list of blocks (an nn.ModuleList of layers) to process "
                         "one at a time; quantize it in memory instead")
    return max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
