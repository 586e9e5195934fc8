"""coremltools' grids, pinned: what ``quantization_scheme`` means in each coremltools API.

quanta's own ``symmetric`` default (grid ``auto``) uses 16 levels at int4; coremltools'
``PostTrainingQuantizer``, ``linear_quantize_weights`` and ``LinearQuantizer`` use the
restricted grid (int4 -7..7, int8 -127..127) and its GPTQ the full one (16 levels, zero
point 8). The compat classes write the grid explicitly so they reproduce coremltools.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PTQ_GRID", "GPTQ_GRID", "pinned_scheme"]

#: The symmetric grid of coremltools' data-free and QAT quantizers.
PTQ_GRID = "restricted"
#: The symmetric grid of coremltools' GPTQ (``LayerwiseCompressor``).
GPTQ_GRID = "full"


def pinned_scheme(scheme: Any, grid: str) -> Any:
    """The recipe value for ``scheme`` with the symmetric grid pinned to ``grid``
    (``{"name": "symmetric", "grid": grid}``); other schemes are returned unchanged."""
    text = str(getattr(scheme, "value", scheme))
    if text == "symmetric":
        return {"name": "symmetric", "grid": grid}
    return scheme
