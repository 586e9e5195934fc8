"""What kind of filesystem entry a path is, for errors that must not say "no file" about a device
(``quanta._files.kinds``): ``/dev/zero`` or a named pipe given as an input is refused as "not a
regular file" before anything reads it (reading ``/dev/zero`` never ends; a FIFO blocks)."""

from __future__ import annotations

import os
import stat

__all__ = ["special_kind", "not_regular_message"]

_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"))


def special_kind(path: str | os.PathLike) -> str | None:
    """``"a character device"``, ``"a block device"``, ``"a named pipe (FIFO)"`` or ``"a socket"``
    when ``path`` (links followed) is one of those; None for a regular file, a folder or nothing."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    for test, name in _KINDS:
        if test(mode):
            return name
    return None


def not_regular_message(path: str | os.PathLike, what: str) -> str | None:
    """``"<what> '/dev/zero' is not a regular file (it is a character device); ..."`` or None."""
    kind = special_kind(path)
    if kind is None:
        return None
    return (f"{what} {os.fspath(path)!r} is not a regular file (it is {kind}); quanta reads only regular files "
            "and folders: give the path of a file")
