"""Everything ``quanta.quantize`` checks before the first weight changes, in one call (``quanta._run.preflight``).

:func:`check_run` runs the checks of :mod:`quanta._run.model_checks` (quantizable weights, devices)
and :mod:`quanta._run.data_checks` (calibration data) on the batches core has read (``batches``,
at most ``limit``: the largest ``max_batches()`` of the recipe's algorithms). ``check_model``
runs earlier, before a backend is chosen. An algorithm with a device option of its own checks
it in its ``validate`` (``quanta._run.model_checks.check_device``).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

from quanta._run.data_checks import check_batches, check_data_container
from quanta._run.model_checks import check_device, check_units

__all__ = ["check_run", "warn_if_nothing_selected", "NothingQuantizedWarning"]


class NothingQuantizedWarning(UserWarning):
    """The recipe selects no layer: the run would return the model with every weight still float."""


def warn_if_nothing_selected(plan) -> None:
    """Warn (:class:`NothingQuantizedWarning`) when ``plan`` quantizes no layer, saying why: a
    ``weight_threshold`` above every layer's size (naming the largest), or the skip reasons."""
    if plan.selected or not plan.layers:
        return
    reasons = [layer.reason for layer in plan.layers]
    if all("weight_threshold" in r for r in reasons):
        sizes = [int(r.split(" elements", 1)[0]) for r in reasons if r.split(" elements", 1)[0].isdigit()]
        largest = f" (the largest layer has {max(sizes)} elements)" if sizes else ""
        why = f"the weight_threshold is above every layer's size{largest}; lower it"
    else:
        shown = "; ".join(f"{layer.name!r}: {layer.reason}" for layer in plan.layers[:3])
        why = f"every layer is skipped ({shown}{'; ...' if len(plan.layers) > 3 else ''}); check the recipe"
    warnings.warn(f"no layer will be quantized: {why}. The result would hold only float weights",
                  NothingQuantizedWarning, stacklevel=4)


def check_run(model: Any, plan, algorithms: Sequence, data: Any, batches: list | None,
              device: Any = None, limit: int | None = None) -> frozenset[str] | None:
    """Check the model, devices and calibration data of one ``quantize`` call.

    ``plan`` is the first stage's plan; ``algorithms`` the configured algorithms of the recipe's
    stages; ``data`` what the caller passed and ``batches`` the list core
    read from it. Raises ``ModelError``, ``DeviceError`` or ``DataError`` before anything runs;
    warns (``CalibrationWarning``) when there are fewer batches than ``limit``. Returns the names of
    the modules the dry forward of ``batches[0]`` reached (``RunContext.reached``), None without one.
    """
    check_units(plan, model)
    warn_if_nothing_selected(plan)
    check_device(device)
    if data is None or not any(a.needs_data for a in algorithms):
        return None
    check_data_container(data)
    names = " -> ".join(a.name for a in algorithms)
    return check_batches(model, batches or [], limit=limit, reader=f"algorithm {names!r}", record=True)
