"""Where the code of a loaded model comes from: the user, never the files.

A saved directory (``quanta.save``) or a transformers folder is data. :func:`rebuild_model` builds
the model a saved directory holds weights for from

- a function the user names (``factory=``, the CLI's ``--factory module:function``), called with
  the kwargs the directory recorded when it names the same function, else with none;
- a built-in example (``rebuild: {example: digits}``) or a quanta example factory
  (``quanta.examples...:function``): quanta's own code;
- a transformers architecture transformers itself ships (``rebuild: {transformers: LlamaForCausalLM}``
  with ``config.json``), read with ``trust_remote_code=False`` and sized on the meta device
  against :func:`quanta._files.untrusted.memory_budget` before a byte is allocated;
- the factory the directory records, only with ``trust_remote_code=True`` (the CLI's
  ``--trust-remote-code``), which prints what it runs first.

Otherwise :class:`~quanta._files.saved_format.SavedModelError` says what the directory recorded
and how to pass it. See ``docs/security.md``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from quanta._files.saved_format import SavedModelError
from quanta._files.untrusted import check_budget, inside, read_json

__all__ = ["rebuild_model", "hf_config", "hf_model_bytes", "announce", "TRUSTED_FACTORY_PREFIX"]

#: Recorded factories in quanta's own examples package are quanta's code, not the directory's.
TRUSTED_FACTORY_PREFIX = "quanta.examples."

ErrorType = Callable[..., Exception]


def announce(message: str) -> None:
    """Say on stderr what quanta is about to run because the user opted in (trust_remote_code)."""
    print(f"quanta: trust_remote_code: {message}", file=sys.stderr, flush=True)


def _function_name(ref: str) -> str:
    return str(ref).rpartition(":")[2]


def _hint(path: Path, rebuild: dict) -> str:
    factory = rebuild.get("factory")
    kwargs = rebuild.get("kwargs") or {}
    shown = f"{factory!r}" + (f" with kwargs {kwargs}" if kwargs else "")
    return (f"{str(path)!r} records that its model was built by {shown}; quanta never runs code a saved "
            f"directory names. Give the model's code yourself: pass --factory {factory} (CLI), or "
            f"quanta.load(DIR, model) with a fresh instance, or quanta.load(DIR, factory='{factory}'); "
            "or, only if you trust whoever wrote this directory, --trust-remote-code / trust_remote_code=True")


def _call(fn: Callable, ref: str, kwargs: dict, where: str) -> torch.nn.Module:
    try:
        model = fn(**kwargs)
    except Exception as exc:
        raise SavedModelError(f"{ref!r} raised {type(exc).__name__}: {exc}", where) from exc
    if not isinstance(model, torch.nn.Module):
        raise SavedModelError(f"{ref!r} returned a {type(model).__name__}, not a torch.nn.Module", where)
    return model.eval()


def _user_factory(factory: Any, rebuild: dict) -> torch.nn.Module:
    from quanta._files.references import import_callable

    if callable(factory):
        ref, fn = getattr(factory, "__qualname__", repr(factory)), factory
    else:
        ref, fn = str(factory), import_callable(str(factory), "factory")
    recorded = rebuild.get("factory")
    same = isinstance(recorded, str) and _function_name(recorded) == _function_name(ref).rpartition(".")[2]
    kwargs = rebuild.get("kwargs") if same and isinstance(rebuild.get("kwargs"), dict) else {}
    return _call(fn, ref, dict(kwargs), "factory")


def _recorded_factory(path: Path, rebuild: dict, trust_remote_code: bool) -> torch.nn.Module:
    from quanta._files.references import import_callable

    factory, kwargs = rebuild.get("factory"), rebuild.get("kwargs") or {}
    if not isinstance(factory, str) or not isinstance(kwargs, dict):
        raise SavedModelError("rebuild.factory must be a 'module:function' string and rebuild.kwargs a mapping",
                              "rebuild")
    own = factory.startswith(TRUSTED_FACTORY_PREFIX) and ".py:" not in factory and "/" not in factory
    if not (own or trust_remote_code):
        raise SavedModelError(_hint(path, rebuild), "rebuild")
    if not own:
        announce(f"importing and calling {factory}(**{kwargs!r}), as {str(path)!r} records")
    return _call(import_callable(factory, "rebuild.factory"), factory, dict(kwargs), "rebuild.factory")


def hf_config(directory: str | os.PathLike, trust_remote_code: bool = False, error: ErrorType = SavedModelError):
    """The ``transformers`` config of the model folder ``directory``, read safely: ``config.json``
    inside the folder and within the metadata limit, no duplicate keys, and (unless
    ``trust_remote_code``) an architecture transformers ships, never code the folder names."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    directory = Path(directory)
    raw = read_json(inside(directory, "config.json", "file", error), "config.json", error)
    if not isinstance(raw, dict):
        raise error(f"{str(directory / 'config.json')!r} is not a JSON object")
    model_type, auto_map = raw.get("model_type"), raw.get("auto_map")
    if not trust_remote_code and model_type not in CONFIG_MAPPING:
        named = f"; its auto_map names code shipped in the folder ({auto_map})" if auto_map else ""
        raise error(f"{str(directory)!r}: config.json's model_type {model_type!r} is not an architecture the "
                    f"installed transformers {transformers.__version__} ships{named}. quanta does not run code a "
                    "model folder names: build the model yourself (quanta.load(DIR, model), --factory "
                    "module:function), or pass --trust-remote-code / trust_remote_code=True if you trust it",
                    "config.json")
    if trust_remote_code and auto_map:
        announce(f"transformers may import and run {auto_map} from {str(directory)!r}")
    try:
        return transformers.AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise error(f"transformers cannot read {str(directory / 'config.json')!r}: {type(exc).__name__}: {exc}",
                    "config.json") from None


def hf_model_bytes(build: Callable[[], torch.nn.Module], what: str, error: ErrorType = SavedModelError) -> int:
    """Build a model on the meta device (no memory), return its parameter and buffer bytes, and raise
    ``error`` when that is above the memory budget."""
    try:
        with torch.device("meta"):
            model = build()
    except Exception as exc:
        raise error(f"cannot build {what}: {type(exc).__name__}: {exc}", "config.json") from None
    nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    check_budget(nbytes, f"{what} (as its config.json describes it)", error, "config.json")
    return nbytes


def _transformers(path: Path, rebuild: dict, trust_remote_code: bool) -> torch.nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    name = rebuild["transformers"]
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise SavedModelError(f"transformers has no model class {name!r} "
                              f"(installed transformers {transformers.__version__})", "rebuild")
    config = hf_config(path, trust_remote_code)
    hf_model_bytes(lambda: cls._from_config(config), f"the {name}")
    return cls._from_config(config).eval()


def rebuild_model(path: str | os.PathLike, config: dict, *, factory: Any = None,
                  trust_remote_code: bool = False) -> torch.nn.Module:
    """The fresh float model a saved directory's weights load into (see the module docstring)."""
    path = Path(path)
    rebuild = config.get("rebuild") or {}
    if not isinstance(rebuild, dict):
        raise SavedModelError(f"rebuild must be a mapping, got a {type(rebuild).__name__}", "rebuild")
    if factory is not None:
        return _user_factory(factory, rebuild)
    if "transformers" in rebuild:
        return _transformers(path, rebuild, trust_remote_code)
    if "factory" in rebuild:
        return _recorded_factory(path, rebuild, trust_remote_code)
    if "example" in rebuild:
        from quanta._files.references import load_example

        return load_example(str(rebuild["example"]), "rebuild.example").model
    raise SavedModelError(f"{str(path)!r} does not record how to rebuild its model (a {config.get('model_class')}); "
                          "pass model=<a fresh instance of that class> or factory='module:function' to quanta.load "
                          "(--factory on the command line), or save it with quanta.save(..., rebuild={'factory': "
                          "'package.module:function'}) (the CLI records it when the recipe's model: names a function)")
