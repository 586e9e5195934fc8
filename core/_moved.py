"""Import paths of quanta 0.1 that moved when core was grouped into rooms (kept for one release).

``import quanta.spec`` (or ``from quanta.config import load_recipe``) still works and gives the
module at its new home, with a :class:`DeprecationWarning` naming the new path. Public names
live on ``quanta`` itself (``quanta.QuantSpec``, ``quanta.load_recipe``) and in the public
modules docs/api.md lists; the new homes are private and may change without notice.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

#: old module (under ``quanta.``) -> the module that now holds its names
MOVED = {
    "config": "_recipes.recipe", "options": "_recipes.options", "recipe_yaml": "_recipes.yaml_reader",
    "planning": "_recipes.planning",
    "spec": "_records.spec", "qmath": "_records.qmath", "weights": "_run.weights",
    "packing": "_records.packing",
    "pipeline": "_run.pipeline", "context": "_run.context", "quantizer": "_run.quantizer",
    "guard": "_run.guard", "calibration": "_run.calibration", "preflight": "_run.preflight",
    "data_checks": "_run.data_checks", "model_checks": "_run.model_checks",
    "export_checks": "_run.export_checks", "exporting": "_run.exporting", "report": "_run.report",
    "report_html": "_run.report_html",
    "saving": "_files.saving", "loading": "_files.loading", "saved_format": "_files.saved_format",
    "sources": "_files.sources", "atomic": "_files.atomic", "faults": "_files.faults",
    "hookspecs": "contracts.hooks", "plugin": "contracts",
    "cli": "_cli", "cli.app": "_cli.app", "cli.commands": "_cli.commands", "cli.parser": "_cli.parser",
    "cli.output": "_cli.output", "cli.model_files": "_cli.model_files", "cli.__main__": "_cli.__main__",
}

__all__ = ["MOVED", "old_module"]


def _warn(old: str, new: str) -> None:
    warnings.warn(f"quanta.{old} moved to quanta.{new} and the old path goes away in "
                  f"the next release; use the names on `quanta` itself or in the modules docs/api.md lists",
                  DeprecationWarning, stacklevel=3)


def old_module(name: str) -> ModuleType | None:
    """The module an old ``quanta.<name>`` path stands for (warning), or None if the name never moved."""
    new = MOVED.get(name)
    if new is None:
        return None
    _warn(name, new)
    return importlib.import_module(f"quanta.{new}")


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``import quanta.<old>`` to the module at its new home (same module object)."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("quanta.") or fullname[len("quanta."):] not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return None  # a placeholder; exec_module swaps the real module in

    def exec_module(self, module):
        # importlib returns whatever sys.modules holds after exec_module, so the old name gets the
        # new module object itself (its __spec__ untouched).
        old = module.__name__[len("quanta."):]
        _warn(old, MOVED[old])
        sys.modules[module.__name__] = importlib.import_module(f"quanta.{MOVED[old]}")


if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedFinder())
