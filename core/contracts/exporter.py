"""The ``exporter`` contract: writes a quantized model to a file format."""

from __future__ import annotations

import abc
import os
from typing import Any, ClassVar

from .base import Plugin

__all__ = ["Exporter"]


class Exporter(Plugin):
    """Writes a quantized model to a file or directory.

    Required: :meth:`export`. Declared: ``suffix``, ``writes_directory``, ``grids``,
    ``can_verify``, ``staged``; options through ``config_class`` (validated when a recipe is loaded).
    Optional: :meth:`verify`, :meth:`check`, :meth:`stored_size`.
    """

    kind: ClassVar[str] = "exporter"
    #: The suffix of what it writes (``".mlpackage"``), or None; ``quanta.verify`` picks the
    #: exporter of a path by it.
    suffix: ClassVar[str | None] = None
    #: True when the output is a directory (written with ``quanta._files.atomic.atomic_dir``).
    writes_directory: ClassVar[bool] = False
    #: Grids (see ``quanta.contracts.GRIDS``) this format can store; records of other grids are
    #: refused before anything is written.
    grids: ClassVar[frozenset[str]] = frozenset({"affine"})
    #: True when :meth:`verify` can run a written file.
    can_verify: ClassVar[bool] = False
    #: True (recommended): core owns the destination. ``export`` gets a staging path to write
    #: (a file path that does not exist yet, or an empty directory when ``writes_directory``) and
    #: ``overwrite=True``; core renames the result onto the user's path atomically, marks it as
    #: quanta's (a ``.<name>.quanta`` sidecar for a file, the ``.quanta`` marker in a directory)
    #: so a re-export replaces it while a user's file needs ``overwrite=True``, and removes
    #: everything on failure. False: ``export`` writes the user's path itself through
    #: ``quanta._files.atomic``.
    staged: ClassVar[bool] = False

    @abc.abstractmethod
    def export(self, model: Any, path: str | os.PathLike, *, example_inputs: Any = None,
               overwrite: bool = False) -> str:
        """Write ``model`` to ``path``; return the path written.

        Options are in ``self.config`` (core passes a configured copy). ``example_inputs``: what
        a tracing exporter runs the model on (a tensor, tuple or dict of tensors). With
        ``staged = True``, ``path`` is core's staging path: write exactly there, plainly (core
        renames it into place and cleans up on failure). Otherwise write through
        ``quanta._files.atomic`` so a failure or Ctrl-C leaves no partial output and an existing
        path that quanta did not write is replaced only with ``overwrite=True``. Core has checked
        the records' grids against ``grids`` before calling."""

    def check(self, model: Any, example_inputs: Any = None) -> None:
        """Refuse, before any work, a model this format cannot hold (raise a ``quanta.QuantaError``
        naming the layer). Default: accept."""

    def stored_size(self, path: str | os.PathLike) -> Any:
        """The size of what :meth:`export` wrote at ``path``, with the quantized and float weights apart:
        a ``quanta._files.stored_size.StoredSize`` whose ``total`` is the sum of its files' sizes (the
        CLI prints it after exporting). Default: None, and the CLI adds up the files alone."""
        return None

    def verify(self, path: str | os.PathLike, against: Any, example_inputs: Any = None) -> dict:
        """Run the file at ``path`` and ``against`` (a torch model) on the same inputs and return
        error figures (``max_abs``, ``max_rel``, ``cosine``...). Only when ``can_verify``."""
        from quanta.errors import ConfigError

        raise ConfigError(f"exporter {self.name!r} cannot verify files")
