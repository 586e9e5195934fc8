"""``quanta.compat``: coremltools.optimize's names over quanta's own API.

Port coremltools code by changing only its imports::

    from quanta.compat import PostTrainingQuantizer, PostTrainingQuantizerConfig
    import quanta.compat as cto            # cto.coreml.linear_quantize_weights(...)

No logic lives here: the config classes are coremltools' own (``quanta.compat.configs``), each
compressor translates its config to a quanta recipe at one boundary (``quanta.compat.recipes``)
and calls ``quanta.quantize``; ``LinearQuantizer`` prepares with torch.ao's public FX API as
coremltools does (quanta's own qconfig mapping and backend config, ``quanta.compat._ao_*``) and
finalizes into quanta records. Names resolve lazily from the submodules below. See docs/compat.md for what passes of coremltools' own tests.
"""

from __future__ import annotations

import importlib

_NAMES = {
    # data-free PTQ (coremltools.optimize.torch.quantization)
    "PostTrainingQuantizer": "ptq", "PostTrainingQuantizerConfig": "ptq",
    "ModulePostTrainingQuantizerConfig": "ptq", "QuantizationScheme": "configs",
    "QuantizationGranularity": "configs", "ObserverType": "configs",
    # GPTQ (coremltools.optimize.torch.layerwise_compression)
    "LayerwiseCompressor": "gptq", "LayerwiseCompressorConfig": "gptq", "ModuleGPTQConfig": "gptq",
    "GPTQ": "gptq", "LayerwiseCompressionAlgorithmConfig": "gptq", "ModuleSparseGPTConfig": "gptq",
    # QAT / W8A8 calibration (coremltools.optimize.torch.quantization)
    "LinearQuantizer": "qat", "LinearQuantizerConfig": "qat", "ModuleLinearQuantizerConfig": "qat",
}
_SUBMODULES = ("coreml", "ptq", "gptq", "qat", "configs", "recipes")

__all__ = sorted(_NAMES) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _NAMES:
        module = importlib.import_module(f"{__name__}.{_NAMES[name]}")
        return getattr(module, name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
