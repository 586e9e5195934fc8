"""``quanta.export`` and ``quanta.verify``: write a quantized model through an exporter plugin
and check a written file's numerics against a torch model."""

from __future__ import annotations

import os
from typing import Any

from .errors import ConfigError
from .export_checks import check_export

__all__ = ["export", "verify", "exporter_for_path"]


def _registry():
    from quanta import registry

    return registry


def export(model: Any, path: str | os.PathLike, format: str = "coreml", example_inputs: Any = None, *,
           allow_float: bool = False, overwrite: bool = False, **options) -> str:
    """Write ``model`` (e.g. the result of ``quanta.quantize``) to ``path`` with exporter ``format``.

    ``example_inputs`` (a tensor or tuple of tensors) is needed by tracing exporters such as
    ``coreml``; ``options`` go to the exporter (``minimum_deployment_target=...`` for coreml).
    ``allow_float``: export a torch model that holds no quanta records (refused otherwise:
    ``NotQuantizedError``). ``overwrite``: replace an existing ``path`` quanta did not write
    (quanta's own earlier output is always replaced). Before the exporter runs, the example
    input is run through the model (``ExampleInputError``) and the destination is checked
    (``DestinationError``); the write itself is atomic. Returns the written path.
    """
    entry = _registry().get("exporter", format)
    check_export(model, path, entry.obj, example_inputs, allow_float=allow_float, overwrite=overwrite)
    if overwrite:
        options["overwrite"] = True
    return entry.obj.export(model, path, example_inputs=example_inputs, **options)


def exporter_for_path(path: str | os.PathLike):
    """The exporter entry whose ``suffix`` matches ``path`` (e.g. ``.mlpackage`` -> coreml)."""
    text = str(path).rstrip("/")
    for entry in _registry().entries("exporter"):
        suffix = getattr(entry.obj, "suffix", None)
        if suffix and text.endswith(suffix):
            return entry
    raise ConfigError(f"no exporter writes files like {text!r} "
                      f"(exporters: {', '.join(_registry().names('exporter'))})")


def verify(path: str | os.PathLike, against: Any, example_inputs: Any = None, format: str | None = None) -> dict:
    """Run the file at ``path`` (with the exporter's reference runner) and ``against`` (a torch
    model) on ``example_inputs``; returns error figures (``max_abs``, ``max_rel``, ``cosine``, ...)."""
    entry = _registry().get("exporter", format) if format else exporter_for_path(path)
    if not callable(getattr(entry.obj, "verify", None)):
        raise ConfigError(f"exporter {entry.name!r} cannot verify files")
    return entry.obj.verify(path, against, example_inputs=example_inputs)
