"""``main``: parse, run one command, and turn its outcome into an exit status and one line.

Exit status: 0 done; 2 the user's error (a ``QuantaError`` other than a plugin failure, or a
usage error) printed as ``quanta: error: ...``; 1 an internal error or a plugin's failure (one
line naming it); 130 interrupted (Ctrl-C: every write is atomic, so nothing partial is left).
``--debug`` or ``QUANTA_DEBUG=1`` prints the traceback as well.
"""

from __future__ import annotations

import os
import sys
import traceback

from quanta._cli.output import Console, quiet_third_parties
from quanta._cli.parser import build_parser

__all__ = ["main", "EXIT_OK", "EXIT_INTERNAL", "EXIT_USER", "EXIT_INTERRUPTED"]

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_INTERRUPTED = 0, 1, 2, 130


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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``quanta`` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)  # usage errors exit 2 with argparse's own one line
    debug = getattr(args, "debug", False) or os.environ.get("QUANTA_DEBUG", "").strip().lower() in ("1", "true", "yes")
    console = Console(quiet=getattr(args, "quiet", False), verbose=getattr(args, "verbose", False))
    from quanta._cli.commands import COMMANDS

    try:
        with quiet_third_parties(console):
            return COMMANDS[args.command](args, console)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        console.error("interrupted; nothing partial was written")
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
