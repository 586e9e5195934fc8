"""The ``quanta`` command: plugins, describe, plan, quantize, export, verify.

Importing this package (and ``quanta --help``) imports neither torch nor coremltools: the
parser is built from plain text; each command imports what it needs when it runs.
"""

from __future__ import annotations

from quanta._cli.app import main
from quanta._cli.parser import build_parser

__all__ = ["main", "build_parser"]
