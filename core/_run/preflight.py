"""Everything ``quanta.quantize`` checks before the first weight changes, in one call (``quanta._run.preflight``).

:func:`check_run` runs the checks of :mod:`quanta._run.model_checks` (quantizable weights, devices)
and :mod:`quanta._run.data_checks` (calibration data) on the batches core has read (``batches``,
at most ``limit``: the largest ``max_batches()`` of the recipe's algorithms). ``check_model``
runs earlier, before a backend is chosen. An algorithm with a device option of its own checks
it in its ``validate`` (``quanta._run.model_checks.check_device``).
"""

from __future__ import annotations

from typing import Any, Sequence

from quanta._run.data_checks import check_batches, check_data_container
from quanta._run.model_checks import check_device, check_units

__all__ = ["check_run"]


def check_run(model: Any, plan, algorithms: Sequence, data: Any, batches: list | None,
              device: Any = None, limit: int | None = None) -> None:
    """Check the model, devices and calibration data of one ``quantize`` call.

    ``plan`` is the first stage's plan; ``algorithms`` the configured algorithms of the recipe's
    stages; ``data`` what the caller passed and ``batches`` the list core
    read from it. Raises ``ModelError``, ``DeviceError`` or ``DataError`` before anything runs;
    warns (``CalibrationWarning``) when there are fewer batches than ``limit``.
    """
    check_units(plan, model)
    check_device(device)
    if data is None or not any(a.needs_data for a in algorithms):
        return
    check_data_container(data)
    names = " -> ".join(a.name for a in algorithms)
    check_batches(model, batches or [], limit=limit, reader=f"algorithm {names!r}")
