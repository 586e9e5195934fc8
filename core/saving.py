"""``quanta.save`` and ``quanta.load``: a quantized model as data (safetensors + JSON), no pickle.

A saved model is a directory::

    quanta_config.json                 format name and version, how to rebuild the model, and per
                                       record: spec, block sizes, axes, grid, shape, tensor names
    model.safetensors                  or model-00001-of-0000N.safetensors + model.safetensors.index.json
    config.json, tokenizer files ...   for a transformers model: an HF-style directory
    example_inputs.safetensors         when example inputs were given (exporters trace with them)

Each quantized weight is stored once: its codes packed (``quanta.packing``: int4 two a byte),
its scale and zero point (and lookup table, when the record has one) in their own dtypes, under
``<layer>.<param>_quanta_<field>``; the dequantized float weight is not stored. Every other
state-dict tensor is stored as it is. Shards are written one at a time, each holding only its
own tensors, so saving a large model never builds the whole model in one dict.
"""

from __future__ import annotations

import enum
import json
import os
import shutil
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import attrs
import torch

from .atomic import atomic_dir
from .errors import QuantaError
from .faults import fault_delay
from .packing import pack_codes, packed_nbytes, unpack_codes
from .record import QuantizedWeight, attach_record, declare_state, extra_state, records
from .spec import QuantDtype, QuantSpec

__all__ = ["save", "load", "read_config", "load_example_inputs", "unrestored_records", "saved_size_rule",
           "write_shards", "tied_tensors", "activation_quantization_sites", "tokenizer_dir_of", "copy_tokenizer_files", "transformers_config_of",
           "SavedModelError", "FORMAT", "FORMAT_VERSION", "CONFIG_NAME", "DEFAULT_MAX_SHARD_BYTES"]

FORMAT = "quanta"
#: Bumped whenever a saved directory changes in a way an older reader would misread.
FORMAT_VERSION = 1
CONFIG_NAME = "quanta_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
EXAMPLE_INPUTS_NAME = "example_inputs.safetensors"
#: Shards above this size are split (HF's default is 5 GB).
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                    "merges.txt", "tokenizer.model", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model")
_SUFFIX = "_quanta_"


class SavedModelError(QuantaError, ValueError):
    """A saved model cannot be written or loaded as asked: another format version, a missing file,
    a tensor whose shape differs from the model's, a layer the model lacks. ``.name`` is the tensor
    or layer at fault (or None)."""

    def __init__(self, message: str, name: str | None = None):
        self.name = name
        super().__init__(f"{name!r}: {message}" if name else message)


# ----------------------------------------------------------------------------- specs and records


def _spec_to_json(spec: QuantSpec) -> dict:
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


def _spec_from_json(data: dict, where: str) -> QuantSpec:
    from quanta import registry

    fields = {f.name for f in attrs.fields(QuantSpec)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise SavedModelError(f"the saved spec has fields {unknown} this quanta does not know; "
                              "it was written by a newer quanta", where)
    kwargs = dict(data)
    for name, value in data.items():
        # Options of a plugin (``scheme_config`` of scheme ``spec.scheme``) go back through its config class.
        kind = name.removesuffix("_config")
        if name.endswith("_config") and isinstance(value, dict) and kind in data:
            config_class = registry.get(kind, data[kind]).config_class
            kwargs[name] = config_class(**value) if config_class is not None else None
    try:
        return QuantSpec(**kwargs)
    except QuantaError as exc:
        raise SavedModelError(f"saved spec is invalid: {exc}", where) from None


def _split(record_name: str) -> tuple[str, str]:
    module, _, param = record_name.rpartition(".")
    return module, param


#: Record fields that hold tensors; every other field is JSON.
_TENSOR_FIELDS = ("codes", "scale", "zero_point", "lut")


def _record_tensor_fields() -> list[str]:
    return [f.name for f in attrs.fields(QuantizedWeight) if f.name in _TENSOR_FIELDS]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SavedModelError(f"unknown tensor dtype {name!r} in {CONFIG_NAME}")
    return dtype


# ----------------------------------------------------------------------------- planning what to write


@attrs.frozen
class _Item:
    """One tensor to write: its key, size in the file, and how to produce it (lazily)."""

    key: str
    nbytes: int
    produce: Callable[[], torch.Tensor]


def _record_items(name: str, rec: QuantizedWeight) -> tuple[list[_Item], dict]:
    bits = rec.spec.dtype.bits
    meta: dict[str, Any] = {"shape": list(rec.shape)}
    tensors: dict[str, Any] = {}
    items = []
    for f in attrs.fields(QuantizedWeight):
        value = getattr(rec, f.name)
        if f.name in _record_tensor_fields():
            if value is None:
                tensors[f.name] = None
                continue
            key = f"{name}{_SUFFIX}{f.name}"
            entry = {"key": key, "dtype": _dtype_name(value.dtype), "shape": list(value.shape)}
            if f.name == "codes":
                entry["packed_bits"] = bits
                entry["signed"] = bool(value.dtype.is_signed)
                t = value
                items.append(_Item(key, packed_nbytes(value.numel(), bits),
                                   lambda t=t, bits=bits, name=name: _pack(t, bits, name)))
            else:
                t = value
                items.append(_Item(key, value.numel() * value.element_size(), lambda t=t: t.detach().cpu().contiguous()))
            tensors[f.name] = entry
        elif f.name == "spec":
            meta["spec"] = _spec_to_json(value)
        elif isinstance(value, tuple):
            meta[f.name] = list(value)
        else:
            meta[f.name] = value
    meta["tensors"] = tensors
    return items, meta


def _pack(codes: torch.Tensor, bits: int, name: str) -> torch.Tensor:
    from .packing import PackingError

    try:
        return pack_codes(codes, bits)
    except PackingError as exc:
        raise SavedModelError(f"codes cannot be stored in {bits} bits: {exc}", name) from None


def _plan_items(model: torch.nn.Module) -> tuple[list[_Item], dict, dict, list[str]]:
    """(items in write order, record metadata, aliases key -> canonical key, buffer keys)."""
    recs = records(model)
    record_keys = set()
    items: list[_Item] = []
    rec_meta = {}
    for name, rec in recs.items():
        rec_items, meta = _record_items(name, rec)
        meta["param_dtype"] = _dtype_name(model.get_parameter(name).dtype)
        items += rec_items
        rec_meta[name] = meta
        record_keys.add(name)
        record_keys.update(f"{name}{_SUFFIX}{f}" for f in _record_tensor_fields())
    buffer_keys = set()
    for mname, module in model.named_modules():
        for bname, buf in module.named_buffers(recurse=False):
            if bname not in module._non_persistent_buffers_set:
                buffer_keys.add(f"{mname}.{bname}" if mname else bname)
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storage_users: dict[int, str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        t = t.detach()
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in record_keys:
            seen.setdefault(view, key)
            continue
        if t.numel() and view in seen:
            aliases[key] = seen[view]  # tied weights: stored once
            continue
        seen[view] = key
        ptr = view[0]
        shared = t.numel() > 0 and ptr in storage_users
        storage_users.setdefault(ptr, key)
        items.append(_Item(key, t.numel() * t.element_size(),
                           lambda t=t, shared=shared: (t.cpu().clone() if shared else t.cpu()).contiguous()))
    return items, rec_meta, aliases, sorted(buffer_keys)


def tied_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """Keys of ``state_dict`` that are the same tensor view as an earlier key: ``{alias: first key}``
    (tied weights, e.g. an output head sharing the embedding), so writers store them once."""
    seen: dict[tuple, str] = {}
    aliases = {}
    for key, t in state_dict.items():
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and view in seen:
            aliases[key] = seen[view]
        else:
            seen.setdefault(view, key)
    return aliases


def _shards(items: list[_Item], max_bytes: int) -> list[list[_Item]]:
    shards: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


# ----------------------------------------------------------------------------- save


def transformers_config_of(model: torch.nn.Module):
    """The model's ``transformers.PretrainedConfig`` when it is a transformers model, else None
    (transformers is not imported for that)."""
    if "transformers" not in sys.modules:
        return None
    from transformers import PretrainedConfig, PreTrainedModel

    if isinstance(model, PreTrainedModel) and isinstance(model.config, PretrainedConfig):
        return model.config
    return None


def tokenizer_dir_of(model: torch.nn.Module) -> str | None:
    """The local directory a transformers model was loaded from, when it holds tokenizer files."""
    config = transformers_config_of(model)
    source = getattr(config, "_name_or_path", "") if config is not None else ""
    if source and Path(source).is_dir() and any((Path(source) / f).is_file() for f in _TOKENIZER_FILES):
        return str(source)
    return None


def copy_tokenizer_files(source: str | os.PathLike, directory: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files found in ``source`` (tokenizer.json, vocab.txt, ...) into ``directory``."""
    source, staging = Path(source), Path(directory)
    copied = []
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, staging / name)
            copied.append(name)
    return copied


def _save_tensors_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata or {"format": "pt", "quanta_format": f"{FORMAT}/{FORMAT_VERSION}"})


def write_shards(tensors: list[tuple[str, int, Callable[[], torch.Tensor]]], directory: str | os.PathLike,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, metadata: dict | None = None) -> dict[str, str]:
    """Write tensors into ``directory`` as ``model.safetensors`` or, above ``max_shard_bytes``,
    HF-style shards ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``.

    ``tensors`` lists ``(key, nbytes, produce)``: ``produce()`` makes the tensor when its shard is
    written, so only one shard's tensors are in memory at a time. Returns key -> file name.
    """
    directory = Path(directory)
    shards = _shards([_Item(k, n, f) for k, n, f in tensors], max_shard_bytes)
    names = ([WEIGHTS_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for name, shard in zip(names, shards):
        _save_tensors_file({item.key: item.produce() for item in shard}, directory / name, metadata)
        weight_map.update({item.key: name for item in shard})
    if len(shards) > 1:
        total = sum(n for _k, n, _f in tensors)
        (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                       indent=2) + "\n")
    return weight_map


def _example_tensors(example_inputs) -> dict[str, torch.Tensor]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        pairs = [(f"kw.{k}", v) for k, v in example_inputs.items()]
    elif isinstance(example_inputs, (tuple, list)):
        pairs = [(f"arg.{i}", v) for i, v in enumerate(example_inputs)]
    else:
        raise SavedModelError(f"example_inputs must be a tensor, a tuple of tensors or a dict of tensors, "
                              f"got {type(example_inputs).__name__}", "example_inputs")
    bad = [k for k, v in pairs if not isinstance(v, torch.Tensor)]
    if bad:
        raise SavedModelError("example inputs must all be tensors", bad[0].split(".", 1)[1])
    return {k: v.detach().cpu().contiguous() for k, v in pairs}


_ACTIVATION_QUANT_FUNCTIONS = (torch.quantize_per_tensor, torch.quantize_per_channel)


def activation_quantization_sites(model: torch.nn.Module) -> list[str]:
    """Where ``model`` quantizes activations in a way its tensors do not hold: ``torch.fx`` graph
    nodes calling ``torch.quantize_per_tensor``/``_per_channel`` (quanta's calibrate/qat
    ``finalize`` bakes activation scales into the graph) and fake-quantize modules (names)."""
    from quanta.fx.fake_quant import ActivationFakeQuantize

    sites = []
    for name, module in model.named_modules():
        if isinstance(module, torch.fx.GraphModule):
            prefix = f"{name}." if name else ""
            sites += [prefix + node.name for node in module.graph.nodes
                      if node.op == "call_function" and node.target in _ACTIVATION_QUANT_FUNCTIONS]
        if isinstance(module, ActivationFakeQuantize):
            sites.append(name)
    return sites


def save(model: torch.nn.Module, path: str | os.PathLike, *, rebuild: dict | None = None, example_inputs: Any = None,
         tokenizer: Any = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> Path:
    """Save a (quantized) torch model to the directory ``path`` as safetensors + ``quanta_config.json``.

    Args:
        model: a ``torch.nn.Module``; its records (``quanta.records``) are stored as packed codes,
            scales and zero points, every other state-dict tensor as it is (tied tensors once).
        rebuild: how :func:`load` rebuilds the model when no ``model=`` is passed, e.g.
            ``{"factory": "my_pkg.models:build", "kwargs": {...}}``. A transformers model needs
            none (its ``config.json`` is written and its class recorded).
        example_inputs: a tensor, tuple or dict of tensors stored beside the weights (exporters
            trace with them; :func:`load_example_inputs` reads them back).
        tokenizer: an object with ``save_pretrained`` or a directory holding tokenizer files;
            by default a transformers model's own source directory is searched for them.
        max_shard_bytes: tensor bytes per safetensors file; above it shards and an index are written.
        overwrite: replace an existing directory that quanta did not write.

    Returns the directory written. Written atomically (``quanta.atomic.atomic_dir``).
    """
    if not isinstance(model, torch.nn.Module):
        raise SavedModelError(f"quanta.save takes a torch.nn.Module, got {type(model).__name__}")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise SavedModelError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}", "max_shard_bytes")
    sites = activation_quantization_sites(model)
    if sites:
        raise SavedModelError(
            f"the model quantizes activations ({len(sites)} sites, e.g. {sites[0]!r}) in its torch.fx graph, which "
            "a saved directory cannot hold yet (it holds tensors, not code); export it (quanta.export, e.g. "
            "coreml) or keep it with `quanta quantize --format pickle`", "model")
    if rebuild is not None and not isinstance(rebuild, dict):
        raise SavedModelError("rebuild must be a dict such as {'factory': 'pkg.module:function'}", "rebuild")
    items, rec_meta, aliases, buffer_keys = _plan_items(model)
    hf_config = transformers_config_of(model)
    if rebuild is None and hf_config is not None:
        rebuild = {"transformers": type(model).__name__}
    examples = _example_tensors(example_inputs) if example_inputs is not None else None
    from . import __version__

    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "quanta_version": __version__,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "rebuild": rebuild, "records": rec_meta, "aliases": aliases, "buffers": buffer_keys,
        "extra_state": sorted(extra_state(model)),
        "example_inputs": sorted(examples) if examples else None,
    }
    with atomic_dir(path, overwrite=overwrite) as staging:
        write_shards([(i.key, i.nbytes, i.produce) for i in items], staging, max_shard_bytes)
        if examples:
            _save_tensors_file(examples, staging / EXAMPLE_INPUTS_NAME)
        if hf_config is not None:
            hf_config.to_json_file(str(staging / "config.json"))
            generation = getattr(model, "generation_config", None)
            if generation is not None and model.can_generate():
                generation.save_pretrained(str(staging))
            if tokenizer is None:
                tokenizer = tokenizer_dir_of(model)
        if tokenizer is not None:
            if isinstance(tokenizer, (str, os.PathLike)):
                config["tokenizer_files"] = copy_tokenizer_files(tokenizer, staging)
            else:
                tokenizer.save_pretrained(str(staging))
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n")
        fault_delay("model-dir-staged")  # tests only: a signal lands while the new copy waits to be swapped in
    return Path(path)


def saved_size_rule(model: torch.nn.Module) -> int:
    """Bytes the tensors of ``model`` should take saved: packed codes + scales and zero points (and
    lookup tables) in their stored dtypes + every other state-dict tensor in its dtype (tied ones once)."""
    items, _meta, _aliases, _buffers = _plan_items(model)
    return sum(i.nbytes for i in items)


# ----------------------------------------------------------------------------- load


def read_config(path: str | os.PathLike) -> dict:
    """The ``quanta_config.json`` of a saved directory, checked for format name and version."""
    path = Path(path)
    cfg_path = path / CONFIG_NAME
    if not path.is_dir():
        raise SavedModelError(f"{str(path)!r} is not a directory saved by quanta.save")
    if not cfg_path.is_file():
        raise SavedModelError(f"{str(path)!r} has no {CONFIG_NAME}: not a model saved by quanta.save")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SavedModelError(f"cannot read {str(cfg_path)!r}: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise SavedModelError(f"{str(cfg_path)!r} is not a quanta model config (format {config.get('format')!r})")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise SavedModelError(f"{str(path)!r} uses quanta format version {version!r}; this quanta reads version "
                              f"{FORMAT_VERSION} (saved by quanta {config.get('quanta_version')})")
    return config


def _weight_files(path: Path) -> dict[str, str]:
    """tensor key -> file name."""
    from safetensors import safe_open

    if (path / INDEX_NAME).is_file():
        index = json.loads((path / INDEX_NAME).read_text())
        missing = sorted({f for f in index["weight_map"].values() if not (path / f).is_file()})
        if missing:
            raise SavedModelError(f"shard {missing[0]!r} listed in {INDEX_NAME} is missing from {str(path)!r}")
        return dict(index["weight_map"])
    if not (path / WEIGHTS_NAME).is_file():
        raise SavedModelError(f"{str(path)!r} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    with safe_open(str(path / WEIGHTS_NAME), "pt") as fh:
        return {k: WEIGHTS_NAME for k in fh.keys()}


def _rebuild(path: Path, config: dict) -> torch.nn.Module:
    rebuild = config.get("rebuild") or {}
    if "transformers" in rebuild:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers

        cls = getattr(transformers, rebuild["transformers"], None)
        if cls is None:
            raise SavedModelError(f"transformers has no class {rebuild['transformers']!r} "
                                  f"(installed transformers {transformers.__version__})", "rebuild")
        hf_config = transformers.AutoConfig.from_pretrained(str(path))
        return cls._from_config(hf_config).eval()
    if "factory" in rebuild:
        factory = rebuild["factory"]
        from .sources import import_callable

        fn = import_callable(factory, "rebuild.factory")
        model = fn(**(rebuild.get("kwargs") or {}))
        if not isinstance(model, torch.nn.Module):
            raise SavedModelError(f"{factory!r} returned a {type(model).__name__}, not a torch.nn.Module", "rebuild")
        return model.eval()
    if "example" in rebuild:
        from quanta.examples import load_example

        return load_example(rebuild["example"]).model
    raise SavedModelError(f"{str(path)!r} does not record how to rebuild its model (a {config.get('model_class')}); "
                          "pass model=<a fresh instance of that class> to quanta.load, or save it with "
                          "quanta.save(..., rebuild={'factory': 'package.module:function'}) (the CLI records it when "
                          "the recipe's model: names a function)")


def _owner(model: torch.nn.Module, key: str, what: str) -> tuple[torch.nn.Module, str]:
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        raise SavedModelError(f"the model has no layer {module_name!r} (the saved model has a {what} there); "
                              "is it the same class and configuration as the saved one?", key) from None
    return module, attr


def _set_tensor(model: torch.nn.Module, key: str, value: torch.Tensor, is_buffer: bool,
                declared: bool = False) -> None:
    module, attr = _owner(model, key, "buffer" if is_buffer else "parameter")
    if declared:
        declare_state(module, attr, value)  # state an algorithm declared: carried on as declared
    elif attr in module._parameters and module._parameters[attr] is not None:
        param = module._parameters[attr]
        if tuple(param.shape) != tuple(value.shape):
            raise SavedModelError(f"saved shape {tuple(value.shape)} differs from the model's {tuple(param.shape)}", key)
        param.data = value.to(param.device)
    elif attr in module._buffers:
        old = module._buffers[attr]
        if old is not None and tuple(old.shape) != tuple(value.shape):
            raise SavedModelError(f"saved shape {tuple(value.shape)} differs from the model's {tuple(old.shape)}", key)
        module._buffers[attr] = value.to(old.device) if old is not None else value
    elif is_buffer:
        module.register_buffer(attr, value)  # state a plugin added (extra state): restored as a buffer
    else:
        raise SavedModelError(f"the model has no parameter {attr!r} in layer {key.rpartition('.')[0]!r}", key)


def load(path: str | os.PathLike, model: torch.nn.Module | None = None, *, strict: bool = True) -> torch.nn.Module:
    """Load a directory written by :func:`save` into ``model`` (a fresh float instance of the same
    class) or, when ``model`` is None, into a model rebuilt as the directory records.

    Every record is restored exactly (codes, scale, zero point, spec, block sizes, axes) and its
    parameter set to ``record.dequantize()`` in the parameter's dtype; every other tensor is set
    to the saved one (its dtype kept); buffers the saved model had and the fresh one lacks (state a
    plugin added) are registered. Raises :class:`SavedModelError` naming the tensor or layer for a
    shape mismatch, a layer the model lacks, or (``strict``) a model tensor the file does not hold;
    and for another format version; all before the model changes. Nothing is unpickled.
    Returns the model.
    """
    from safetensors import safe_open

    path = Path(path)
    config = read_config(path)
    files = _weight_files(path)
    if model is None:
        model = _rebuild(path, config)
    elif not isinstance(model, torch.nn.Module):
        raise SavedModelError(f"model must be a torch.nn.Module, got {type(model).__name__}", "model")
    rec_meta: dict = config.get("records") or {}
    aliases: dict = config.get("aliases") or {}
    buffer_keys = set(config.get("buffers") or [])
    declared = set(config.get("extra_state") or [])
    record_keys = {v["key"] for m in rec_meta.values() for v in m["tensors"].values() if v}
    plain_keys = [k for k in files if k not in record_keys]
    with ExitStack() as stack:
        handles = {name: stack.enter_context(safe_open(str(path / name), "pt")) for name in sorted(set(files.values()))}

        def tensor(key: str) -> torch.Tensor:
            if key not in files:
                raise SavedModelError(f"tensor missing from the saved directory {str(path)!r}", key)
            return handles[files[key]].get_tensor(key)

        _check_layout(model, rec_meta, aliases, buffer_keys, record_keys, plain_keys,
                      lambda key: tuple(handles[files[key]].get_slice(key).get_shape()), strict)
        for key in plain_keys:
            _set_tensor(model, key, tensor(key), key in buffer_keys, key in declared)
        for name, meta in rec_meta.items():
            rec = _read_record(name, meta, tensor)
            module, param = _owner(model, name, "quantized weight")
            weight = getattr(module, param)
            dtype = _torch_dtype(meta.get("param_dtype", _dtype_name(weight.dtype)))
            if weight.dtype != dtype:  # the saved model's float type, not the fresh model's default
                weight.data = torch.zeros((), dtype=dtype, device=weight.device).expand(weight.shape)
            attach_record(module, param, rec.to(weight.device))  # records live where their layer does
    if aliases:
        state = model.state_dict(keep_vars=True)
        for alias, canonical in aliases.items():
            _set_tensor(model, alias, state[canonical].detach(), alias in buffer_keys)
    return model


def _check_layout(model, rec_meta, aliases, buffer_keys, record_keys, plain_keys, saved_shape, strict) -> None:
    """Raise SavedModelError for the first mismatch between the saved directory and ``model``."""
    state = model.state_dict(keep_vars=True)
    for name, meta in rec_meta.items():
        if name not in state:
            module_name, param = _split(name)
            _owner(model, name, "quantized weight")
            raise SavedModelError(f"the model's layer {module_name!r} has no parameter {param!r} "
                                  "(the saved model quantized it)", name)
        if tuple(state[name].shape) != tuple(meta["shape"]):
            raise SavedModelError(f"saved quantized weight has shape {tuple(meta['shape'])}, the model's "
                                  f"{tuple(state[name].shape)}", name)
    for key in plain_keys:
        if key in state:
            shape = saved_shape(key)
            if tuple(state[key].shape) != shape:
                raise SavedModelError(f"saved shape {shape} differs from the model's {tuple(state[key].shape)}", key)
        elif key in buffer_keys:
            _owner(model, key, "buffer")
        else:
            _owner(model, key, "tensor")
            raise SavedModelError("the model has no such parameter or buffer", key)
    for alias in aliases:
        if alias not in state:
            _owner(model, alias, "tied tensor")
    if strict:
        restored = set(plain_keys) | set(rec_meta) | set(aliases) | record_keys
        missing = [k for k in state if k not in restored and _SUFFIX not in k]
        if missing:
            raise SavedModelError(f"{len(missing)} tensors of the model are not in the saved directory "
                                  f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); "
                                  "is it the same class and configuration? (strict=False leaves them as they are)",
                                  missing[0])


#: Keys of a record's entry in quanta_config.json that are not QuantizedWeight fields.
_RECORD_META = ("shape", "tensors", "param_dtype")


def _read_record(name: str, meta: dict, tensor: Callable[[str], torch.Tensor]) -> QuantizedWeight:
    fields = {f.name for f in attrs.fields(QuantizedWeight)}
    kwargs: dict[str, Any] = {}
    tensors = meta.get("tensors") or {}
    unknown = sorted((set(meta) - set(_RECORD_META) | set(tensors)) - fields)
    if unknown:
        raise SavedModelError(f"record fields {unknown} are unknown to this quanta (saved by a newer one)", name)
    for field, entry in tensors.items():
        if entry is None:
            kwargs[field] = None
            continue
        value = tensor(entry["key"])
        shape = tuple(entry["shape"])
        if "packed_bits" in entry:
            value = unpack_codes(value, int(entry["packed_bits"]), shape, bool(entry["signed"]))
        elif tuple(value.shape) != shape:
            raise SavedModelError(f"stored {field} has shape {tuple(value.shape)}, {CONFIG_NAME} says {shape}", name)
        kwargs[field] = value.to(_torch_dtype(entry["dtype"]))
    for field, value in meta.items():
        if field in _RECORD_META:
            continue
        if field == "spec":
            kwargs["spec"] = _spec_from_json(value, name)
        elif isinstance(value, list):
            kwargs[field] = tuple(value)
        else:
            kwargs[field] = value
    return QuantizedWeight(**kwargs)


def load_example_inputs(path: str | os.PathLike) -> tuple | dict | None:
    """The example inputs saved with a model (a tuple, or a dict for keyword inputs), or None."""
    from safetensors.torch import load_file

    file = Path(path) / EXAMPLE_INPUTS_NAME
    if not file.is_file():
        return None
    tensors = load_file(str(file))
    if any(k.startswith("kw.") for k in tensors):
        return {k[3:]: v for k, v in tensors.items()}
    return tuple(tensors[f"arg.{i}"] for i in range(len(tensors)))


def unrestored_records(model: torch.nn.Module, state_dict: dict) -> list[str]:
    """Records in ``state_dict`` (a quantized model's) that ``model`` does not hold: the records a
    plain ``model.load_state_dict(state_dict, strict=False)`` drops. Use :func:`load` instead."""
    have = set(records(model))
    found = sorted({k[: k.rindex(_SUFFIX)] for k in state_dict if k.endswith(_SUFFIX + "codes")})
    return [name for name in found if name not in have]
