"""quanta: plugin-based quantization of PyTorch and Core ML models for Apple devices.

Public API::

    import quanta
    qmodel = quanta.quantize(model, {"global_config": {"dtype": "int4", "granularity": "per_block",
                                                       "block_size": 32}})
    print(qmodel.quanta_report)
    print(quanta.plan(model, "recipe.yaml"))

Plugins: ``@quanta.hookimpl`` (see ``docs/plugins.md``); lookup: ``quanta.registry``.
"""

from . import contracts
from .config import Recipe, load_recipe
from .context import RunContext
from .contracts import Unit
from .errors import (
    ConfigError,
    DestinationError,
    DestinationExistsError,
    DuplicatePluginError,
    PluginContractError,
    PluginError,
    PluginLoadError,
    PluginWarning,
    PluginNotFoundError,
    QuantaError,
    QuantizationError,
)
from .exporting import export, verify
from .hookspecs import hookimpl, hookspec
from .pipeline import plan, quantize
from .planning import Plan, PlannedLayer
from .quantizer import Quantizer
from .record import QuantizedWeight, read_record, records
from .report import LayerReport, Report
from .spec import Granularity, QuantDtype, QuantSpec
from .weights import quantize_weight

__version__ = "0.1.0"

__all__ = [
    "quantize", "plan", "Quantizer", "export", "verify", "quantize_weight", "load_recipe", "Recipe", "Plan", "PlannedLayer",
    "QuantSpec", "QuantDtype", "Granularity", "QuantizedWeight", "read_record", "records",
    "Report", "LayerReport", "hookimpl", "hookspec", "contracts", "RunContext", "Unit",
    "QuantaError", "ConfigError", "PluginNotFoundError", "PluginLoadError", "PluginContractError", "PluginError",
    "PluginWarning",
    "DuplicatePluginError", "QuantizationError", "DestinationError", "DestinationExistsError", "__version__",
]
