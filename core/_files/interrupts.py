"""Ctrl-C and SIGTERM are honoured, even inside libraries that swallow them (``quanta._files.interrupts``).

coremltools' converter catches exceptions with bare ``except:`` clauses in places, so a
``KeyboardInterrupt`` raised while it converts can be swallowed and the export then "succeeds".
:func:`honour_interrupts` records every SIGINT/SIGTERM that arrives within its block (and still
raises at once, to stop the work where it is not swallowed); when the block ends, normally or by
any other exception, a recorded signal is raised again, and :func:`quanta._files.atomic` writes
check for one (:func:`raise_if_interrupted`) before putting a new copy in place. The ``quanta`` command turns SIGTERM into
:class:`Terminated` (a ``KeyboardInterrupt``), so a terminated run cleans up exactly as a Ctrl-C'd
one does and exits with 143. :func:`signals_deferred` keeps both signals waiting through a step that must not stop halfway.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ["Terminated", "honour_interrupts", "interrupt_for", "raise_if_interrupted", "signals_deferred"]

#: Signals received within the active :func:`honour_interrupts` blocks (innermost last).
_received: list[list[int]] = []


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (raised by the ``quanta`` command's handler and by :func:`honour_interrupts`)."""


def interrupt_for(signum: int) -> KeyboardInterrupt:
    """The exception a signal becomes: :class:`Terminated` for SIGTERM, else ``KeyboardInterrupt``."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextmanager
def honour_interrupts() -> Iterator[None]:
    """Within the block, a SIGINT (or SIGTERM, where a Python handler already turns it into an
    exception) is raised as usual *and* remembered; if the block then ends without it (a bare
    ``except:`` swallowed it), it is raised again when the block ends. Outside the main thread,
    and for signals that are ignored or left to the system, it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    _received.append(received)

    def handler(signum, frame):
        received.append(signum)
        raise interrupt_for(signum)

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(signum)
        if callable(current):  # Python's default_int_handler, or the quanta command's SIGTERM handler
            previous[signum] = current
            signal.signal(signum, handler)
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        if received:  # the library turned the interrupt into its own error
            raise interrupt_for(received[0]) from exc
        raise
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        _received.remove(received)
    if received:
        raise interrupt_for(received[0])


def raise_if_interrupted() -> None:
    """Raise the signal an active :func:`honour_interrupts` block recorded, if any: a write calls
    this before it puts its new copy in place, so a swallowed Ctrl-C still leaves the old one."""
    for received in _received:
        if received:
            raise interrupt_for(received[0])



@contextmanager
def signals_deferred() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM (where a Python handler runs for them) are recorded,
    not acted on; when the block ends, the first one recorded goes to the handler it was meant
    for (``KeyboardInterrupt`` for Ctrl-C). For a step that must not stop halfway: an in-place run
    writing its values over the float weights it can no longer restore, and importing torch,
    whose import runs Python inside pybind11 callbacks, where a ``KeyboardInterrupt`` terminates
    the process ("terminate called after throwing an instance of 'pybind11::error_already_set'",
    SIGABRT) instead of unwinding. Outside the main thread no Python handler can interrupt the
    block, so it changes nothing there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(signum)
        if callable(current):
            previous[signum] = current
            signal.signal(signum, lambda num, frame: received.append((num, frame)))
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
    if received:
        num, frame = received[0]
        previous[num](num, frame)
