"""``quanta.load``: read a directory written by ``quanta.save`` back into a model, exactly, without
pickle (the format: :mod:`quanta._files.saved_format`; ``docs/saving.md``)."""

from __future__ import annotations

import contextlib
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import attrs
import torch

from quanta._records.packing import unpack_codes
from quanta.record import QuantizedWeight, attach_record, declare_state, records
from quanta._files.saved_format import (CONFIG_NAME, EXAMPLE_INPUTS_NAME, FORMAT, INDEX_NAME, READABLE_VERSIONS, RECORD_SUFFIX,
                           WEIGHTS_NAME, SavedModelError, dtype_name, spec_from_json, split_record_name, torch_dtype)
from quanta._files.rebuilding import rebuild_model
from quanta._files.saved_checks import check_metadata, check_record, check_shards, check_tie_values, check_ties
from quanta._files.untrusted import check_tree, inside, read_json

__all__ = ["load", "read_config", "load_example_inputs", "unrestored_records"]


def read_config(path: str | os.PathLike) -> dict:
    """The ``quanta_config.json`` of a saved directory, checked for format name and version."""
    path = Path(path)
    cfg_path = path / CONFIG_NAME
    if not path.is_dir():
        raise SavedModelError(f"{str(path)!r} is not a directory saved by quanta.save")
    if not cfg_path.is_file():
        raise SavedModelError(f"{str(path)!r} has no {CONFIG_NAME}: not a model saved by quanta.save")
    config = read_json(inside(path, CONFIG_NAME, "file", SavedModelError), CONFIG_NAME, SavedModelError)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise SavedModelError(f"{str(cfg_path)!r} is not a quanta model config (format {found!r})")
    version = config.get("format_version")
    if version not in READABLE_VERSIONS:
        raise SavedModelError(f"{str(path)!r} uses quanta format version {version!r}; this quanta reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))} (saved by quanta {config.get('quanta_version')})")
    return config


def _weight_files(path: Path) -> dict[str, str]:
    """tensor key -> file name; every file inside ``path``, every tensor in one file only."""
    if (path / INDEX_NAME).is_file():
        index = read_json(inside(path, INDEX_NAME, "file", SavedModelError), INDEX_NAME, SavedModelError)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise SavedModelError(f"{INDEX_NAME} in {str(path)!r} has no 'weight_map' object of tensor -> file name")
        for name in sorted(set(weight_map.values())):
            inside(path, name, f"shard listed in {INDEX_NAME}", SavedModelError)
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise SavedModelError(f"shard {missing[0]!r} listed in {INDEX_NAME} is missing from {str(path)!r}")
        check_shards({name: _tensor_keys(path, name) for name in sorted(set(weight_map.values()))})
        return dict(weight_map)
    if not (path / WEIGHTS_NAME).is_file():
        raise SavedModelError(f"{str(path)!r} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    inside(path, WEIGHTS_NAME, "file", SavedModelError)
    return {k: WEIGHTS_NAME for k in _tensor_keys(path, WEIGHTS_NAME)}


def _tensor_keys(path: Path, name: str) -> list[str]:
    """The tensor names in the header of the safetensors file ``name`` (safetensors checks every
    shape and offset against the file's size; nothing is read past the header)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path / name), "pt") as fh:
            return list(fh.keys())
    except (SafetensorError, OSError) as exc:
        raise SavedModelError(f"{name!r} in {str(path)!r} is not a readable safetensors file: {exc}", name) from None


def _rebuild_empty(path, config, factory, trust_remote_code) -> torch.nn.Module:
    """:func:`rebuild_model`, a transformers class built with its parameters on the meta device
    (see :func:`_parameters_on_meta`); other rebuilds as they are."""
    rebuild = config.get("rebuild") or {}
    empty = factory is None and isinstance(rebuild, dict) and "transformers" in rebuild
    if not empty:
        return rebuild_model(path, config, factory=factory, trust_remote_code=trust_remote_code)
    with _parameters_on_meta():  # no random init
        model = rebuild_model(path, config, factory=factory, trust_remote_code=trust_remote_code)
        if callable(getattr(model, "tie_weights", None)):
            model.tie_weights()  # init_weights, skipped, also ties (lm_head to the embedding)
    return model


@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with their parameters on the meta device (no memory, no random init) and
    their buffers where they would be (non-persistent buffers such as rotary frequencies are
    computed, not saved). :func:`_materialize` then gives the parameters real, uninitialised
    memory for the file's values to replace."""
    from quanta._files.checkpoints import params_on_meta

    with params_on_meta(), _transformers_no_init():
        yield


def _transformers_no_init():
    """transformers' own switch that skips ``init_weights`` (which would still walk every meta
    parameter), or nothing where this transformers has none."""
    import sys

    init = sys.modules.get("transformers.initialization")
    no_init = getattr(init, "no_init_weights", None)
    return no_init() if no_init is not None else contextlib.nullcontext()


def _materialize(model: torch.nn.Module) -> None:
    """Replace every meta parameter of ``model`` by an uninitialised CPU one (tied parameters
    stay tied). ``torch.empty`` reserves memory without touching it: the load's values then
    replace it, so building the model costs no pass over its weights."""
    made: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.is_meta:
                if id(param) not in made:
                    made[id(param)] = torch.nn.Parameter(torch.empty_like(param, device="cpu"),
                                                         requires_grad=param.requires_grad)
                module._parameters[name] = made[id(param)]


def _unrestored_parameters(model: torch.nn.Module, restored: set[str]) -> list[str]:
    """Parameters of ``model`` no saved tensor will fill (only with ``strict=False``)."""
    return [k for k, _ in model.named_parameters(remove_duplicate=False) if k not in restored]


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


def load(path: str | os.PathLike, model: torch.nn.Module | None = None, *, strict: bool = True,
         factory: Any = None, trust_remote_code: bool = False) -> torch.nn.Module:
    """Load a directory written by :func:`save` into ``model`` (a fresh float instance of the same
    class) or, when ``model`` is None, into a model built by ``factory`` (a function, or
    ``"module:function"``; called with the kwargs the directory records when it names the same
    function) or rebuilt as the directory records: a built-in example or a transformers
    architecture (``trust_remote_code=False``). A factory the directory records is never run
    unless ``trust_remote_code=True`` (which prints what it runs); without it the error names the
    factory so that you can pass it yourself. See ``docs/security.md``.

    Every record is restored exactly (codes, scale, zero point, spec, block sizes, axes) and its
    parameter set to ``record.dequantize()`` in the parameter's dtype; every other tensor is set
    to the saved one (its dtype kept); buffers the saved model had and the fresh one lacks (state a
    plugin added) are registered. Raises :class:`SavedModelError` naming the tensor or layer for a
    shape mismatch, a layer the model lacks, or (``strict``) a model tensor the file does not hold;
    and for another format version; all before the model changes. Nothing is unpickled, and
    nothing outside ``path`` is read (a symlink, absolute or ``..`` name leading out is refused).
    A directory quanta.save could not have written (non-finite scales, codes outside the spec's
    range, a ``lut`` grid without a table, a tensor named twice, inconsistent tied weights) is a
    SavedModelError naming the tensor. Returns the model.
    """
    from safetensors import safe_open

    path = Path(path)
    config = read_config(path)
    check_tree(path, "saved directory", SavedModelError)
    files = _weight_files(path)
    check_metadata(config, files)
    rebuilt = model is None
    if rebuilt:
        model = _rebuild_empty(path, config, factory, trust_remote_code)
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

        _check_layout(model, rec_meta, aliases, buffer_keys | declared, record_keys, plain_keys,
                      lambda key: tuple(handles[files[key]].get_slice(key).get_shape()), strict)
        if rebuilt and any(p.is_meta for p in model.parameters()):
            if _unrestored_parameters(model, set(plain_keys) | set(rec_meta) | set(aliases)):
                # strict=False: what the file lacks keeps its init
                model = rebuild_model(path, config, factory=factory, trust_remote_code=trust_remote_code)
            else:
                _materialize(model)
        recs = _read_records(model, rec_meta, plain_keys, tensor)  # all checked before the model changes
        saved_transforms = _check_transforms(model, config.get("transforms") or {}, declared)
        for key in plain_keys:
            _set_tensor(model, key, tensor(key), key in buffer_keys, key in declared)
        for name, meta in rec_meta.items():
            rec = recs[name]
            module, param = _owner(model, name, "quantized weight")
            weight = getattr(module, param)
            dtype = torch_dtype(meta.get("param_dtype", dtype_name(weight.dtype)))
            if weight.dtype != dtype:  # the saved model's float type, not the fresh model's default
                weight.data = torch.zeros((), dtype=dtype, device=weight.device).expand(weight.shape)
            attach_record(module, param, rec.to(weight.device))  # records live where their layer does
    if aliases:
        state = model.state_dict(keep_vars=True)
        for alias, canonical in aliases.items():
            _set_tensor(model, alias, state[canonical].detach(), alias in buffer_keys)
    _restore_transforms(model, saved_transforms)
    return model


def _check_transforms(model: torch.nn.Module, saved: dict, declared: set) -> list[tuple[torch.nn.Module, str, str]]:
    """The declared transforms of a saved directory, checked against ``model`` before it changes:
    ``[(module, kind, state)]``. Raises SavedModelError naming the module for an unknown kind, a
    missing layer or a state the directory does not declare."""
    from quanta.record import TRANSFORMS

    out = []
    if not isinstance(saved, dict):
        raise SavedModelError(f"'transforms' in {CONFIG_NAME} must map module names to lists", "transforms")
    for module_name, entries in saved.items():
        module, _ = _owner(model, f"{module_name}.x" if module_name else "x", "declared transform")
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in TRANSFORMS):
                raise SavedModelError(f"unknown transform {entry!r} (this quanta knows: {', '.join(TRANSFORMS)}; "
                                      "saved by a newer quanta?)", module_name)
            kind, state = entry
            key = f"{module_name}.{state}" if module_name else state
            if key not in declared:
                raise SavedModelError(f"transform {kind!r} uses state {state!r}, which the directory does not "
                                      "declare", module_name)
            out.append((module, kind, state))
    return out


def _restore_transforms(model: torch.nn.Module, saved: list[tuple[torch.nn.Module, str, str]]) -> None:
    """Register the declared transforms again (their states are already restored and declared)."""
    from quanta.record import declare_transform

    for module, kind, state in saved:
        declare_transform(module, kind, state)


def _check_layout(model, rec_meta, aliases, buffer_keys, record_keys, plain_keys, saved_shape, strict) -> None:
    """Raise SavedModelError for the first mismatch between the saved directory and ``model``."""
    state = model.state_dict(keep_vars=True)
    for name, meta in rec_meta.items():
        if name not in state:
            module_name, param = split_record_name(name)
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
        missing = [k for k in state if k not in restored and RECORD_SUFFIX not in k]
        if missing:
            raise SavedModelError(f"{len(missing)} tensors of the model are not in the saved directory "
                                  f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); "
                                  "is it the same class and configuration? (strict=False leaves them as they are)",
                                  missing[0])


def _read_records(model, rec_meta: dict, plain_keys, tensor) -> dict[str, QuantizedWeight]:
    """Every record, read and checked (values, ties) before anything is set on the model."""
    recs = {}
    for name, meta in rec_meta.items():
        recs[name] = _read_record(name, meta, tensor)
        check_record(name, recs[name])
    for rec_name, plain_key in check_ties(model, rec_meta, plain_keys):
        check_tie_values(rec_name, recs[rec_name], plain_key, tensor(plain_key))
    return recs


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
            _check_packed(name, value, entry, shape)
            value = unpack_codes(value, int(entry["packed_bits"]), shape, bool(entry["signed"]))
        elif tuple(value.shape) != shape:
            raise SavedModelError(f"stored {field} has shape {tuple(value.shape)}, {CONFIG_NAME} says {shape}", name)
        kwargs[field] = value.to(torch_dtype(entry["dtype"]))
    for field, value in meta.items():
        if field in _RECORD_META:
            continue
        if field == "spec":
            kwargs["spec"] = spec_from_json(value, name)
        elif isinstance(value, list):
            kwargs[field] = tuple(value)
        else:
            kwargs[field] = value
    return QuantizedWeight(**kwargs)


def _check_packed(name: str, value: torch.Tensor, entry: dict, shape: tuple) -> None:
    """The stored packed bytes must be exactly what ``shape`` needs at ``packed_bits`` (checked
    before unpacking allocates ``shape``)."""
    bits = entry["packed_bits"]
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8 \
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise SavedModelError(f"packed codes need packed_bits 1..8 and a shape of sizes, got {bits!r} and {shape}",
                              name)
    numel = 1
    for d in shape:
        numel *= d
    stored = value.numel() * value.element_size()
    if stored != (numel * bits + 7) // 8:
        raise SavedModelError(f"stored codes are {stored} bytes, but shape {shape} at {bits} bits needs "
                              f"{(numel * bits + 7) // 8}", name)


def load_example_inputs(path: str | os.PathLike) -> tuple | dict | None:
    """The example inputs saved with a model (a tuple, or a dict for keyword inputs), or None."""
    from safetensors.torch import load_file

    file = Path(path) / EXAMPLE_INPUTS_NAME
    if not file.is_file():
        return None
    inside(path, EXAMPLE_INPUTS_NAME, "file", SavedModelError)
    from safetensors import SafetensorError

    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise SavedModelError(f"{EXAMPLE_INPUTS_NAME} in {str(path)!r} is not a readable safetensors file: {exc}",
                              EXAMPLE_INPUTS_NAME) from None
    if any(k.startswith("kw.") for k in tensors):
        if not all(k.startswith("kw.") for k in tensors):
            raise SavedModelError("example inputs mix keyword (kw.*) and positional (arg.*) tensors",
                                  EXAMPLE_INPUTS_NAME)
        return {k[3:]: v for k, v in tensors.items()}
    expected = [f"arg.{i}" for i in range(len(tensors))]
    if sorted(tensors) != sorted(expected):
        raise SavedModelError(f"example inputs must be named {', '.join(expected[:3])}...; found "
                              f"{', '.join(sorted(tensors)[:3])}", EXAMPLE_INPUTS_NAME)
    return tuple(tensors[k] for k in expected)


def unrestored_records(model: torch.nn.Module, state_dict: dict) -> list[str]:
    """Records in ``state_dict`` (a quantized model's) that ``model`` does not hold: the records a
    plain ``model.load_state_dict(state_dict, strict=False)`` drops. Use :func:`load` instead."""
    have = set(records(model))
    found = sorted({k[: k.rindex(RECORD_SUFFIX)] for k in state_dict if k.endswith(RECORD_SUFFIX + "codes")})
    return [name for name in found if name not in have]
