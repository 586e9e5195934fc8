"""``python -m quanta.cli``: the ``quanta`` command."""

import signal
import sys

from quanta.cli import main

status = main()
# The work is done (or reported): a Ctrl-C landing during interpreter teardown must not turn the
# run into a death by signal (exit -2) after its outputs were written.
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.exit(status)
