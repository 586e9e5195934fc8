"""Reading files that may come from someone else (a downloaded saved directory, a transformers
model folder, an ``.mlpackage``, a recipe): bounded, confined, and never ambiguous.

- :func:`read_json`: a JSON file no larger than :func:`max_metadata_bytes` (64 MiB unless
  ``QUANTA_MAX_METADATA_BYTES`` says otherwise), with a key written twice refused (a reader of
  the first and a reader of the last must not see different files) and nesting too deep for
  Python refused, all as one clear error naming the file.
- :func:`inside` / :func:`check_tree`: a path a file names (a shard, a manifest item) and every
  symlink under a directory must resolve inside that directory; absolute and ``..`` names and
  links out of it are refused naming the entry. A Hugging Face cache snapshot
  (``.../snapshots/<rev>/x -> ../../blobs/<hash>``) may link into its own ``blobs`` folder.
- :func:`memory_budget` / :func:`check_budget`: the bytes a model described by a file may take
  before it is built (the machine's memory unless ``QUANTA_MAX_MODEL_BYTES`` says otherwise).

See ``docs/security.md``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from quanta._limits import (DEFAULT_MAX_METADATA_BYTES, METADATA_ENV, MODEL_BYTES_ENV, check_budget, check_size,
                            human_bytes, max_metadata_bytes, memory_budget)

ErrorType = Callable[..., Exception]

__all__ = ["METADATA_ENV", "MODEL_BYTES_ENV", "DEFAULT_MAX_METADATA_BYTES", "max_metadata_bytes", "memory_budget",
           "check_budget", "check_size", "read_json", "loads_json", "inside", "resolve_inside", "check_tree",
           "DuplicateKeyError"]


class DuplicateKeyError(ValueError):
    """A JSON object names a key twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(key)
        out[key] = value
    return out


def loads_json(text: str | bytes, what: str, error: ErrorType) -> Any:
    """``json.loads`` refusing a duplicate key or too-deep nesting with ``error`` naming ``what``."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except DuplicateKeyError as exc:
        raise error(f"{what} names the key {exc.args[0]!r} twice in one object; quanta refuses ambiguous "
                    "files (a reader of the first and of the last would see different things)") from None
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except RecursionError:
        raise error(f"{what} is nested too deeply to read") from None
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_json(path: str | os.PathLike, what: str, error: ErrorType, max_bytes: int | None = None) -> Any:
    """The JSON document in ``path``, read within the metadata size limit (:func:`max_metadata_bytes`
    or ``max_bytes``), duplicate keys refused; every failure is ``error`` naming ``what`` and the file."""
    path = Path(path)
    limit = max_metadata_bytes() if max_bytes is None else max_bytes
    check_size(path, what, error, limit)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(limit + 1)  # never more than the limit, even if the file grows meanwhile
    except OSError as exc:
        raise error(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None
    if len(raw) > limit:
        raise error(f"{what} {str(path)!r} is above the {human_bytes(limit)} limit for metadata files "
                    f"(set {METADATA_ENV} to read it)")
    return loads_json(raw, f"{what} {str(path)!r}", error)


# ----------------------------------------------------------------------------- confined paths


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _allowed(target: Path, root: Path) -> bool:
    """``target`` (resolved) lies in ``root`` (resolved), or ``root`` is a Hugging Face cache
    snapshot and ``target`` is one of its repository's blobs."""
    if _within(target, root):
        return True
    return root.parent.name == "snapshots" and _within(target, root.parent.parent / "blobs")


def resolve_inside(root: str | os.PathLike, path: str | os.PathLike, what: str, error: ErrorType) -> Path:
    """``path`` (under ``root``) resolved, or ``error`` naming it when it, or a link on the way, leads
    out of ``root``."""
    root_real = Path(root).resolve()
    real = Path(path).resolve()
    if not _allowed(real, root_real):
        rel = os.path.relpath(path, root)
        raise error(f"{what} {rel!r} in {str(root)!r} leads outside it (to {str(real)!r}); quanta reads only "
                    "files inside the folder it was given (copy the file in instead of linking to it)", str(rel))
    return real


def inside(root: str | os.PathLike, name: Any, what: str, error: ErrorType) -> Path:
    """``root / name`` for a relative ``name`` a file inside ``root`` gave, checked to stay inside
    ``root``: an absolute name, a ``..`` part or a symlink out of ``root`` is ``error`` naming it."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise error(f"{what} {name!r} in {str(root)!r} is not a file name", str(name))
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise error(f"{what} {name!r} in {str(root)!r} is an absolute path or climbs out with '..'; files a "
                    "folder names must be inside it", name)
    path = Path(root) / name
    resolve_inside(root, path, what, error)
    return path


def check_tree(root: str | os.PathLike, what: str, error: ErrorType, max_entries: int = 100_000) -> None:
    """Raise ``error`` for the first symlink under ``root`` that leads out of it (links are not
    followed while walking); more than ``max_entries`` entries is refused too."""
    root = Path(root)
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            seen += 1
            if seen > max_entries:
                raise error(f"{what} {str(root)!r} holds more than {max_entries} files; not a model folder")
            entry = Path(dirpath) / name
            if entry.is_symlink():
                rel = os.path.relpath(entry, root)
                root_real, real = root.resolve(), entry.resolve()
                if not _allowed(real, root_real):
                    raise error(f"{rel!r} in {what} {str(root)!r} is a symlink leading outside it (to "
                                f"{str(real)!r}); quanta reads only files inside the folder it was given "
                                "(copy the file in instead of linking to it)", rel)
