"""``quanta.save``: a quantized model as data (safetensors + JSON), no pickle. Reading it back is
:mod:`quanta._files.loading` (``quanta.load``); the format's names and JSON forms are :mod:`quanta._files.saved_format`.

A saved model is a directory::

    quanta_config.json                 format name and version, how to rebuild the model, and per
                                       record: spec, block sizes, axes, grid, shape, tensor names
    model.safetensors                  or model-00001-of-0000N.safetensors + model.safetensors.index.json
    config.json, tokenizer files ...   for a transformers model: an HF-style directory
    example_inputs.safetensors         when example inputs were given (exporters trace with them)

Each quantized weight is stored once: its codes packed (``quanta._records.packing``: int4 two a byte),
its scale and zero point (and lookup table, when the record has one) in their own dtypes, under
``<layer>.<param>_quanta_<field>``; the dequantized float weight is not stored. Every other
state-dict tensor is stored as it is. Shards are written one at a time, each holding only its
own tensors, so saving a large model never builds the whole model in one dict.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import attrs
import torch

from quanta._files.atomic import atomic_dir
from quanta._files.faults import fault_delay
from quanta._files.loading import load, load_example_inputs, read_config, unrestored_records
from quanta._records.packing import pack_codes, packed_nbytes
from quanta.record import QuantizedWeight, extra_state, records, transforms, undeclared_hooks
from quanta._files.saved_format import (CONFIG_NAME, DEFAULT_MAX_SHARD_BYTES, EXAMPLE_INPUTS_NAME, FORMAT, FORMAT_VERSION,
                           INDEX_NAME, RECORD_SUFFIX, TOKENIZER_FILES, WEIGHTS_NAME, SavedModelError, dtype_name,
                           record_tensor_fields, spec_to_json)

# ``load`` and its helpers are re-exported: ``quanta._files.saving`` is the one module a caller needs.
__all__ = ["save", "check_carriable", "load", "read_config", "load_example_inputs", "unrestored_records", "saved_size_rule",
           "write_shards", "tied_tensors", "activation_quantization_sites", "tokenizer_dir_of", "copy_tokenizer_files",
           "transformers_config_of", "SavedModelError", "FORMAT", "FORMAT_VERSION", "CONFIG_NAME",
           "DEFAULT_MAX_SHARD_BYTES"]


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
        if f.name in record_tensor_fields():
            if value is None:
                tensors[f.name] = None
                continue
            key = f"{name}{RECORD_SUFFIX}{f.name}"
            entry = {"key": key, "dtype": dtype_name(value.dtype), "shape": list(value.shape)}
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
            meta["spec"] = spec_to_json(value)
        elif isinstance(value, tuple):
            meta[f.name] = list(value)
        else:
            meta[f.name] = value
    meta["tensors"] = tensors
    return items, meta


def _pack(codes: torch.Tensor, bits: int, name: str) -> torch.Tensor:
    from quanta._records.packing import PackingError

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
        meta["param_dtype"] = dtype_name(model.get_parameter(name).dtype)
        items += rec_items
        rec_meta[name] = meta
        record_keys.add(name)
        record_keys.update(f"{name}{RECORD_SUFFIX}{f}" for f in record_tensor_fields())
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
    if source and Path(source).is_dir() and any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
        return str(source)
    return None


def copy_tokenizer_files(source: str | os.PathLike, directory: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files found in ``source`` (tokenizer.json, vocab.txt, ...) into ``directory``.

    A file that is a symlink leading out of ``source`` is refused (SavedModelError naming it), so a
    link to a private file is never copied into a model that is then published."""
    from quanta._files.untrusted import inside

    source, staging = Path(source), Path(directory)
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            inside(source, name, "tokenizer file", SavedModelError)
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
    ``finalize`` bakes activation scales into the graph) and modules that declare
    ``quantizes_activations = True`` (``quanta.fx``'s activation fake-quantizers), by name."""
    sites = []
    for name, module in model.named_modules():
        if isinstance(module, torch.fx.GraphModule):
            prefix = f"{name}." if name else ""
            sites += [prefix + node.name for node in module.graph.nodes
                      if node.op == "call_function" and node.target in _ACTIVATION_QUANT_FUNCTIONS]
        if getattr(type(module), "quantizes_activations", False) is True:
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

    Returns the directory written. Written atomically (``quanta._files.atomic.atomic_dir``).
    """
    if not isinstance(model, torch.nn.Module):
        return _save_through_backend(model, path, overwrite=overwrite, rebuild=rebuild, example_inputs=example_inputs,
                                     tokenizer=tokenizer)
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise SavedModelError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}", "max_shard_bytes")
    sites = activation_quantization_sites(model)
    if sites:
        raise SavedModelError(
            f"the model quantizes activations ({len(sites)} sites, e.g. {sites[0]!r}) in its torch.fx graph, which "
            "a saved directory cannot hold yet (it holds tensors, not code); export it (quanta.export, e.g. "
            "coreml) or keep it with `quanta quantize --format pickle`", "model")
    check_carriable(model)
    if rebuild is not None and not isinstance(rebuild, dict):
        raise SavedModelError("rebuild must be a dict such as {'factory': 'pkg.module:function'}", "rebuild")
    items, rec_meta, aliases, buffer_keys = _plan_items(model)
    hf_config = transformers_config_of(model)
    if rebuild is None and hf_config is not None:
        rebuild = {"transformers": type(model).__name__}
    examples = _example_tensors(example_inputs) if example_inputs is not None else None
    from quanta import __version__

    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "quanta_version": __version__,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "rebuild": rebuild, "records": rec_meta, "aliases": aliases, "buffers": buffer_keys,
        "extra_state": sorted(extra_state(model)),
        "transforms": {name: [list(t) for t in entries] for name, entries in transforms(model).items()},
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


def _save_through_backend(model: Any, path, *, overwrite: bool, **options) -> Path:
    """``quanta.save`` of a model that is not a torch module: its backend's ``save`` (a backend
    that cannot save says so, naming itself)."""
    from quanta.registry.guard import plugin_code
    from quanta.registry.lookup import backend_for
    from quanta.errors import ConfigError

    try:
        backend = backend_for(model).obj
    except ConfigError as exc:
        raise SavedModelError(f"quanta.save takes a torch.nn.Module or a model a backend accepts: {exc}", "model") from None
    given = {k: v for k, v in options.items() if v is not None}
    with plugin_code(backend):
        written = backend.save(model, path, overwrite=overwrite, **given)
    return Path(written if written is not None else path)


def check_carriable(model: torch.nn.Module) -> None:
    """Refuse, before anything is written, what a saved directory cannot carry: a forward or
    backward hook that is not a declared transform (``quanta.record.declare_transform``). A
    directory holds data, not code, so such a hook would be silently lost and the loaded model
    would compute something else. Raises :class:`SavedModelError` naming the module and the hook."""
    hooks = undeclared_hooks(model)
    if hooks:
        module, kind, hook = hooks[0]
        more = f" (and {len(hooks) - 1} more)" if len(hooks) > 1 else ""
        raise SavedModelError(
            f"module {module!r} has a {kind} {hook!r}{more} that is not a declared transform: a saved directory "
            "holds data, not code, so the loaded model would compute without it. An algorithm declares what it "
            "adds to the forward pass with context.add_transform(model, module, kind, name, value) "
            "(quanta.record.TRANSFORMS); remove calibration hooks when done (docs/plugins.md)", module)


def saved_size_rule(model: torch.nn.Module) -> int:
    """Bytes the tensors of ``model`` should take saved: packed codes + scales and zero points (and
    lookup tables) in their stored dtypes + every other state-dict tensor in its dtype (tied ones once)."""
    items, _meta, _aliases, _buffers = _plan_items(model)
    return sum(i.nbytes for i in items)


# ----------------------------------------------------------------------------- load


