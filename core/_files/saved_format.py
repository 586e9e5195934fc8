"""The saved-model format shared by :mod:`quanta._files.saving` (writing) and :mod:`quanta._files.loading`
(reading): file names, the format version, how a spec and a record's fields become JSON, and
``SavedModelError``. See ``docs/saving.md``."""

from __future__ import annotations

import enum

import attrs
import torch

from quanta._recipes.structure import plugin_config
from quanta.errors import QuantaError
from quanta.record import QuantizedWeight
from quanta._records.spec import QuantDtype, QuantSpec

__all__ = ["FORMAT", "FORMAT_VERSION", "CONFIG_NAME", "WEIGHTS_NAME", "INDEX_NAME", "READABLE_VERSIONS", "EXAMPLE_INPUTS_NAME",
           "DEFAULT_MAX_SHARD_BYTES", "TOKENIZER_FILES", "RECORD_SUFFIX", "TENSOR_FIELDS", "SavedModelError",
           "spec_to_json", "spec_from_json", "split_record_name", "record_tensor_fields", "dtype_name", "torch_dtype"]

FORMAT = "quanta"
#: Bumped whenever a saved directory changes in a way an older reader would misread.
FORMAT_VERSION = 2
#: Versions this quanta reads. 2 added declared transforms (``transforms``) and declared
#: parameters (``extra_state`` naming a parameter an algorithm added); a version-1 directory has neither.
READABLE_VERSIONS = (1, 2)
CONFIG_NAME = "quanta_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
EXAMPLE_INPUTS_NAME = "example_inputs.safetensors"
#: Shards above this size are split (HF's default is 5 GB).
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                    "merges.txt", "tokenizer.model", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model")
RECORD_SUFFIX = "_quanta_"


class SavedModelError(QuantaError, ValueError):
    """A saved model cannot be written or loaded as asked: another format version, a missing file,
    a tensor whose shape differs from the model's, a layer the model lacks. ``.name`` is the tensor
    or layer at fault (or None)."""

    def __init__(self, message: str, name: str | None = None):
        self.name = name
        super().__init__(f"{name!r}: {message}" if name else message)


# ----------------------------------------------------------------------------- specs and records


def spec_to_json(spec: QuantSpec) -> dict:
    out = {}
    for f in attrs.fields(QuantSpec):
        v = getattr(spec, f.name)
        if attrs.has(type(v)) and not isinstance(v, QuantDtype):
            v = attrs.asdict(v)  # a plugin's options (scheme_config, observer_config)
        elif isinstance(v, enum.Enum):
            v = v.value
        elif v is not None and not isinstance(v, (bool, int, float, str)):
            v = str(v)  # QuantDtype -> "int4"
        out[f.name] = v
    return out


def spec_from_json(data: dict, where: str) -> QuantSpec:
    fields = {f.name for f in attrs.fields(QuantSpec)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise SavedModelError(f"the saved spec has fields {unknown} this quanta does not know; "
                              "it was written by a newer quanta", where)
    kwargs = dict(data)
    try:
        for name, value in data.items():
            # Options of a plugin (``scheme_config`` of scheme ``spec.scheme``) go back through the
            # one structuring of plugin options (unknown keys refused, older versions upgraded).
            kind = name.removesuffix("_config")
            if name.endswith("_config") and isinstance(value, dict) and kind in data:
                kwargs[name] = plugin_config(kind, data[kind], value)
        return QuantSpec(**kwargs)
    except QuantaError as exc:
        raise SavedModelError(f"saved spec is invalid: {exc}", where) from None


def split_record_name(record_name: str) -> tuple[str, str]:
    module, _, param = record_name.rpartition(".")
    return module, param


#: Record fields that hold tensors; every other field is JSON.
TENSOR_FIELDS = ("codes", "scale", "zero_point", "lut")


def record_tensor_fields() -> list[str]:
    return [f.name for f in attrs.fields(QuantizedWeight) if f.name in TENSOR_FIELDS]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SavedModelError(f"unknown tensor dtype {name!r} in {CONFIG_NAME}")
    return dtype
