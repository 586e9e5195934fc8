"""Reading and writing the ``torch.save``d model files of the ``quanta`` command.

Reading turns every way a file can be wrong (missing, a folder, not a torch file, truncated, a
class that cannot be imported) into a :class:`~quanta.errors.ModelError` naming the file and
the fix. Writing goes through :func:`quanta.atomic.atomic_file` and adds a small
``quanta.json`` entry to the zip archive ``torch.save`` writes, so that rerunning onto quanta's
own earlier file replaces it while anyone else's file needs ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

from quanta.errors import ModelError

__all__ = ["load_model_file", "save_model_file", "is_quanta_model_file", "MARKER_ENTRY"]

#: Name of the entry quanta adds inside the archive (under torch's own top-level folder).
MARKER_ENTRY = "quanta.json"


def load_model_file(path: str | os.PathLike, what: str = "model file") -> Any:
    """``torch.load`` a whole pickled model (``weights_only=False``: only load files you trust)."""
    import pickle

    import torch

    path = Path(path)
    if not path.exists():
        raise ModelError(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        raise ModelError(f"{what} {str(path)!r} is a folder; pass a torch.save'd model file (.pt)")
    try:
        obj = torch.load(path, weights_only=False, map_location="cpu")
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
        raise ModelError(f"{what} {str(path)!r} holds a model whose class cannot be imported ({exc}); run quanta "
                         "where the model's code is importable (e.g. from your project folder, or after "
                         "pip install of the package that defines it)") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{what} {str(path)!r} is not a readable torch.save file ({type(exc).__name__}: "
                         f"{first}); it may be truncated or another format") from None
    if isinstance(obj, dict):
        raise ModelError(f"{what} {str(path)!r} holds a state_dict ({type(obj).__name__}), not a torch.nn.Module: "
                         "load it into its model class in Python and torch.save the model itself")
    if not isinstance(obj, torch.nn.Module):
        raise ModelError(f"{what} {str(path)!r} holds a {type(obj).__name__}, not a torch.nn.Module")
    return obj


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
    from quanta.atomic import atomic_file

    from quanta.faults import fault_delay

    with atomic_file(path, overwrite=overwrite, owned=is_quanta_model_file) as tmp:
        torch.save(model, tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            prefix = archive.namelist()[0].split("/")[0]
            archive.writestr(f"{prefix}/{MARKER_ENTRY}", json.dumps({"written_by": "quanta", "version": __version__}))
        fault_delay("model-file-written")
    return Path(path)
