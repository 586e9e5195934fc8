"""Built-in quanta plugins. Each module registers through the same hooks third parties use.

``BUILTIN_PLUGINS`` is the only list of them; the registry imports each module and
registers it as an ordinary pluggy plugin.
"""

BUILTIN_PLUGINS = (
    "quanta.plugins.schemes",
    "quanta.plugins.observers",
    "quanta.plugins.torch_backend",
    "quanta.plugins.rtn",
    "quanta.plugins.gptq.algorithm",
    "quanta.plugins.activation_observers",
    "quanta.plugins.calibrate",
    "quanta.plugins.qat",
    "quanta.plugins.coreml.exporter",
    "quanta.plugins.compressed_tensors",
    "quanta.plugins.coreml.backend",
    "quanta.examples",  # the example models (example_models hook)
)
