"""Atomic writes: every file or directory quanta writes for a user goes through here.

A file is written to a temporary path beside its destination, fsynced and renamed onto it. A
directory (an ``.mlpackage``, a saved model) is written into a staging directory beside its
destination and swapped in: on Linux with ``renameat2(RENAME_EXCHANGE)``, elsewhere by first
renaming the old copy to a named backup that is removed only once the new copy is in place. At
every instant the destination, or its backup, holds a complete copy; an exception or Ctrl-C
leaves the destination as it was.

quanta marks the directories it writes (a ``.quanta`` file inside listing the files it wrote,
:mod:`quanta._files.ownership`), so writing onto quanta's own earlier output replaces it, while any
other existing destination, or quanta's output with files a user added, needs ``overwrite=True``;
the run's inputs, the working directory, the home folder, a mount point and ``/`` are never
replaced. Files are recognised by an ``owned(path) -> bool`` predicate their writer passes (for
example a field in a safetensors header).

Staging folders and temporary files carry the writer's process id in their names
(``.<name>.<pid>.<random>.quanta-staging``); a run killed with SIGKILL leaves one behind, and the
next write to the same destination removes it (its process is gone) with a warning. A disk that
fills up (ENOSPC, EDQUOT) or a file over the size limit (EFBIG) becomes one
:class:`~quanta.errors.DestinationError` line naming the path and the bytes needed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import re
import shutil
import stat
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from quanta._files.faults import fault_delay
from quanta._files.interrupts import raise_if_interrupted
from quanta._files.ownership import (MARKER, check_protected, describe_entries, foreign_entries, is_quanta_dir,
                                     marker_content)
from quanta.errors import DestinationError, DestinationExistsError

__all__ = ["atomic_file", "atomic_dir", "check_destination", "is_quanta_dir", "MARKER", "remove_leftovers",
           "LeftoverWarning", "disk_error"]

Owned = Callable[[Path], bool]

_LEFTOVER_KINDS = ("staging", "backup", "tmp")


class LeftoverWarning(UserWarning):
    """A staging folder or temporary file of an earlier, killed run was found beside a destination."""


def _overwrite_hint() -> str:
    return "pass overwrite=True (CLI: --overwrite) to replace it, or choose another path"


def _check_existing(dest: Path, owned: Owned | None) -> None:
    """Raise DestinationExistsError unless the existing ``dest`` is quanta's to replace."""
    if dest.is_dir() and not dest.is_symlink():
        foreign = foreign_entries(dest)
        if foreign == []:
            return
        if foreign is None:
            entries = sorted(e.name for e in dest.iterdir())
            if not entries:
                return  # an empty folder: nothing in it to lose
            forged = "; its .quanta file is not a marker quanta writes" if (dest / MARKER).exists() else ""
            raise DestinationExistsError(f"{str(dest)!r} already exists and was not written by quanta (it holds "
                                         f"{describe_entries(entries)}{forged}); {_overwrite_hint()}")
        raise DestinationExistsError(
            f"{str(dest)!r} is quanta's earlier output, but holds files quanta did not write: "
            f"{describe_entries(foreign)}; quanta never deletes them: move them out first, or "
            f"{_overwrite_hint()}")
    if owned is not None and not dest.is_symlink():
        try:
            if owned(dest):
                return
        except Exception:  # an unreadable file is simply not recognised as ours
            pass
    raise DestinationExistsError(f"{str(dest)!r} already exists and was not written by quanta; {_overwrite_hint()}")


def check_destination(dest: str | os.PathLike, *, expected_bytes: int | None = None, overwrite: bool = False,
                      owned: Owned | None = None, directory: bool = False,
                      inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Check, before long work, that ``dest`` can be written; returns it as a Path.

    Raises :class:`~quanta.errors.DestinationExistsError` when ``dest`` exists and is not quanta's
    own unchanged earlier output (:mod:`quanta._files.ownership`) and ``overwrite`` is false, and
    :class:`~quanta.errors.DestinationError` when it is empty, must never be replaced (the root,
    home or working directory, a mount point, one of ``inputs``, the run's input files and
    folders, or nested with one), its kind is wrong (a file where a directory goes, or the
    reverse), its parent cannot be created or written, or the disk has less than
    ``expected_bytes`` free. Removes what killed earlier runs left beside it
    (:func:`remove_leftovers`); creates nothing but missing parent directories.
    """
    if os.fspath(dest) == "":
        raise DestinationError("the output path is empty; give a file or folder name such as out/model")
    dest = Path(dest)
    check_protected(dest, inputs)
    if dest.exists() or dest.is_symlink():
        if directory and not dest.is_dir():
            raise DestinationError(f"{str(dest)!r} exists and is not a directory; remove it or choose another path")
        if not directory and dest.is_dir():
            raise DestinationError(f"{str(dest)!r} is a directory; a file goes there: choose another path")
        if not overwrite:
            _check_existing(dest, owned)
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DestinationError(f"cannot create the folder {str(parent)!r} for {str(dest)!r}: {exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DestinationError(f"the folder {str(parent)!r} is not writable; choose another path for {dest.name!r}")
    remove_leftovers(dest)
    if expected_bytes:
        free = shutil.disk_usage(parent).free
        if free < expected_bytes:
            raise DestinationError(f"{str(parent)!r} has {free / 2**20:.1f} MiB free, but about "
                                   f"{expected_bytes / 2**20:.1f} MiB will be written to {dest.name!r}")
    return dest


def _leftover_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(\d+)\.[A-Za-z0-9_]+\.quanta-({'|'.join(_LEFTOVER_KINDS)})$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


def _remove(path: Path, pause: str | None = None) -> None:
    """Remove a file or folder; a Ctrl-C meanwhile is held back until it is gone, then re-raised
    (``pause``: a :mod:`quanta._files.faults` point, tests only)."""
    interrupted = False
    while True:
        try:
            if pause is not None:
                pause, point = None, pause
                fault_delay(point)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                path.unlink()
            break
        except KeyboardInterrupt:
            interrupted = True
        except OSError:
            break
    if interrupted:
        raise KeyboardInterrupt


def remove_leftovers(dest: str | os.PathLike) -> list[str]:
    """Remove the staging folders, backups and temporary files that killed runs (their process is
    gone) left beside ``dest``; returns their names and warns (:class:`LeftoverWarning`).

    A backup found while ``dest`` itself is missing is the previous copy, caught between the two
    renames of a swap: it is put back at ``dest`` rather than removed.
    """
    dest = Path(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    pattern = _leftover_pattern(dest.name)
    try:
        names = [n for n in os.listdir(parent) if pattern.match(n)]
    except OSError:
        return []
    found = []
    for name in sorted(names):
        match = pattern.match(name)
        if _alive(int(match.group(1))):
            continue  # a run writing the same destination right now
        path = parent / name
        if match.group(2) == "backup" and not os.path.lexists(dest):
            os.rename(path, dest)
            found.append(f"{name} (put back as {dest.name!r})")
            continue
        _remove(path)
        found.append(name)
    if found:
        warnings.warn(f"removed what an interrupted earlier run left beside {str(dest)!r}: {', '.join(found)}",
                      LeftoverWarning, stacklevel=3)
    return found


def _prefix(dest: Path) -> str:
    return f".{dest.name}.{os.getpid()}."


_DISK_ERRNOS = {errno.ENOSPC: "no space left", errno.EDQUOT: "the disk quota is used up",
                errno.EFBIG: "a file grew past the largest size allowed"}
_DISK_TEXTS = {"no space left on device": errno.ENOSPC, "disk quota exceeded": errno.EDQUOT,
               "file too large": errno.EFBIG, "storagefull": errno.ENOSPC, "filetoolarge": errno.EFBIG}


def _disk_errno(exc: BaseException) -> int | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
            return exc.errno
        text = str(exc).lower().replace(" ", "")
        for needle, code in _DISK_TEXTS.items():
            if needle.replace(" ", "") in text:
                return code
        exc = exc.__cause__ or exc.__context__
    return None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def disk_error(exc: BaseException, dest: str | os.PathLike, written: int = 0,
               expected_bytes: int | None = None) -> DestinationError | None:
    """A one-line :class:`DestinationError` for a disk-full (ENOSPC, EDQUOT) or file-too-large
    (EFBIG) failure while writing ``dest`` (``written`` bytes so far; ``expected_bytes``: the
    estimate, when known), or None when ``exc`` is something else. Looks through chained
    exceptions and the texts libraries (safetensors, torch) wrap the OS error in."""
    code = _disk_errno(exc)
    if code is None:
        return None
    dest = Path(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        free = None
    need = max(expected_bytes or 0, written)
    needed = (f"about {need / 2**20:.1f} MiB ({need} bytes) are needed" if expected_bytes
              else f"more than the {written} bytes written when it failed are needed")
    if code == errno.EFBIG:
        return DestinationError(
            f"cannot write {str(dest)!r}: {_DISK_ERRNOS[code]} (the file-size limit, `ulimit -f`, or the file "
            f"system's maximum); {needed}. Nothing was written; raise the limit or choose another disk")
    room = f", {free} bytes free" if free is not None else ""
    return DestinationError(f"cannot write {str(dest)!r}: {_DISK_ERRNOS[code]} on its disk; {needed}{room}. "
                            "Nothing was written (any earlier copy is kept); free space or choose another path")


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
def atomic_file(dest: str | os.PathLike, *, overwrite: bool = False, owned: Owned | None = None,
                expected_bytes: int | None = None) -> Iterator[Path]:
    """Write a file atomically: ``with atomic_file(dest) as tmp: write(tmp)``.

    ``tmp`` is a path beside ``dest`` that does not exist yet. When the block ends normally the
    file is fsynced and renamed onto ``dest``; on any exception (Ctrl-C included) it is removed
    and ``dest`` is untouched. The existing-destination rule of :func:`check_destination` applies
    (``owned`` recognises quanta's own earlier file). A full disk or a file over the size limit
    raises :class:`~quanta.errors.DestinationError` naming ``dest`` and the bytes needed.
    """
    dest = check_destination(dest, overwrite=overwrite, owned=owned)
    fd, name = tempfile.mkstemp(prefix=_prefix(dest), suffix=".quanta-tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()
    try:
        try:
            yield tmp
            raise_if_interrupted()
            if not tmp.exists():
                raise DestinationError(f"nothing was written for {str(dest)!r}")
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
        except Exception as exc:
            error = disk_error(exc, dest, _size(tmp) if tmp.exists() else 0, expected_bytes)
            if error is None:
                raise
            raise error from exc
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


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
    content = marker_content(directory)
    (directory / MARKER).write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")


@contextmanager
def atomic_dir(dest: str | os.PathLike, *, overwrite: bool = False, expected_bytes: int | None = None,
               inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Write a directory atomically: ``with atomic_dir(dest) as staging: write into staging``.

    ``staging`` is an empty directory beside ``dest``. When the block ends normally a ``.quanta``
    marker listing every file written is added and ``staging`` is swapped in for ``dest`` (the
    old copy, if any, is removed after the swap). On any exception (Ctrl-C included) ``staging``
    is removed and ``dest`` is untouched. An existing ``dest`` that is not quanta's unchanged
    earlier output needs ``overwrite=True``; ``inputs`` and the folders of :func:`check_destination`
    are never replaced. A full disk raises :class:`~quanta.errors.DestinationError` naming
    ``dest`` and the bytes needed.
    """
    dest = check_destination(dest, overwrite=overwrite, directory=True, inputs=inputs)
    staging = Path(tempfile.mkdtemp(prefix=_prefix(dest), suffix=".quanta-staging", dir=dest.parent))
    try:
        try:
            yield staging
            raise_if_interrupted()  # a Ctrl-C the writer's library swallowed: keep the old copy
            _write_marker(staging)
            _fsync_tree(staging)
        except Exception as exc:
            error = disk_error(exc, dest, _size(staging), expected_bytes)
            if error is None:
                raise
            raise error from exc
        if not dest.exists():
            os.rename(staging, dest)
        elif _exchange(staging, dest):
            pass  # staging now holds the old copy, removed below
        else:
            backup = Path(tempfile.mkdtemp(prefix=_prefix(dest), suffix=".quanta-backup", dir=dest.parent))
            os.rmdir(backup)
            os.rename(dest, backup)
            os.rename(staging, dest)
            staging = backup
        _fsync_dir(dest.parent)
    finally:
        if os.path.lexists(staging):
            _remove(staging, pause="staging-cleanup")
