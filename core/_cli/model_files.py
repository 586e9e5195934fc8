"""Writing the ``torch.save``d model files of ``quanta quantize --format pickle`` (never read back).

Writing goes through :func:`quanta._files.atomic.atomic_file` and adds a small
``quanta.json`` entry to the zip archive ``torch.save`` writes, so that rerunning onto quanta's
own earlier file replaces it while anyone else's file needs ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

__all__ = ["save_model_file", "is_quanta_model_file", "MARKER_ENTRY"]

#: Name of the entry quanta adds inside the archive (under torch's own top-level folder).
MARKER_ENTRY = "quanta.json"


def is_quanta_model_file(path: Path) -> bool:
    """True when ``path`` is a model file quanta wrote (its archive holds the ``quanta.json`` entry)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/" + MARKER_ENTRY) for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def save_model_file(model: Any, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """``torch.save`` ``model`` to ``path`` atomically (temp file, fsync, rename), marked as quanta's."""
    import torch

    from quanta import __version__
    from quanta._files.atomic import atomic_file

    from quanta._files.faults import fault_delay

    with atomic_file(path, overwrite=overwrite, owned=is_quanta_model_file) as tmp:
        torch.save(model, tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            prefix = archive.namelist()[0].split("/")[0]
            archive.writestr(f"{prefix}/{MARKER_ENTRY}", json.dumps({"written_by": "quanta", "version": __version__}))
        fault_delay("model-file-written")
    return Path(path)
