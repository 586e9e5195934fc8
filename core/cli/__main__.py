"""``python -m quanta.cli``: the ``quanta`` command."""

import sys

from quanta.cli import main

sys.exit(main())
