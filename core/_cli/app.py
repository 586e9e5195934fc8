"""``main``: parse, run one command, and turn its outcome into an exit status and one line.

Exit status: 0 done; 2 the user's error (a ``QuantaError`` other than a plugin failure, or a
usage error) printed as ``quanta: error: ...``; 1 an internal error or a plugin's failure (one
line naming it); 130 interrupted (Ctrl-C: every write is atomic, so nothing partial is left);
143 terminated (SIGTERM, handled as Ctrl-C is).
``--debug`` or ``QUANTA_DEBUG=1`` prints the traceback as well.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback

from quanta._cli.output import Console, quiet_third_parties
from quanta._cli.parser import build_parser

__all__ = ["main", "EXIT_OK", "EXIT_INTERNAL", "EXIT_USER", "EXIT_INTERRUPTED", "EXIT_TERMINATED"]

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _status(exc: BaseException, console: Console) -> int:
    from quanta.errors import PluginError, QuantaError

    if isinstance(exc, PluginError):  # plugin code failed: not the user's mistake
        console.error(_one_line(exc))
        return EXIT_INTERNAL
    if isinstance(exc, QuantaError):
        console.error(_one_line(exc))
        return EXIT_USER
    console.error(f"internal error: {type(exc).__name__}: {_one_line(exc)} (run with --debug for the traceback "
                  "and please report it)")
    return EXIT_INTERNAL


def _terminate(signum, frame):
    from quanta._files.interrupts import Terminated

    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``quanta`` command; returns the exit status.

    SIGTERM is handled as Ctrl-C is (every staging folder removed; exit 143). Once interrupted,
    further Ctrl-Cs are ignored while quanta reports and exits (no traceback); run as the
    process's command (``argv`` None) that lasts until the process ends, called in-process the
    previous handlers are restored on return.
    """
    standalone = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)  # usage errors exit 2 with argparse's own one line
    debug = getattr(args, "debug", False) or os.environ.get("QUANTA_DEBUG", "").strip().lower() in ("1", "true", "yes")
    console = Console(quiet=getattr(args, "quiet", False), verbose=getattr(args, "verbose", False))
    in_main_thread = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}
    if in_main_thread and saved[signal.SIGTERM] == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        try:
            from quanta._cli.commands import COMMANDS
            from quanta._files.interrupts import signals_deferred

            with signals_deferred():  # a Ctrl-C inside torch's import would abort the process (SIGABRT)
                import torch  # noqa: F401  (every command but --help needs it)

            with quiet_third_parties(console):
                return COMMANDS[args.command](args, console)
        except KeyboardInterrupt as exc:
            if in_main_thread:  # the run is over: a second Ctrl-C must not interrupt the report
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if debug:
                traceback.print_exc()
            from quanta._files.interrupts import Terminated

            terminated = isinstance(exc, Terminated)
            console.error(f"{'terminated' if terminated else 'interrupted'}; nothing partial was written")
            return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except KeyboardInterrupt:  # a second signal while the first was being handled
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout closed early (``quanta plugins | head``): not an error; keep Python from complaining.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        if debug:
            traceback.print_exc()
        return _status(exc, console)
    finally:
        if not standalone:  # called in-process: give the caller its handlers back
            for signum, handler in saved.items():
                signal.signal(signum, handler)
