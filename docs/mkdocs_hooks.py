"""mkdocs hooks of quanta's documentation site (mkdocs.yml ``hooks:``)."""

from __future__ import annotations

import sys
from pathlib import Path


def on_startup(**kwargs) -> None:
    """Drop from ``sys.path`` a folder holding a file named ``quanta``: run as the ``mkdocs``
    script, ``sys.path[0]`` is the scripts folder, where the ``quanta`` console script would
    shadow the package for mkdocstrings' source finder (griffe)."""
    sys.path[:] = [p for p in sys.path if not (Path(p or ".") / "quanta").is_file()]
