"""Core-owned export destinations: an exporter declaring ``staged = True`` writes to a path core
hands it, and core owns the atomic rename and the ownership marker.

A file is written inside a fresh staging folder beside its destination, under the destination's
own name (so a writer that appends a suffix, such as ``np.savez``, sees the name it expects);
when the exporter returns, core fsyncs it, renames it onto the destination and records
ownership. A directory is written into an ``atomic_dir`` staging directory (the ``.quanta``
marker inside marks it). On any exception, Ctrl-C included, the staging folder is removed and
the destination is as it was.

**The ownership record of a file** is a sidecar beside it, ``.<name>.quanta`` (JSON:
``written_by``, quanta ``version``, ``size`` and ``sha256`` of the file). A file is quanta's own
earlier output only while the sidecar's size and digest match it, so a user's file that later
took the name (or a stale sidecar) is never treated as quanta's: replacing it needs
``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from quanta._files.atomic import _fsync_dir, atomic_dir, check_destination
from quanta.errors import DestinationError

__all__ = ["staged_output", "is_quanta_file", "file_marker", "FILE_MARKER_SUFFIX"]

#: The sidecar ``.<name>.quanta`` beside a file quanta wrote (see the module docstring).
FILE_MARKER_SUFFIX = ".quanta"


def file_marker(path: str | os.PathLike) -> Path:
    """The ownership sidecar of the file at ``path``: ``<folder>/.<name>.quanta``."""
    path = Path(path)
    return path.with_name(f".{path.name}{FILE_MARKER_SUFFIX}")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_quanta_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a file quanta wrote through :func:`staged_output` and nobody changed
    since: its sidecar exists and records the file's current size and sha256."""
    path = Path(path)
    try:
        record = json.loads(file_marker(path).read_text())
        return (path.is_file() and record.get("written_by") == "quanta" and record.get("size") == path.stat().st_size
                and record.get("sha256") == _digest(path))
    except (OSError, ValueError, AttributeError):
        return False


def _write_file_marker(dest: Path, size: int, digest: str) -> None:
    from quanta import __version__

    marker = file_marker(dest)
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps({"written_by": "quanta", "version": __version__, "size": size, "sha256": digest}) + "\n")
    os.replace(tmp, marker)


@contextmanager
def staged_output(dest: str | os.PathLike, *, directory: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """``with staged_output(dest) as target: write(target)``: the path an exporter writes to.

    ``directory=False``: ``target`` is ``<staging folder>/<dest's name>``, not yet existing; the
    block must leave a file there, which then replaces ``dest`` atomically and gets its ownership
    sidecar. ``directory=True``: ``target`` is an empty staging directory to fill, swapped in for
    ``dest`` (``quanta._files.atomic.atomic_dir``). An existing ``dest`` that is not quanta's own
    earlier output needs ``overwrite=True`` (``DestinationExistsError`` otherwise). On any
    exception nothing is left behind and ``dest`` is untouched.
    """
    dest = check_destination(dest, overwrite=overwrite, owned=is_quanta_file, directory=directory)
    if directory:
        with atomic_dir(dest, overwrite=True) as staging:  # ownership was checked just above
            yield staging
        return
    room = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".quanta-staging", dir=dest.parent))
    try:
        target = room / dest.name
        yield target
        if not target.is_file():
            raise DestinationError(f"the exporter wrote no file at the staging path {str(target)!r} for "
                                   f"{str(dest)!r} (a staged exporter writes exactly the path it is given)")
        with open(target, "rb+") as fh:
            os.fsync(fh.fileno())
        size, digest = target.stat().st_size, _digest(target)
        os.replace(target, dest)
        _write_file_marker(dest, size, digest)
        _fsync_dir(dest.parent)
    finally:
        shutil.rmtree(room, ignore_errors=True)
