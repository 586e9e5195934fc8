"""Built-in quanta plugins. Each module registers through the same hooks third parties use.

``BUILTIN_PLUGINS`` is the only list of them; the registry imports each module and
registers it as an ordinary pluggy plugin. ``BUILTIN_CONTRIBUTIONS`` and ``BUILTIN_HOOKS`` say
what each module registers, so a lookup imports only the module it needs (a first
``quanta.quantize`` with RTN imports neither the Core ML exporter, nor GPTQ, nor ``quanta.fx``);
``tests/test_registry.py`` checks them against what the modules really register.
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

#: What each built-in module registers, by kind: ``{module: {kind: (name, ...)}}``.
BUILTIN_CONTRIBUTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "quanta.plugins.schemes": {"scheme": ("affine", "symmetric")},
    "quanta.plugins.observers": {"observer": ("minmax", "mse", "percentile")},
    "quanta.plugins.torch_backend": {"backend": ("torch",)},
    "quanta.plugins.rtn": {"algorithm": ("rtn",)},
    "quanta.plugins.gptq.algorithm": {"algorithm": ("gptq",)},
    "quanta.plugins.activation_observers": {"observer": ("moving_average_minmax",)},
    "quanta.plugins.calibrate": {"algorithm": ("calibrate",)},
    "quanta.plugins.qat": {"algorithm": ("qat",)},
    "quanta.plugins.coreml.exporter": {"exporter": ("coreml",)},
    "quanta.plugins.compressed_tensors": {"exporter": ("compressed-tensors",)},
    "quanta.plugins.coreml.backend": {"backend": ("coreml",)},
    "quanta.examples": {},
}

#: The hooks other than the registration hooks that each built-in module implements.
BUILTIN_HOOKS: dict[str, tuple[str, ...]] = {
    "quanta.plugins.coreml.exporter": ("add_cli_options",),
    "quanta.examples": ("example_models",),
}
