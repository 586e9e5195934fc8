"""What quanta may replace: its own earlier output, and never the run's inputs or a user's folder.

**The marker.** Every directory quanta writes holds a ``.quanta`` file, JSON::

    {"written_by": "quanta", "tool": "quanta", "version": "0.x", "files": {"model.safetensors": 1234, ...},
     "folders": ["Data", ...]}

``files`` maps each file quanta wrote (a path relative to the directory, ``/``-separated) to its
size in bytes. A directory is quanta's own earlier output only when its marker parses as that
JSON **and** the directory holds exactly those files, at those sizes: a ``.quanta`` file of any
other content, or a folder holding a file quanta did not write (a README, eval results) or one
whose size changed since, is not quanta's to replace without ``overwrite``. The error names
those files. (A marker can of course be forged by someone who means to; this rule is about
never deleting a user's files by accident.) An empty folder holds nothing to lose and may be
written into.

**Never replaced, even with overwrite** (:func:`check_protected`): the root folder, the home
folder or a folder holding it, the working directory or a folder holding it, a mount point, and
any of the run's inputs (recipe, model code, data, input model directory or ``.mlpackage``) or
a folder holding one. A destination inside an input directory is refused too: input and output
must not be the same or nested.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from quanta.errors import DestinationError

__all__ = ["MARKER", "marker_content", "read_marker", "foreign_entries", "is_quanta_dir", "check_protected",
           "describe_entries"]

#: Name of the marker file quanta puts inside every directory it writes.
MARKER = ".quanta"

#: A marker larger than this is not one quanta wrote (its file list would be absurd).
_MARKER_MAX_BYTES = 4 << 20


def _tree(directory: Path) -> tuple[dict[str, int], list[str], list[str]]:
    """(regular files -> size, folders, other entries such as links) under ``directory``, relative,
    the marker itself left out; links are never followed."""
    files: dict[str, int] = {}
    folders: list[str] = []
    other: list[str] = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=False):
        base = Path(dirpath)
        for name in list(dirnames):
            rel = (base / name).relative_to(directory).as_posix()
            if (base / name).is_symlink():
                other.append(rel)
                dirnames.remove(name)
            else:
                folders.append(rel)
        for name in filenames:
            p = base / name
            rel = p.relative_to(directory).as_posix()
            if rel == MARKER:
                continue
            if p.is_symlink() or not p.is_file():
                other.append(rel)
            else:
                files[rel] = p.stat().st_size
    return files, folders, other


def marker_content(directory: str | os.PathLike) -> dict:
    """The marker JSON for ``directory`` as it is now (every file in it, with its size)."""
    from quanta import __version__

    files, folders, _other = _tree(Path(directory))
    return {"written_by": "quanta", "tool": "quanta", "version": __version__, "files": files,
            "folders": sorted(folders)}


def read_marker(directory: str | os.PathLike) -> dict | None:
    """The parsed ``.quanta`` marker of ``directory``, or None when there is none or it is not one
    quanta writes (not a regular file, too large, not JSON, wrong fields)."""
    path = Path(directory) / MARKER
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MARKER_MAX_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("tool") != "quanta" or data.get("written_by") != "quanta":
        return None
    files = data.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                              for k, v in files.items()):
        return None
    folders = data.get("folders", [])
    if not isinstance(folders, list) or not all(isinstance(f, str) for f in folders):
        return None
    return data


def foreign_entries(directory: str | os.PathLike) -> list[str] | None:
    """Entries of ``directory`` quanta did not write, per its marker: added files and folders,
    links, and files whose size changed (``"name (changed)"``), sorted. None when the directory
    has no valid marker; ``[]`` when it holds exactly what quanta wrote."""
    directory = Path(directory)
    marker = read_marker(directory)
    if marker is None:
        return None
    files, folders, other = _tree(directory)
    listed = marker["files"]
    known_folders = set(marker.get("folders", []))
    for name in listed:  # every folder on the way to a listed file is quanta's
        parts = name.split("/")[:-1]
        known_folders.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    out = [f"{name} (changed)" if name in listed else name
           for name, size in files.items() if listed.get(name) != size]
    out += [name for name in folders if name not in known_folders]
    out += other
    return sorted(out)


def is_quanta_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory quanta wrote and nobody changed since: a valid marker
    listing exactly the files it holds (see the module docstring)."""
    return Path(path).is_dir() and foreign_entries(path) == []


def describe_entries(entries: list[str], limit: int = 5) -> str:
    """``"a.txt, b.txt and 3 more"``."""
    shown = ", ".join(entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def check_protected(dest: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse a destination quanta must never replace or write into, ``overwrite`` or not.

    Raises :class:`~quanta.errors.DestinationError` when ``dest`` is the root folder, the home
    folder or holds it, the working directory or holds it, a mount point, or when it is one of
    ``inputs`` (the run's recipe, model code, data, input model), holds one, or lies inside one.
    """
    real = _real(dest)
    shown = repr(os.fspath(dest))
    if real == Path(real.anchor):
        raise DestinationError(f"{shown} is the root folder; quanta never replaces it: choose a new folder")
    home = _real(Path.home())
    if real == home or real in home.parents:
        what = "your home folder" if real == home else f"a folder holding your home folder {str(home)!r}"
        raise DestinationError(f"{shown} is {what}; quanta never replaces it, even with --overwrite: "
                               "choose a new folder")
    cwd = _real(os.getcwd())
    if real == cwd or real in cwd.parents:
        what = "the working directory" if real == cwd else f"a folder holding the working directory {str(cwd)!r}"
        raise DestinationError(f"{shown} is {what}; quanta never replaces it, even with --overwrite: "
                               "choose a new folder such as out/model")
    if os.path.lexists(real) and os.path.ismount(real):
        raise DestinationError(f"{shown} is a mount point, which cannot be replaced; write into a new folder "
                               "inside it instead")
    for item in inputs:
        if item is None or os.fspath(item) == "":
            continue
        ri = _real(item)
        named = repr(os.fspath(item))
        if ri == real:
            why = f"is the run's input {named}"
        elif real in ri.parents:
            why = f"holds the run's input {named}"
        elif ri in real.parents:
            why = f"lies inside the run's input {named}"
        else:
            continue
        raise DestinationError(f"the output {shown} {why}; writing there would replace or change it, even with "
                               "--overwrite: choose an output outside the inputs")
