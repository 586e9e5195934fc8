"""Process memory during a long run: this process's peak resident size, and glibc handing
freed buffers back to the system between blocks (elsewhere these are no-ops)."""

from __future__ import annotations

import contextlib
import resource
from typing import Iterator

__all__ = ["freed_memory_returned", "peak_rss_bytes", "release_freed_memory"]


def peak_rss_bytes() -> int:
    """This process's peak resident size: ``VmHWM`` where /proc has it (``ru_maxrss`` also counts
    the peak of the parent that started this process: Linux keeps it across fork and exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_GLIBC_INITIAL_MMAP_THRESHOLD = 128 * 1024


@contextlib.contextmanager
def freed_memory_returned() -> Iterator[None]:
    """While the run lasts, buffers of 1 MiB and more get their own memory mapping (glibc), so
    what a block frees goes back to the system. By default glibc raises that threshold up to
    32 MiB as large buffers are freed and keeps freed buffers below it for reuse: the resident
    memory then grows with each block's differently sized temporaries. Elsewhere: no change."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        yield
        return
    if not mallopt(_M_MMAP_THRESHOLD, 1 << 20):
        yield
        return
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _GLIBC_INITIAL_MMAP_THRESHOLD)


def release_freed_memory() -> None:
    """Hand memory freed with a block back to the system (glibc's ``malloc_trim``; elsewhere nothing)."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
