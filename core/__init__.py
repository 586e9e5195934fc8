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
from typing import TYPE_CHECKING

from .errors import (
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
    "contracts": "contracts", "RunContext": "context", "Unit": "contracts",
    "Recipe": "config", "load_recipe": "config",
    "export": "exporting", "verify": "exporting",
    "hookimpl": "hookspecs", "hookspec": "hookspecs",
    "plan": "pipeline", "quantize": "pipeline",
    "Plan": "planning", "PlannedLayer": "planning",
    "Quantizer": "quantizer",
    "QuantizedWeight": "record", "read_record": "record", "records": "record",
    "LayerReport": "report", "Report": "report",
    "Granularity": "spec", "QuantDtype": "spec", "QuantSpec": "spec",
    "quantize_weight": "weights",
    "save": "saving", "load": "saving", "SavedModelError": "saving",
}

if TYPE_CHECKING:  # what the lazy names are, for type checkers and readers
    from . import contracts
    from .context import RunContext
    from .contracts import Unit
    from .config import Recipe, load_recipe
    from .exporting import export, verify
    from .hookspecs import hookimpl, hookspec
    from .pipeline import plan, quantize
    from .planning import Plan, PlannedLayer
    from .quantizer import Quantizer
    from .record import QuantizedWeight, read_record, records
    from .report import LayerReport, Report
    from .spec import Granularity, QuantDtype, QuantSpec
    from .saving import SavedModelError, load, save
    from .weights import quantize_weight


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'quanta' has no attribute {name!r}")
    imported = importlib.import_module(f"{__name__}.{module}")
    value = imported if module == name else getattr(imported, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "quantize", "plan", "Quantizer", "export", "verify", "save", "load", "quantize_weight", "load_recipe", "Recipe", "Plan", "PlannedLayer",
    "QuantSpec", "QuantDtype", "Granularity", "QuantizedWeight", "read_record", "records",
    "Report", "LayerReport", "hookimpl", "hookspec", "contracts", "RunContext", "Unit",
    "QuantaError", "ConfigError", "PluginNotFoundError", "PluginLoadError", "PluginContractError", "PluginError",
    "PluginWarning",
    "DuplicatePluginError", "QuantizationError", "DestinationError", "DestinationExistsError",
    "SavedModelError", "DataError", "DeviceError", "ModelError", "ExampleInputError", "NotQuantizedError", "CoreMLPackageError",
    "__version__",
]
