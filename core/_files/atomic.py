"""Atomic writes: every file or directory quanta writes for a user goes through here.

A file is written to a temporary path beside its destination, fsynced and renamed onto it. A
directory (an ``.mlpackage``, a saved model) is written into a staging directory beside its
destination and swapped in: on Linux with ``renameat2(RENAME_EXCHANGE)``, elsewhere by first
renaming the old copy to a named backup that is removed only once the new copy is in place. At
every instant the destination, or its backup, holds a complete copy; an exception or Ctrl-C
leaves the destination as it was.

quanta marks the directories it writes (a ``.quanta`` file inside), so writing onto quanta's own
earlier output replaces it, while any other existing destination needs ``overwrite=True``.
Files are recognised by an ``owned(path) -> bool`` predicate their writer passes (for example a
field in a safetensors header).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from quanta.errors import DestinationError, DestinationExistsError

__all__ = ["atomic_file", "atomic_dir", "check_destination", "is_quanta_dir", "MARKER"]

#: Name of the marker file quanta puts inside every directory it writes.
MARKER = ".quanta"

Owned = Callable[[Path], bool]


def is_quanta_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory quanta wrote (it holds the ``.quanta`` marker)."""
    return (Path(path) / MARKER).is_file()


def _owned(dest: Path, owned: Owned | None) -> bool:
    if dest.is_dir():
        return is_quanta_dir(dest)
    if owned is None:
        return False
    try:
        return bool(owned(dest))
    except Exception:  # an unreadable file is simply not recognised as ours
        return False


def check_destination(dest: str | os.PathLike, *, expected_bytes: int | None = None, overwrite: bool = False,
                      owned: Owned | None = None, directory: bool = False) -> Path:
    """Check, before long work, that ``dest`` can be written; returns it as a Path.

    Raises :class:`~quanta.errors.DestinationExistsError` when ``dest`` exists, is not quanta's
    own earlier output and ``overwrite`` is false, and :class:`~quanta.errors.DestinationError`
    when its kind is wrong (a file where a directory goes, or the reverse), its parent cannot be
    created or written, or the disk has less than ``expected_bytes`` free. Creates nothing but
    missing parent directories.
    """
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        if directory and not dest.is_dir():
            raise DestinationError(f"{str(dest)!r} exists and is not a directory; remove it or choose another path")
        if not directory and dest.is_dir():
            raise DestinationError(f"{str(dest)!r} is a directory; a file goes there: choose another path")
        if not overwrite and not _owned(dest, owned):
            raise DestinationExistsError(
                f"{str(dest)!r} already exists and was not written by quanta; pass overwrite=True "
                f"(CLI: --overwrite) to replace it, or choose another path")
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DestinationError(f"cannot create the folder {str(parent)!r} for {str(dest)!r}: {exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DestinationError(f"the folder {str(parent)!r} is not writable; choose another path for {dest.name!r}")
    if expected_bytes:
        free = shutil.disk_usage(parent).free
        if free < expected_bytes:
            raise DestinationError(f"{str(parent)!r} has {free / 2**20:.1f} MiB free, but about "
                                   f"{expected_bytes / 2**20:.1f} MiB will be written to {dest.name!r}")
    return dest


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(dest: str | os.PathLike, *, overwrite: bool = False, owned: Owned | None = None) -> Iterator[Path]:
    """Write a file atomically: ``with atomic_file(dest) as tmp: write(tmp)``.

    ``tmp`` is a path beside ``dest`` that does not exist yet. When the block ends normally the
    file is fsynced and renamed onto ``dest``; on any exception (Ctrl-C included) it is removed
    and ``dest`` is untouched. The existing-destination rule of :func:`check_destination` applies
    (``owned`` recognises quanta's own earlier file).
    """
    dest = check_destination(dest, overwrite=overwrite, owned=owned)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".quanta-tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()
    try:
        yield tmp
        if not tmp.exists():
            raise DestinationError(f"nothing was written for {str(dest)!r}")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with renameat2(RENAME_EXCHANGE); False where unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _umask_modes() -> tuple[int, int]:
    """(file mode, folder mode) that the user's umask gives new files and folders."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask, 0o777 & ~mask


def _unprivate(path: str, mode: int) -> None:
    """Give ``path`` ``mode`` when tempfile left it private (0600 file, 0700 folder): what quanta
    writes is created with the umask, as any file the user writes."""
    try:
        if stat.S_IMODE(os.stat(path).st_mode) in (0o600, 0o700):
            os.chmod(path, mode)
    except OSError:
        pass


def _fsync_tree(root: Path) -> None:
    file_mode, dir_mode = _umask_modes()
    for dirpath, _dirs, files in os.walk(root):
        _unprivate(dirpath, dir_mode)
        for f in files:
            _unprivate(os.path.join(dirpath, f), file_mode)
            try:
                with open(os.path.join(dirpath, f), "rb") as fh:
                    os.fsync(fh.fileno())
            except OSError:
                pass
        _fsync_dir(Path(dirpath))


def _write_marker(directory: Path) -> None:
    from quanta import __version__

    (directory / MARKER).write_text(json.dumps({"written_by": "quanta", "version": __version__}) + "\n")


@contextmanager
def atomic_dir(dest: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Write a directory atomically: ``with atomic_dir(dest) as staging: write into staging``.

    ``staging`` is an empty directory beside ``dest``. When the block ends normally a ``.quanta``
    marker is added and ``staging`` is swapped in for ``dest`` (the old copy, if any, is removed
    after the swap). On any exception (Ctrl-C included) ``staging`` is removed and ``dest`` is
    untouched. An existing ``dest`` that quanta did not write needs ``overwrite=True``.
    """
    dest = check_destination(dest, overwrite=overwrite, directory=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".quanta-staging", dir=dest.parent))
    try:
        yield staging
        _write_marker(staging)
        _fsync_tree(staging)
        if not dest.exists():
            os.rename(staging, dest)
        elif _exchange(staging, dest):
            pass  # staging now holds the old copy, removed below
        else:
            backup = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".quanta-backup", dir=dest.parent))
            os.rmdir(backup)
            os.rename(dest, backup)
            os.rename(staging, dest)
            staging = backup
        _fsync_dir(dest.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
