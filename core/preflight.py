"""Everything ``quanta.quantize`` checks before the first weight changes, in one call (``quanta.preflight``).

:func:`check_run` runs the checks of :mod:`quanta.model_checks` (quantizable weights, devices) and
:mod:`quanta.data_checks` (calibration data) in that order and returns the data to hand to the
algorithm. The number of batches an algorithm reads is taken from its config's
``calibration_nsamples`` or ``nsamples`` field (the documented convention; None reads all), and
a ``device`` field of the algorithm's config is checked like the ``device`` argument.
"""

from __future__ import annotations

from typing import Any

from .data_checks import check_calibration_data
from .model_checks import check_device, check_units

__all__ = ["check_run", "calibration_nsamples"]

#: Algorithm config fields that say how many calibration batches the algorithm reads.
NSAMPLES_FIELDS = ("calibration_nsamples", "nsamples")


def calibration_nsamples(algorithm_config: Any) -> int | None:
    """How many calibration batches an algorithm with this config reads (None: all)."""
    for field in NSAMPLES_FIELDS:
        value = getattr(algorithm_config, field, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def check_run(model: Any, plan, recipe, algorithm, data: Any, device: Any = None) -> Any:
    """Check the model, devices and calibration data of one ``quantize`` call; return the data to use.

    ``algorithm`` is the algorithm implementation (its ``needs_data`` decides whether ``data``
    is checked). Raises ``ModelError``, ``DeviceError`` or ``DataError`` before anything runs.
    (``check_model`` runs earlier, before a backend is chosen.)
    """
    check_units(plan, model)
    check_device(device)
    check_device(getattr(recipe.algorithm_config, "device", None))
    if data is None or not getattr(algorithm, "needs_data", False):
        return data
    return check_calibration_data(model, data, nsamples=calibration_nsamples(recipe.algorithm_config))
