"""``python -m quanta``: the ``quanta`` command (also what ``torchrun -m quanta`` runs)."""

from quanta._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
