"""What a file or recipe names by reference: ``module:function`` callables and example models.

Shared by loading (a saved model's ``rebuild``) and sources (a recipe's ``model:``/``data:``).
Example models come from plugins through the ``example_models`` hook (the built-in ones from
``quanta.examples``), so core never imports them.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable

from quanta.errors import ConfigError, did_you_mean

__all__ = ["SourceError", "import_callable", "example_models", "load_example"]


class SourceError(ConfigError):
    """A recipe's ``model:`` or ``data:`` cannot be loaded; names the key and what was tried."""


def example_models() -> dict[str, Callable[[], Any]]:
    """Every example model the plugins offer (``example_models`` hook): name -> builder."""
    from quanta import registry

    found: dict[str, Callable[[], Any]] = {}
    for offered in reversed(registry.hook().example_models()):  # registration order; later ones win
        found.update(offered)
    return found


def load_example(name: str, key: str = "model") -> Any:
    """Build the example model called ``name``; raises SourceError naming ``key`` and the examples."""
    examples = example_models()
    if name not in examples:
        raise SourceError(f"unknown example {name!r}{did_you_mean(name, examples)} "
                          f"(available: {', '.join(examples)})", key)
    return examples[name]()


def _file_module(file: Path, key: str):
    name = f"quanta_user_{file.stem}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise SourceError(f"cannot import {str(file)!r} as a Python module", key)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # classes defined there must be findable by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise SourceError(f"importing {str(file)!r} failed: {type(exc).__name__}: {exc}", key) from exc
    return module


def _import_module(module_name: str, ref: str, key: str):
    cwd = os.getcwd()
    added = False
    try:
        while True:
            try:
                return importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                ours = module_name == exc.name or module_name.startswith(f"{exc.name}.")
                if not ours:  # the user's module imports something missing
                    raise SourceError(f"importing {module_name!r} (for {ref!r}) failed: {exc}", key) from exc
                if cwd in sys.path:
                    raise SourceError(f"no module {module_name!r} (for {ref!r}) on sys.path or in the current "
                                      f"directory {cwd}", key) from None
                sys.path.insert(0, cwd)
                added = True
            except Exception as exc:
                raise SourceError(f"importing {module_name!r} (for {ref!r}) failed: {type(exc).__name__}: {exc}",
                                  key) from exc
    except SourceError:
        if added:
            sys.path.remove(cwd)
        raise


def import_callable(ref: str, key: str = "model"):
    """The object named by ``"package.module:function"`` or ``"path/to/file.py:function"``.

    A module not found on ``sys.path`` is looked for in the current directory too. Raises
    :class:`SourceError` naming ``key`` and what was tried.
    """
    module_name, sep, attr = str(ref).rpartition(":")
    if not sep or not module_name or not attr:
        raise SourceError(f"expected 'module:function' or 'file.py:function', got {ref!r}", key)
    if module_name.endswith(".py"):
        file = Path(module_name)
        if not file.is_file():
            raise SourceError(f"no Python file {module_name!r} (for {ref!r}; current directory {os.getcwd()})", key)
        module = _file_module(file.resolve(), key)
    else:
        module = _import_module(module_name, ref, key)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(module) if not n.startswith("_")]
            raise SourceError(f"{module_name!r} has no {attr!r}{did_you_mean(attr, public)}", key)
        obj = getattr(obj, part)
    if not callable(obj):
        raise SourceError(f"{ref!r} is a {type(obj).__name__}, not a function", key)
    return obj


