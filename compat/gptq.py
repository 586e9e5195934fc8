"""coremltools' ``LayerwiseCompressor`` (GPTQ) over ``quanta.quantize`` (algorithm ``gptq``).

The config classes are coremltools' own (:mod:`quanta.compat.configs`): ``ModuleGPTQConfig``,
``LayerwiseCompressorConfig``, ``LayerwiseCompressionAlgorithmConfig`` (``get_class`` /
``register``) and ``ModuleSparseGPTConfig``, which builds but is refused when a compressor uses
it (quanta has no pruning; it is never replaced by GPTQ). The config becomes a quanta recipe in
:func:`quanta.compat.recipes.gptq_recipe`.
"""

from __future__ import annotations

import torch

import quanta
from quanta.compat.configs import (
    LayerwiseCompressionAlgorithmConfig,
    LayerwiseCompressorConfig,
    ModuleGPTQConfig,
    ModuleSparseGPTConfig,
)
from quanta.compat.convert import CompressorResult, annotate_for_coreml
from quanta.compat.ptq import as_config
from quanta.compat.recipes import gptq_recipe
from quanta.errors import ConfigError

__all__ = ["ModuleGPTQConfig", "ModuleSparseGPTConfig", "LayerwiseCompressionAlgorithmConfig",
           "LayerwiseCompressorConfig", "LayerwiseCompressor", "GPTQ"]


class LayerwiseCompressor(CompressorResult):
    """``LayerwiseCompressor(model, config).compress(dataloader, device=None, inplace=False)``.

    GPTQ on coremltools' 16-level grid; the result converts with plain ``ct.convert`` to compressed
    weights from the target ``compress()`` names (see :class:`~quanta.compat.PostTrainingQuantizer`).
    """

    def __init__(self, model, config: LayerwiseCompressorConfig | dict | None = None):
        self._model = model
        self._config = as_config(config, LayerwiseCompressorConfig)
        self._recipe = quanta.load_recipe(gptq_recipe(self._config))
        self._result = None

    def compress(self, dataloader, device: str | None = None, inplace: bool = False):
        """Quantize with GPTQ on ``dataloader``'s samples; ``device`` is optional here.

        As in coremltools, ``calibration_nsamples`` counts the dataloader's items (quanta's own
        recipes count samples, the rows of the batches): the first that many items are used."""
        data, rows = _first_items(dataloader, self._config.calibration_nsamples)
        recipe = self._recipe if rows is None else quanta.load_recipe(
            {**gptq_recipe(self._config), "calibration_nsamples": rows})
        self._result = quanta.quantize(self._model, recipe, data=data, inplace=inplace, device=device)
        return annotate_for_coreml(self._result)


def _first_items(dataloader, n: int):
    """coremltools' meaning of ``calibration_nsamples`` (items of the dataloader) on quanta's (rows):
    ``(the first n items, the samples they hold)``; ``(dataloader, None)`` for what is not a
    collection of batches (quanta.quantize reports it). Warns when there are fewer items."""
    import itertools
    import warnings

    import torch

    from quanta._run.calibration import count_samples
    from quanta._run.data_checks import CalibrationWarning

    import numpy as np

    if dataloader is None or isinstance(dataloader, (torch.Tensor, np.ndarray, dict, str, bytes)):
        return dataloader, None
    try:
        items = list(itertools.islice(iter(dataloader), n))
    except TypeError:
        return dataloader, None
    if not items:
        return items, None
    if len(items) < n:
        warnings.warn(f"calibration data has {len(items)} batch(es) but calibration_nsamples is {n} (coremltools "
                      f"counts dataloader items): using all {len(items)}", CalibrationWarning, stacklevel=3)
    return items, sum(count_samples(b) for b in items)


class GPTQ:
    """coremltools' per-layer ``GPTQ(layer, config)``: ``add_batch(inp, out)`` for each calibration
    batch, then ``compress()`` quantizes ``layer`` in place (quanta's ``gptq`` on the batches seen)
    and ``cleanup()`` drops them.

    Raises ``ValueError`` (a :class:`quanta.ConfigError`) at construction when ``block_size`` does
    not divide the layer's input channels, as coremltools does.
    """

    def __init__(self, layer: torch.nn.Module, config: ModuleGPTQConfig):
        if not isinstance(config, ModuleGPTQConfig):
            raise ConfigError(f"expected a ModuleGPTQConfig, got {type(config).__name__}", "config")
        weight = getattr(layer, "weight", None)
        if weight is None or weight.dim() < 2:
            raise ConfigError(f"GPTQ needs a layer with a weight of rank >= 2, got {type(layer).__name__}", "layer")
        columns = weight.flatten(1).shape[1]
        if config.block_size is not None and columns % config.block_size:
            raise ConfigError(f"block size {config.block_size} does not divide the {columns} input channels of "
                              f"{type(layer).__name__}", "block_size")
        self._layer, self._config, self._inputs = layer, config, []

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None = None) -> None:
        """Record one batch of the layer's inputs (``out`` is accepted and unused)."""
        self._inputs.append(inp.detach())

    def compress(self) -> None:
        """Quantize the layer in place from the batches seen."""
        if not self._inputs:
            raise ConfigError("compress() before any add_batch(): GPTQ needs the layer's inputs", "add_batch")
        recipe = gptq_recipe(LayerwiseCompressorConfig(global_config=self._config))
        quanta.quantize(self._layer, recipe, data=list(self._inputs), inplace=True)
        annotate_for_coreml(self._layer)

    def cleanup(self) -> None:
        """Forget the recorded inputs."""
        self._inputs = []
