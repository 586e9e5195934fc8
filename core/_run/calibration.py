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

import copy
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



_PLAIN = (torch.Tensor, str, bytes, int, float, bool, type(None), torch.dtype, torch.device)


def fresh_state(value: Any) -> Any:
    """``value`` with every stateful object inside (not a tensor, number, string or container of
    them; e.g. a transformers key-value cache that a decoder layer appends to) replaced by a copy,
    so each call of a block sees the state the model's own forward gave it, never another call's."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(fresh_state(v) for v in value)
    if isinstance(value, Mapping):
        return {k: fresh_state(v) for k, v in value.items()}
    return copy.deepcopy(value)


def hidden_state(out: Any) -> torch.Tensor:
    """The hidden state in a block's output: the tensor, or the first item of a tuple, list or
    ``ModelOutput``."""
    from quanta.errors import QuantizationError

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "to_tuple"):
        return out.to_tuple()[0]
    raise QuantizationError(f"cannot find the hidden state in a block output of type {type(out).__name__}")
