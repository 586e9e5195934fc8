"""Models and calibration data named by a recipe's ``model:`` and ``data:`` keys (and the CLI).

``model:`` is one of
    - a built-in example name (``minilm``, ``digits``);
    - a directory written by ``quanta.save`` (loaded with ``quanta.load``, no pickle);
    - a transformers model directory (``config.json`` + weights), loaded offline;
    - ``module:function`` or ``path/to/file.py:function``: imported and called, returns an ``nn.Module``;
    - a mapping with options: ``{path: DIR, class: AutoModelForCausalLM}``,
      ``{factory: "pkg.models:build", kwargs: {...}}``, ``{example: minilm}``, or
      ``{path: SAVED_DIR, factory: "netdef.py:build"}`` (the factory builds the model the saved
      directory's weights load into).

A directory is data: nothing it names is imported or run (a saved directory's recorded factory
only with ``trust_remote_code``; a transformers folder's ``auto_map`` code likewise), every file
read from it stays inside it, and a model its ``config.json`` describes is sized against the
memory budget before it is built (``docs/security.md``).

``data:`` is one of
    - a text file (``.txt``, one sample a line) or JSON Lines (``.jsonl``, a ``text`` field), tokenized
      with the model directory's tokenizer (or ``tokenizer: DIR``);
    - a ``.safetensors`` file of tensors, first axis = samples (one tensor: positional batches;
      several, e.g. ``input_ids`` and ``attention_mask``: keyword batches);
    - ``module:function`` (or ``file.py:function``) returning an iterable of batches;
    - a mapping ``{path: ..., max_length: 128, nsamples: 128, batch_size: 8, field: text,
      tokenizer: DIR}`` or ``{factory: "m:f", kwargs: {...}}``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import attrs
import torch

from quanta._files.samples import take_samples
from quanta.errors import ConfigError, did_you_mean
from quanta._files.references import SourceError, example_models, import_callable

__all__ = ["ModelSource", "load_model", "load_data", "import_callable", "SourceError"]

_MODEL_KEYS = ("example", "path", "factory", "kwargs", "class")
_DATA_KEYS = ("path", "factory", "kwargs", "max_length", "nsamples", "batch_size", "field", "tokenizer")
_TEXT_SUFFIXES = (".txt", ".text")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


@attrs.frozen(kw_only=True)
class ModelSource:
    """A loaded model and what else its source provides.

    Attributes:
        model: the ``torch.nn.Module``.
        kind: ``"example"``, ``"saved"``, ``"transformers"``, ``"factory"`` or ``"backend"`` (a
            file a backend plugin loads, e.g. ``.onnx``; then ``model`` is that backend's model).
        rebuild: what ``quanta.save(..., rebuild=)`` records so ``quanta.load`` can rebuild the model
            (None for transformers models: their ``config.json`` is enough).
        example: the ``quanta.examples.Example`` for a built-in example, else None.
        tokenizer_dir: a directory holding the model's tokenizer files, or None.
        example_inputs: inputs exporters can trace with (a tuple or dict of tensors), or None.
        data: the example's calibration batches, or None.
    """

    model: torch.nn.Module
    kind: str
    rebuild: dict | None = None
    example: Any = None
    tokenizer_dir: str | None = None
    example_inputs: Any = None
    data: list | None = None


def _is_callable_ref(text: str) -> bool:
    head, sep, tail = text.rpartition(":")
    return bool(sep and head and tail and tail.replace(".", "_").isidentifier() and not Path(text).exists())


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                                   "tokenizer.model"))


def _offline():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _from_factory(ref: str, kwargs: Mapping | None, key: str) -> ModelSource:
    fn = import_callable(ref, key)
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise SourceError(f"kwargs must be a mapping, got {type(kwargs).__name__}", f"{key}.kwargs")
    try:
        model = fn(**dict(kwargs or {}))
    except Exception as exc:
        raise SourceError(f"{ref!r} raised {type(exc).__name__}: {exc}", key) from exc
    if not isinstance(model, torch.nn.Module):
        raise SourceError(f"{ref!r} returned a {type(model).__name__}, not a torch.nn.Module", key)
    head = ref.rpartition(":")[0]
    stored = f"{Path(head).resolve()}:{ref.rpartition(':')[2]}" if head.endswith(".py") else ref
    rebuild = {"factory": stored, "kwargs": dict(kwargs or {})}
    return ModelSource(model=model.eval(), kind="factory", rebuild=rebuild)


def _check_hf_dir(directory: Path, key: str) -> None:
    """Every file transformers may read from ``directory`` lies inside it (links, index shard names)."""
    from quanta._files.untrusted import check_tree, inside, read_json

    def error(message, name=None):
        return SourceError(message, key)

    check_tree(directory, "model folder", error)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index, index.name, error)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise SourceError(f"{str(index)!r} has no 'weight_map' object of tensor -> file name", key)
        for name in sorted({str(v) for v in weight_map.values()}):
            inside(directory, name, f"shard listed in {index.name}", error)


def _from_transformers_dir(directory: Path, cls_name: str | None, key: str, trust_remote_code: bool,
                           tok: str | None) -> ModelSource:
    from quanta._files.rebuilding import hf_config, hf_model_bytes

    _offline()
    try:
        import transformers
    except ImportError as exc:
        raise SourceError(f"{str(directory)!r} is a transformers model directory; install transformers", key) from exc
    cls = getattr(transformers, cls_name or "AutoModel", None) if str(cls_name or "AutoModel").isidentifier() else None
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        raise SourceError(f"transformers has no model class {cls_name!r}"
                          f"{did_you_mean(str(cls_name), [n for n in dir(transformers) if n.startswith('Auto')])}",
                          f"{key}.class")
    _check_hf_dir(directory, key)

    def error(message, name=None):
        return SourceError(message, key)

    config = hf_config(directory, trust_remote_code, error)
    build = ((lambda: cls.from_config(config, trust_remote_code=trust_remote_code)) if hasattr(cls, "from_config")
             else (lambda: cls._from_config(config)))
    hf_model_bytes(build, f"the model in {str(directory)!r}", error)
    try:
        model = cls.from_pretrained(str(directory), config=config, trust_remote_code=trust_remote_code,
                                    use_safetensors=True)
    except Exception as exc:
        raise SourceError(f"transformers could not load {str(directory)!r} with {cls.__name__}: "
                          f"{type(exc).__name__}: {exc}", key) from exc
    return ModelSource(model=model.eval(), kind="transformers", tokenizer_dir=tok)


def _from_directory(directory: Path, cls_name: str | None, key: str, factory: Any = None,
                    trust_remote_code: bool = False) -> ModelSource:
    from quanta._files.loading import load, load_example_inputs, read_config
    from quanta._files.saved_format import CONFIG_NAME

    tok = str(directory) if _has_tokenizer(directory) else None
    if (directory / CONFIG_NAME).is_file():
        config = read_config(directory)
        model = load(directory, factory=factory, trust_remote_code=trust_remote_code)
        return ModelSource(model=model, kind="saved", rebuild=config.get("rebuild"), tokenizer_dir=tok,
                           example_inputs=load_example_inputs(directory))
    if factory is not None:
        raise SourceError(f"a factory builds the model of a directory saved by quanta.save ({CONFIG_NAME}); "
                          f"{str(directory)!r} is not one", key)
    if (directory / "config.json").is_file():
        return _from_transformers_dir(directory, cls_name, key, trust_remote_code, tok)
    raise SourceError(f"{str(directory)!r} holds neither a quanta saved model ({CONFIG_NAME}) nor a "
                      "transformers model (config.json)", key)


def load_model(ref: Any, key: str = "model", *, factory: Any = None, trust_remote_code: bool = False) -> ModelSource:
    """Load the model a recipe's ``model:`` names (see the module docstring for the forms).

    ``factory`` (a function or ``"module:function"``, the CLI's ``--factory``) builds the model a
    saved directory's weights load into; ``trust_remote_code`` (``--trust-remote-code``) lets a
    saved directory's recorded factory or a transformers folder's ``auto_map`` code run, printing
    what runs. Raises :class:`SourceError` naming ``key``, the forms accepted and what was tried.
    """
    EXAMPLES = example_models()
    forms = (f"an example ({', '.join(EXAMPLES)}), a quanta saved directory, a transformers model directory, "
             "or 'module:function'")
    if isinstance(ref, Mapping):
        unknown = [k for k in ref if k not in _MODEL_KEYS]
        if unknown:
            raise SourceError(f"unknown key {unknown[0]!r}{did_you_mean(str(unknown[0]), _MODEL_KEYS)} "
                              f"(allowed: {', '.join(_MODEL_KEYS)})", f"{key}.{unknown[0]}")
        given = [k for k in ("example", "path", "factory") if k in ref]
        if given == ["path", "factory"]:  # the saved directory's weights, the user's code
            directory = Path(str(ref["path"]))
            if not directory.is_dir():
                raise SourceError(f"no directory {str(directory)!r}", f"{key}.path")
            return _from_directory(directory, None, key, _bound(ref["factory"], ref.get("kwargs"), key),
                                   trust_remote_code)
        if len(given) != 1:
            raise SourceError("give exactly one of example, path or factory (or path with the factory that builds "
                              "its model)", key)
        if "factory" in ref:
            return _from_factory(str(ref["factory"]), ref.get("kwargs"), key)
        if "example" in ref:
            return load_model(str(ref["example"]), key)
        directory = Path(str(ref["path"]))
        if not directory.is_dir():
            raise SourceError(f"no directory {str(directory)!r}", f"{key}.path")
        return _from_directory(directory, ref.get("class"), key, factory, trust_remote_code)
    if isinstance(ref, torch.nn.Module):
        return ModelSource(model=ref, kind="module")
    if not isinstance(ref, (str, os.PathLike)):
        raise SourceError(f"expected {forms}; got a {type(ref).__name__}", key)
    text = os.fspath(ref)
    if factory is not None and not Path(text).is_dir():
        raise SourceError(f"a factory (--factory) builds the model of a directory saved by quanta.save; {text!r} is "
                          "not a directory", key)
    if text in EXAMPLES:
        example = EXAMPLES[text]()
        return ModelSource(model=example.model, kind="example", example=example, tokenizer_dir=example.tokenizer_dir,
                           rebuild=None if _is_transformers(example.model) else {"example": text},
                           example_inputs=example.example_inputs, data=example.data)
    path = Path(text)
    through_backend = _from_backend(path, key) if path.exists() else None
    if through_backend is not None:
        return through_backend
    if path.is_dir():
        return _from_directory(path, None, key, factory, trust_remote_code)
    if path.is_file():
        if path.suffix in (".pt", ".pth", ".pkl", ".bin"):
            raise SourceError(f"{text!r} is a pickle file; quanta does not unpickle models (that runs code). "
                              "Save models with quanta.save (a directory) or name them as 'module:function'", key)
        raise SourceError(f"{text!r} is a file; expected {forms}", key)
    if _is_callable_ref(text):
        return _from_factory(text, None, key)
    raise SourceError(f"{text!r} is not {forms}{did_you_mean(text, EXAMPLES)} "
                      f"(no such directory in {os.getcwd()})", key)


def _bound(ref: Any, kwargs: Any, key: str):
    """A factory named in a recipe, with its recipe kwargs bound (the recipe is the user's code)."""
    if kwargs is None:
        return str(ref)
    if not isinstance(kwargs, Mapping):
        raise SourceError(f"kwargs must be a mapping, got {type(kwargs).__name__}", f"{key}.kwargs")
    fn = import_callable(str(ref), f"{key}.factory")

    def build(**_recorded):
        return fn(**dict(kwargs))

    build.__qualname__ = str(ref).rpartition(":")[2]
    return build


def _from_backend(path: Path, key: str) -> ModelSource | None:
    """A model file or directory whose suffix a backend plugin declares (``Backend.suffixes``),
    loaded by that backend (``Backend.load``); None when no backend declares the suffix."""
    from quanta import registry
    from quanta.registry.guard import plugin_code

    name = path.name
    for entry in registry.backends():
        if any(name.endswith(suffix) for suffix in entry.obj.suffixes):
            with plugin_code(entry.obj):
                model = entry.obj.load(str(path))
            return ModelSource(model=model, kind="backend")
    return None


def _is_transformers(model) -> bool:
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


# ----------------------------------------------------------------------------- data


def _positive(options: Mapping, name: str, default: int | None, key: str) -> int | None:
    value = options.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SourceError(f"must be a positive integer, got {value!r}", f"{key}.{name}")
    return value


def _read_texts(path: Path, field: str, key: str) -> list[str]:
    if path.suffix in _JSONL_SUFFIXES:
        texts = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{str(path)!r} line {n} is not JSON: {exc.msg}", key) from None
            if isinstance(row, str):
                texts.append(row)
            elif isinstance(row, Mapping) and isinstance(row.get(field), str):
                texts.append(row[field])
            else:
                found = ", ".join(row) if isinstance(row, Mapping) else type(row).__name__
                raise SourceError(f"{str(path)!r} line {n} has no string field {field!r} (found: {found}); "
                                  "set data.field", key)
        return texts
    return [line for line in path.read_text().splitlines() if line.strip()]


def _tokenize(texts: list[str], tokenizer_dir: str | None, options: Mapping, key: str) -> list:
    if tokenizer_dir is None:
        raise SourceError("text data needs a tokenizer, and the model directory has none: "
                          "add `tokenizer: DIR` (a folder with tokenizer files) under data", key)
    _offline()
    from quanta._files.untrusted import check_tree

    check_tree(tokenizer_dir, "tokenizer folder", lambda message, name=None: SourceError(message, key))
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    except Exception as exc:
        raise SourceError(f"cannot load a tokenizer from {tokenizer_dir!r}: {type(exc).__name__}: {exc}", key) from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    max_length = _positive(options, "max_length", 128, key)
    batch_size = _positive(options, "batch_size", 8, key)
    return [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt"))
            for i in range(0, len(texts), batch_size)]


def _tensor_batches(path: Path, options: Mapping, key: str) -> list:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise SourceError(f"cannot read {str(path)!r} as safetensors: {exc}", key) from None
    if not tensors:
        raise SourceError(f"{str(path)!r} holds no tensors", key)
    lengths = {k: v.shape[0] if v.dim() else None for k, v in tensors.items()}
    if len(set(lengths.values())) != 1 or None in lengths.values():
        raise SourceError(f"every tensor's first axis must be the samples, of one length; got {lengths}", key)
    n = next(iter(lengths.values()))
    nsamples = _positive(options, "nsamples", None, key) or n
    batch_size = _positive(options, "batch_size", 8, key)
    n = min(n, nsamples)
    if len(tensors) == 1:
        (t,) = tensors.values()
        return [t[i:i + batch_size] for i in range(0, n, batch_size)]
    return [{k: v[i:i + batch_size] for k, v in tensors.items()} for i in range(0, n, batch_size)]


def load_data(ref: Any, source: ModelSource | None = None, key: str = "data") -> list:
    """Calibration batches a recipe's ``data:`` names (see the module docstring for the forms).

    ``source`` supplies the tokenizer for text data. Returns a list of batches (tensors, tuples or
    dicts of tensors, as the model's forward takes them). Raises :class:`SourceError` naming ``key``.
    """
    options: Mapping = {}
    if isinstance(ref, Mapping):
        unknown = [k for k in ref if k not in _DATA_KEYS]
        if unknown:
            raise SourceError(f"unknown key {unknown[0]!r}{did_you_mean(str(unknown[0]), _DATA_KEYS)} "
                              f"(allowed: {', '.join(_DATA_KEYS)})", f"{key}.{unknown[0]}")
        options = ref
        if ("path" in ref) == ("factory" in ref):
            raise SourceError("give exactly one of path or factory", key)
        ref = ref.get("path") or ref.get("factory")
    if not isinstance(ref, (str, os.PathLike)):
        raise SourceError("expected a text/JSONL/safetensors file or 'module:function', "
                          f"got a {type(ref).__name__}", key)
    text = os.fspath(ref)
    path = Path(text)
    nsamples = _positive(options, "nsamples", None, key)
    if path.is_file():
        if path.suffix == ".safetensors":
            return _tensor_batches(path, options, key)
        if path.suffix in _TEXT_SUFFIXES + _JSONL_SUFFIXES:
            texts = _read_texts(path, str(options.get("field", "text")), key)
            if not texts:
                raise SourceError(f"{text!r} holds no text", key)
            tok = options.get("tokenizer") or (source.tokenizer_dir if source else None)
            return _tokenize(texts[:nsamples or 128], tok, options, key)
        raise SourceError(f"{text!r}: unknown data file type {path.suffix!r} (allowed: .txt, .jsonl, "
                          ".safetensors, or 'module:function')", key)
    if _is_callable_ref(text) or "factory" in options:
        fn = import_callable(text, key)
        try:
            batches = fn(**dict(options.get("kwargs") or {}))
            batches = list(batches)
        except Exception as exc:
            raise SourceError(f"{text!r} raised {type(exc).__name__}: {exc}", key) from exc
        if not batches:
            raise SourceError(f"{text!r} returned no batches", key)
        return take_samples(batches, nsamples)  # samples are rows, as for files: whole batches until nsamples
    raise SourceError(f"no file {text!r} (in {os.getcwd()}) and not 'module:function'; expected a text/JSONL/"
                      "safetensors file or 'module:function'", key)
