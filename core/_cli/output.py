"""Where the ``quanta`` command writes: results to stdout, everything else to stderr.

:class:`Console` holds the ``--quiet``/``--verbose`` choice: messages and progress go to stderr
unless quiet; progress is a tqdm bar when stderr is a terminal, else plain lines (one per
layer, a few per calibration run), and colour only on a terminal without ``NO_COLOR``.
:func:`quiet_third_parties` hides other libraries' warnings, log lines and progress bars
(coremltools, transformers, torch) unless ``--verbose``; quanta's own warnings are still shown.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from contextlib import contextmanager
from functools import partialmethod
from typing import Any, Iterator, TextIO

__all__ = ["Console", "quiet_third_parties", "Progress"]


class Console:
    """Messages and progress on stderr, honouring ``quiet``, ``verbose``, a terminal and ``NO_COLOR``."""

    def __init__(self, quiet: bool = False, verbose: bool = False, stream: TextIO | None = None):
        self.quiet, self.verbose = quiet, verbose
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.color = self.tty and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"
        # A bar needs a width: a terminal reporting 0 columns (some CI pseudo-terminals) gets lines.
        self.bars = self.tty and _columns(self.stream) > 0

    def _paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def info(self, message: str) -> None:
        """A progress or status line (hidden by ``--quiet``)."""
        if not self.quiet:
            print(message, file=self.stream, flush=True)

    def warning(self, message: str) -> None:
        """A warning line (shown even with ``--quiet``: it may change what a result means)."""
        print(f"quanta: {self._paint('warning', '33')}: {message}", file=self.stream, flush=True)

    def error(self, message: str) -> None:
        """The one ``quanta: error: ...`` line."""
        print(f"quanta: {self._paint('error', '31;1')}: {message}", file=self.stream, flush=True)

    def progress(self, total: int | None, desc: str, unit: str = "it") -> "Progress":
        """A progress display of ``total`` steps (None: unknown)."""
        return Progress(self, total, desc, unit)


def _columns(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


class Progress:
    """A tqdm bar on a terminal, else plain lines; nothing with ``--quiet``.

    ``step(label, detail)`` advances by one. In plain mode every step prints a line when
    ``every_line`` (layers), else about ten lines over the run (calibration batches).
    """

    def __init__(self, console: Console, total: int | None, desc: str, unit: str = "it", every_line: bool = True):
        self.console, self.total, self.desc, self.unit = console, total, desc, unit
        self.every_line = every_line
        self.count = 0
        self.start = time.perf_counter()
        self.bar = None
        if not console.quiet and console.bars:
            from tqdm import tqdm

            # disable=False: the TQDM_DISABLE set for third-party bars must not hide ours.
            self.bar = tqdm(total=total, desc=desc, unit=unit, file=console.stream, leave=True, disable=False,
                            dynamic_ncols=True, colour=None)

    def step(self, label: str = "", detail: str = "") -> None:
        """One step done (``label``: what, e.g. a layer name; ``detail``: e.g. its error)."""
        self.count += 1
        if self.console.quiet:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"{label} {detail}".strip()[:60], refresh=False)
            self.bar.update(1)
            return
        total = self.total or 0
        if not self.every_line and total > 10 and self.count % max(1, total // 10) and self.count != total:
            return
        elapsed = time.perf_counter() - self.start
        of = f"{self.count}/{total}" if total else str(self.count)
        self.console.info(f"  [{of}] {self.desc} {label:<40} {detail}  {elapsed:6.1f}s".rstrip())

    def close(self) -> None:
        """End the display."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _quanta_dirs() -> tuple[str, ...]:
    dirs = []
    for name in ("quanta", "quanta.plugins", "quanta.registry", "quanta.compat", "quanta.fx", "quanta.mil",
                 "quanta.examples"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            dirs.append(str(Path(module.__file__).resolve().parent) + os.sep)
    return tuple(dirs)


@contextmanager
def quiet_third_parties(console: Console) -> Iterator[None]:
    """Within the block, unless ``console.verbose``: hide other libraries' warnings, logging and
    progress bars; everything (warning filters, logger levels, environment) is restored after.

    quanta's own warnings (raised from quanta's modules, or of a quanta warning class) are
    printed as one ``quanta: warning: ...`` line each.
    """
    if console.verbose:
        yield
        return
    # Third-party progress bars (coremltools' conversion passes) and hub/transformers chatter.
    env = {"TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    saved_env = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    loggers = [logging.getLogger(n) for n in ("", "coremltools", "transformers", "torch", "huggingface_hub",
                                              "sentence_transformers")]
    saved_levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)

    def show(message, category, filename, lineno, file=None, line=None):
        ours = category.__module__.startswith("quanta") or str(Path(filename).resolve()).startswith(_quanta_dirs())
        if ours:
            console.warning(str(message))

    # tqdm reads TQDM_DISABLE when first imported: also make bars off by default on the class (a bar
    # asking for disable=False explicitly, as ours do, still shows).
    import tqdm

    init = tqdm.tqdm.__dict__["__init__"]
    tqdm.tqdm.__init__ = partialmethod(init, disable=True)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            warnings.simplefilter("default")
            yield
    finally:
        tqdm.tqdm.__init__ = init
        for lg, level in zip(loggers, saved_levels):
            lg.setLevel(level)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
