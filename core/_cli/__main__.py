"""``python -m quanta._cli``: the ``quanta`` command."""

import sys

from quanta._cli import main

sys.exit(main())
