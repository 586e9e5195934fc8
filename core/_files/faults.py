"""Test-only fault injection: widen timing windows so interrupt tests hit them (``quanta._files.faults``).

``QUANTA_FAULT_DELAY="point:seconds[,point:seconds]"`` makes :func:`fault_delay` sleep at the
named point. Points: ``model-file-written`` (the CLI's model file is complete in its temporary
path, not yet renamed), ``package-staged`` (an exported package is complete in its staging folder,
not yet swapped in), ``model-dir-staged`` (a ``quanta.save`` directory is complete in its staging
folder, not yet swapped in), ``block-checkpointed`` (an out-of-core run kept a finished block in its
checkpoint directory). Unset (always, outside tests) it does nothing. It changes no behaviour besides
the pause: a test interrupting during it checks the real write path.
"""

from __future__ import annotations

import os
import time

__all__ = ["fault_delay", "ENV"]

ENV = "QUANTA_FAULT_DELAY"


def fault_delay(point: str) -> None:
    """Sleep at ``point`` when ``QUANTA_FAULT_DELAY`` names it (tests only); otherwise return at once."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        name, _, seconds = item.partition(":")
        if name.strip() == point:
            try:
                time.sleep(float(seconds))
            except ValueError:
                return
