"""Size limits on what quanta reads from files (``docs/security.md``), shared by the readers of
saved directories (:mod:`quanta._files.untrusted`) and of recipes (:mod:`quanta._recipes.yaml_reader`).

- :func:`max_metadata_bytes`: the largest JSON/YAML metadata file read (``QUANTA_MAX_METADATA_BYTES``,
  64 MiB by default); :func:`check_size` applies it.
- :func:`memory_budget`: the bytes a model described by a file may take (``QUANTA_MAX_MODEL_BYTES``,
  the machine's physical memory by default); :func:`check_budget` applies it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Callable

from quanta.errors import ConfigError

__all__ = ["METADATA_ENV", "MODEL_BYTES_ENV", "DEFAULT_MAX_METADATA_BYTES", "max_metadata_bytes", "memory_budget",
           "check_budget", "check_size", "human_bytes"]

#: Environment variable overriding :data:`DEFAULT_MAX_METADATA_BYTES` (bytes, an integer).
METADATA_ENV = "QUANTA_MAX_METADATA_BYTES"
#: Largest JSON/YAML metadata file quanta reads (quanta_config.json, config.json, an index, a recipe).
DEFAULT_MAX_METADATA_BYTES = 64 * 2**20
#: Environment variable overriding the memory budget of a model built from a file's description.
MODEL_BYTES_ENV = "QUANTA_MAX_MODEL_BYTES"

ErrorType = Callable[..., Exception]


def _env_bytes(name: str) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"environment variable {name}={text!r} must be a positive number of bytes", name)
    return value


def max_metadata_bytes() -> int:
    """The size limit of a JSON/YAML metadata file: ``QUANTA_MAX_METADATA_BYTES`` or 64 MiB."""
    return _env_bytes(METADATA_ENV) or DEFAULT_MAX_METADATA_BYTES


def memory_budget() -> int:
    """Bytes a model described by a file may take: ``QUANTA_MAX_MODEL_BYTES``, else this machine's
    physical memory (16 GiB when that cannot be read)."""
    value = _env_bytes(MODEL_BYTES_ENV)
    if value:
        return value
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def human_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def check_budget(nbytes: int, what: str, error: ErrorType, name: str | None = None) -> None:
    """Raise ``error`` when ``nbytes`` (what ``what`` would allocate) is above :func:`memory_budget`."""
    budget = memory_budget()
    if nbytes > budget:
        raise error(f"{what} would take {human_bytes(nbytes)}, above the memory budget of {human_bytes(budget)}; "
                    f"nothing was allocated (set {MODEL_BYTES_ENV} to a larger number of bytes if this is "
                    "intended)", name)


def check_size(path: Path, what: str, error: ErrorType, max_bytes: int | None = None) -> int:
    """The size of the regular file ``path``; ``error`` when it is above the metadata limit."""
    limit = max_metadata_bytes() if max_bytes is None else max_bytes
    try:
        st = path.stat()
    except OSError as exc:
        raise error(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {str(path)!r} is not a regular file")
    if st.st_size > limit:
        raise error(f"{what} {str(path)!r} is {human_bytes(st.st_size)}, above the {human_bytes(limit)} limit for "
                    f"metadata files; it was not read (set {METADATA_ENV} to a larger number of bytes to "
                    "read it)")
    return st.st_size
