"""coremltools' ``PostTrainingQuantizer`` over ``quanta.quantize`` (algorithm ``rtn``).

The config classes are coremltools' own (:mod:`quanta.compat.configs`); the config becomes a
quanta recipe in :func:`quanta.compat.recipes.ptq_recipe`.
"""

from __future__ import annotations

import quanta
from quanta.compat.configs import (
    ModulePostTrainingQuantizerConfig,
    PostTrainingQuantizerConfig,
    QuantizationGranularity,
    QuantizationScheme,
    coremltools_errors,
)
from quanta.compat.convert import CompressorResult, annotate_for_coreml
from quanta.compat.recipes import ptq_recipe

__all__ = ["QuantizationScheme", "QuantizationGranularity", "ModulePostTrainingQuantizerConfig",
           "PostTrainingQuantizerConfig", "PostTrainingQuantizer", "annotate_for_coreml"]


def as_config(config, cls):
    """``None`` (cls's defaults), a dict (``cls.from_dict``) or a config object -> a config object."""
    if config is None:
        return cls()
    if isinstance(config, dict):
        return cls.from_dict(config)
    return config


class PostTrainingQuantizer(CompressorResult):
    """``PostTrainingQuantizer(model, config).compress(inplace=False)``, as in coremltools.

    The returned model computes with the dequantized weights, carries quanta records and
    coremltools' converter metadata: plain ``ct.convert(torch.jit.trace(model, x),
    minimum_deployment_target=...)`` stores them compressed from the target that
    ``compress()`` names (a warning, and ``model.coreml_minimum_deployment_target``; iOS18 for
    int4 or per-block weights, else iOS16).
    """

    def __init__(self, model, config: PostTrainingQuantizerConfig | dict | None = None):
        self._model = model
        self._config = as_config(config, PostTrainingQuantizerConfig)
        with coremltools_errors("PostTrainingQuantizerConfig"):
            self._recipe = quanta.load_recipe(ptq_recipe(self._config))
        self._result = None

    def compress(self, inplace: bool = False, **_ignored):
        """Quantize and return the model (a copy unless ``inplace``), annotated for ``ct.convert``."""
        self._result = quanta.quantize(self._model, self._recipe, inplace=inplace)
        return annotate_for_coreml(self._result)
