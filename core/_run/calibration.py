"""Calibration data, as every algorithm that runs a model reads it.

A calibration item is a tensor (one positional input), a tuple or list (positional inputs)
or a mapping (keyword inputs, e.g. a Hugging Face tokenizer's batch).

**Samples.** Everywhere in quanta a *sample* is one row of a batch (one text, one image, one
sequence: the batch's leading dimension, :func:`count_samples`), and a batch holds one or
more samples. ``data: {nsamples: 128, batch_size: 8}`` reads 128 texts in 16 batches;
``calibration_nsamples: 128`` (gptq) and ``nsamples`` (calibrate) read whole batches until
they have 128 samples (:func:`take_samples`). ``quanta.compat`` keeps coremltools' meaning
(``calibration_nsamples`` dataloader items).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from quanta._files.samples import count_samples, take_samples  # noqa: F401 - re-exported: data and algorithms share them

__all__ = ["call_model", "to_device", "count_samples", "take_samples"]


def call_model(model: Any, batch: Any):
    """Run ``model`` on one calibration item: ``model(**batch)``, ``model(*batch)`` or ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def to_device(obj: Any, device) -> Any:
    """``obj`` with every tensor inside (mappings, tuples, lists) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj

