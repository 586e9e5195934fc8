"""Counting calibration samples: a *sample* is one row of a batch (its leading dimension).

Shared by the data readers (``data: {nsamples: ...}``, :mod:`quanta._files.sources`) and the
algorithms (``calibration_nsamples``, through :mod:`quanta._run.calibration`), so both count the
same thing (docs/config.md, "Samples are rows").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["count_samples", "take_samples"]


def count_samples(batch: Any) -> int:
    """The samples in one calibration item: the leading dimension of its first tensor (1 for a
    0-d tensor or an item without tensors)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for value in values:
        if isinstance(value, (torch.Tensor, Mapping, tuple, list)):
            return count_samples(value)
    return 1


def take_samples(batches, n: int | None) -> list:
    """Whole batches from ``batches`` until they hold at least ``n`` samples (all when None, or
    when there are fewer). Reads no further than needed (a generator is left after the last)."""
    out, seen = [], 0
    for batch in batches:
        if n is not None and seen >= n:
            break
        out.append(batch)
        seen += count_samples(batch)
    return out
