"""``quanta.export`` and ``quanta.verify``: write a quantized model through an exporter plugin
and check a written file's numerics against a torch model."""

from __future__ import annotations

import os
from typing import Any

from quanta.errors import ConfigError
from quanta._run.export_checks import check_export
from quanta._run.guard import plugin_code
from quanta._recipes.options import make_config

__all__ = ["export", "run_exporter", "verify", "exporter_for_path", "check_export_grids"]


def _registry():
    from quanta import registry

    return registry


def check_export_grids(model: Any, exporter) -> None:
    """Refuse, before anything is written, a model holding records of a grid ``exporter`` cannot store."""
    import torch

    from quanta.record import records

    if not isinstance(model, torch.nn.Module):
        return
    for name, record in records(model).items():
        if record.grid not in exporter.grids:
            raise ConfigError(f"layer {name!r} holds a {record.grid!r}-grid record (scheme {record.spec.scheme!r}), "
                              f"which the {exporter.name!r} exporter cannot store (it stores: "
                              f"{', '.join(sorted(exporter.grids))}); nothing was written", "format")


def export(model: Any, path: str | os.PathLike, format: str = "coreml", example_inputs: Any = None, *,
           allow_float: bool = False, overwrite: bool = False, config: Any = None, **options) -> str:
    """Write ``model`` (e.g. the result of ``quanta.quantize``) to ``path`` with exporter ``format``.

    ``example_inputs`` (a tensor, a tuple of tensors, or a dict of named tensors) is needed by
    tracing exporters such as ``coreml``; the exporter's options are either ``config`` (an
    instance of its ``config_class``, e.g. a recipe's ``recipe.export.config``) or ``options``
    (its fields as keywords, e.g. ``minimum_deployment_target="iOS18"`` for coreml), validated
    before any work; the exporter receives them as its ``self.config``. An existing ``path``
    that quanta did not write is replaced only with ``overwrite=True``. ``allow_float``: export a
    torch model that holds no quanta records (refused otherwise: ``NotQuantizedError``). Before
    the exporter runs, the example input is run through the model (``ExampleInputError``) and the
    destination is checked (writable, room for the result: ``DestinationError``). Returns the
    written path.
    """
    try:
        entry = _registry().get("exporter", format)
    except KeyError as exc:
        raise ConfigError(str(exc), "format") from None
    if config is not None and options:
        raise ConfigError(f"pass the exporter's options either as config= or as keywords, not both "
                          f"(got config= and {', '.join(options)})", "config")
    config = make_config("exporter", format, config if config is not None else options, "export")
    exporter = entry.obj if config is None else entry.obj.with_config(config)
    check_export_grids(model, exporter)
    check_export(model, path, exporter, example_inputs, allow_float=allow_float, overwrite=overwrite)
    with plugin_code(exporter):
        exporter.check(model, example_inputs)
    return run_exporter(exporter, model, path, example_inputs=example_inputs, overwrite=overwrite)


def run_exporter(exporter, model: Any, path: str | os.PathLike, *, example_inputs: Any = None,
                 overwrite: bool = False) -> str:
    """Call ``exporter.export``. For a ``staged`` exporter core owns the destination: the exporter
    writes to a staging path (``quanta._files.staging.staged_output``), core renames it onto
    ``path`` (with the exporter's suffix) and records ownership; the path written is returned."""
    if not exporter.staged:
        with plugin_code(exporter):
            return exporter.export(model, path, example_inputs=example_inputs, overwrite=overwrite)
    from quanta._files.staging import staged_output
    from quanta._run.export_checks import export_destination

    dest = export_destination(path, exporter)
    with staged_output(dest, directory=bool(exporter.writes_directory), overwrite=overwrite) as target:
        with plugin_code(exporter):
            exporter.export(model, target, example_inputs=example_inputs, overwrite=True)
    return dest


def exporter_for_path(path: str | os.PathLike):
    """The exporter entry whose declared ``suffix`` matches ``path`` (e.g. ``.mlpackage`` -> coreml)."""
    text = str(path).rstrip("/")
    for entry in _registry().entries("exporter"):
        if entry.obj.suffix and text.endswith(entry.obj.suffix):
            return entry
    raise ConfigError(f"no exporter writes files like {text!r} "
                      f"(exporters: {', '.join(_registry().names('exporter'))}); pass format=")


def verify(path: str | os.PathLike, against: Any, example_inputs: Any = None, format: str | None = None) -> dict:
    """Run the file at ``path`` (with the exporter's reference runner) and ``against`` (a torch
    model) on ``example_inputs``; returns error figures (``max_abs``, ``max_rel``, ``cosine``, ...)."""
    entry = _registry().get("exporter", format) if format else exporter_for_path(path)
    if not entry.obj.can_verify:
        raise ConfigError(f"exporter {entry.name!r} cannot verify files")
    with plugin_code(entry.obj):
        return entry.obj.verify(path, against, example_inputs=example_inputs)
