"""Import coremltools once, quietly: only when a Core ML model or exporter is used.

coremltools logs about ten lines when imported on Linux ("Failed to load _MLModelProxy ...",
untested torch and scikit-learn versions) through its ``coremltools`` logger. None of them is
actionable for quanta's users (quanta never calls the macOS-only runtime), so the first import
runs with that logger raised to ERROR and Python warnings ignored; both are restored after. Later
warnings from coremltools are left as they are.
"""

from __future__ import annotations

from typing import Any, Iterator

import logging
import sys
import warnings
from contextlib import contextmanager
from functools import partialmethod
from typing import Iterator

__all__ = ["import_coremltools", "quiet_conversion"]


def import_coremltools() -> Any:
    """The ``coremltools`` module, imported without its import-time log lines and warnings."""
    module = sys.modules.get("coremltools")
    if module is not None:
        return module
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import coremltools
    finally:
        logger.setLevel(level)
    return coremltools


@contextmanager
def quiet_conversion(verbose: bool = False) -> Iterator[None]:
    """Within the block, unless ``verbose``: coremltools' progress bars (tqdm) are off and its
    logger (``Tuple detected at graph output``...) shows errors only; both restored after. The
    exporter converts inside it, so the Python API is as quiet as the CLI (option ``verbose``)."""
    if verbose:
        yield
        return
    import tqdm

    logger = logging.getLogger("coremltools")
    level = logger.level
    init = tqdm.tqdm.__dict__["__init__"]
    tqdm.tqdm.__init__ = partialmethod(init, disable=True)
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tqdm.tqdm.__init__ = init
        logger.setLevel(level)
