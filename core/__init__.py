"""quanta: plugin-based quantization of PyTorch and Core ML models for Apple devices.

Public API::

    import quanta
    qmodel = quanta.quantize(model, {"global_config": {"dtype": "int4", "granularity": "per_block",
                                                       "block_size": 32}})
    print(qmodel.quanta_report)
    print(quanta.plan(model, "recipe.yaml"))

Plugins: ``@quanta.hookimpl`` (see ``docs/plugins.md``); lookup: ``quanta.registry``.
"""

import importlib
from typing import Any, TYPE_CHECKING

from quanta import _moved

from quanta.errors import (
    ConfigError,
    CoreMLPackageError,
    DataError,
    DestinationError,
    DestinationExistsError,
    DeviceError,
    DuplicatePluginError,
    ExampleInputError,
    ModelError,
    NotQuantizedError,
    PluginContractError,
    PluginError,
    PluginLoadError,
    PluginNotFoundError,
    PluginWarning,
    QuantaError,
    QuantizationError,
)

# Names below are imported on first use (PEP 562), so that ``import quanta`` and ``quanta --help``
# do not import torch. Each maps to the module that defines it.
_LAZY = {
    "contracts": "quanta.contracts", "registry": "quanta.registry", "errors": "quanta.errors",
    "record": "quanta.record", "testing": "quanta.testing",
    "RunContext": "quanta._run.context", "Unit": "quanta.contracts",
    "Recipe": "quanta._recipes.recipe", "load_recipe": "quanta._recipes.recipe",
    "export": "quanta._run.exporting", "verify": "quanta._run.exporting",
    "hookimpl": "quanta.contracts.hooks", "hookspec": "quanta.contracts.hooks",
    "plan": "quanta._run.pipeline", "quantize": "quanta._run.pipeline",
    "quantize_checkpoint": "quanta._run.out_of_core",
    "Plan": "quanta._recipes.planning", "PlannedLayer": "quanta._recipes.planning",
    "Quantizer": "quanta._run.quantizer",
    "QuantizedWeight": "quanta.record", "read_record": "quanta.record", "records": "quanta.record",
    "LayerReport": "quanta._run.report", "Report": "quanta._run.report",
    "Granularity": "quanta._records.spec", "QuantDtype": "quanta._records.spec", "QuantSpec": "quanta._records.spec",
    "quantize_weight": "quanta._run.weights",
    "scheme_for": "quanta._run.weights", "observer_for": "quanta._run.weights",
    "atomic_file": "quanta._files.atomic", "atomic_dir": "quanta._files.atomic",
    "save": "quanta._files.saving", "load": "quanta._files.saving", "SavedModelError": "quanta._files.saving",
}

if TYPE_CHECKING:  # what the lazy names are, for type checkers and readers
    from quanta import contracts, errors, record, registry, testing
    from quanta._run.context import RunContext
    from quanta.contracts import Unit
    from quanta._recipes.recipe import Recipe, load_recipe
    from quanta._run.exporting import export, verify
    from quanta.contracts.hooks import hookimpl, hookspec
    from quanta._run.out_of_core import quantize_checkpoint
    from quanta._run.pipeline import plan, quantize
    from quanta._recipes.planning import Plan, PlannedLayer
    from quanta._run.quantizer import Quantizer
    from quanta.record import QuantizedWeight, read_record, records
    from quanta._run.report import LayerReport, Report
    from quanta._records.spec import Granularity, QuantDtype, QuantSpec
    from quanta._files.saving import SavedModelError, load, save
    from quanta._files.atomic import atomic_dir, atomic_file
    from quanta._run.weights import observer_for, quantize_weight, scheme_for


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        moved = _moved.old_module(name)  # ``from quanta import config`` in a 0.1 plugin
        if moved is not None:
            return moved
        raise AttributeError(f"module 'quanta' has no attribute {name!r}")
    imported = importlib.import_module(module)
    value = imported if module.rsplit(".", 1)[-1] == name else getattr(imported, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "quantize", "plan", "quantize_checkpoint", "Quantizer", "export", "verify", "save", "load", "quantize_weight", "load_recipe", "Recipe", "Plan", "PlannedLayer",
    "QuantSpec", "QuantDtype", "Granularity", "QuantizedWeight", "read_record", "records",
    "Report", "LayerReport", "hookimpl", "hookspec", "contracts", "RunContext", "Unit",
    "registry", "errors", "record", "testing", "scheme_for", "observer_for", "atomic_file", "atomic_dir",
    "QuantaError", "ConfigError", "PluginNotFoundError", "PluginLoadError", "PluginContractError", "PluginError",
    "PluginWarning",
    "DuplicatePluginError", "QuantizationError", "DestinationError", "DestinationExistsError",
    "SavedModelError", "DataError", "DeviceError", "ModelError", "ExampleInputError", "NotQuantizedError", "CoreMLPackageError",
    "__version__",
]
