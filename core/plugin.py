"""Older name of :mod:`quanta.contracts` (kept so plugins written for quanta 0.1 import).

Subclass the classes of ``quanta.contracts``; they are the same objects.
"""

from quanta.contracts import Algorithm, Backend, Exporter, Observer, Scheme, Unit

__all__ = ["Scheme", "Observer", "Algorithm", "Backend", "Exporter", "Unit"]
