"""``quanta.export`` and ``quanta.verify``: write a quantized model through an exporter plugin
and check a written file's numerics against a torch model."""

from __future__ import annotations

import os
from typing import Any

from quanta.errors import ConfigError
from quanta._run.export_checks import check_export
from quanta._run.guard import plugin_code
from quanta._files.interrupts import honour_interrupts
from quanta._recipes.options import make_config

__all__ = ["export", "run_exporter", "verify", "exporter_for_path", "check_export_grids", "verification_failures",
           "DEFAULT_TOLERANCE", "DEFAULT_MIN_COSINE"]


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
    # A Ctrl-C inside the exporter is honoured even where the converter swallows it (coremltools'
    # bare ``except:``): remembered, and raised again when the exporter returns.
    with honour_interrupts():
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


#: Default largest ``max_rel`` (max |file - torch| / max |torch|) of each output for ``verify`` to pass.
DEFAULT_TOLERANCE = 0.05
#: Default smallest cosine similarity of each output for ``verify`` to pass.
DEFAULT_MIN_COSINE = 0.99


def verification_failures(figures: dict, tolerance: float | None = None,
                          min_cosine: float | None = None) -> list[str]:
    """Why ``figures`` (what an exporter's ``verify`` returns) miss the tolerance, one text per
    output and figure; ``[]`` when every output passes.

    An output passes when its ``max_rel`` (max |file - torch| / max |torch|) is at most
    ``tolerance`` (default :data:`DEFAULT_TOLERANCE`, 0.05), its ``cosine`` at least
    ``min_cosine`` (default :data:`DEFAULT_MIN_COSINE`, 0.99) and every figure is finite (an
    inf or NaN output fails). Figures without ``per_output`` are taken as one output.
    """
    import math

    tolerance = DEFAULT_TOLERANCE if tolerance is None else float(tolerance)
    min_cosine = DEFAULT_MIN_COSINE if min_cosine is None else float(min_cosine)
    per = figures.get("per_output") or {"output": figures}
    out = []
    for name, f in per.items():
        max_abs, max_rel, cosine = (float(f.get(k, math.nan)) for k in ("max_abs", "max_rel", "cosine"))
        if not all(math.isfinite(v) for v in (max_abs, max_rel, cosine)):
            out.append(f"output {name!r} is not finite (max_abs {max_abs:.3g}, max_rel {max_rel:.3g}, cosine "
                       f"{cosine:.3g}): inf or NaN in the file's or the torch model's output")
            continue
        if max_rel > tolerance:
            out.append(f"output {name!r}: max_rel {max_rel:.3g} > tolerance {tolerance:g}")
        if cosine < min_cosine:
            out.append(f"output {name!r}: cosine {cosine:.6f} < min_cosine {min_cosine:g}")
    return out


def verify(path: str | os.PathLike, against: Any, example_inputs: Any = None, format: str | None = None, *,
           tolerance: float | None = None, min_cosine: float | None = None) -> dict:
    """Run the file at ``path`` (with the exporter's reference runner) and ``against`` (a torch
    model) on ``example_inputs``; returns error figures (``max_abs``, ``max_rel``, ``cosine``, ...)
    plus ``passed`` (bool) and ``failures`` (texts), judged per output by
    :func:`verification_failures` (``tolerance``: largest ``max_rel``, default 0.05;
    ``min_cosine``: default 0.99; any inf or NaN fails). The file is only read."""
    entry = _registry().get("exporter", format) if format else exporter_for_path(path)
    if not entry.obj.can_verify:
        raise ConfigError(f"exporter {entry.name!r} cannot verify files")
    for name, value, low, high in (("tolerance", tolerance, 0.0, float("inf")), ("min_cosine", min_cosine, -1.0, 1.0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not low <= value <= high):
            raise ConfigError(f"{name} must be a number from {low:g} to {high:g}, got {value!r}", name)
    with plugin_code(entry.obj):
        figures = dict(entry.obj.verify(path, against, example_inputs=example_inputs))
    failures = verification_failures(figures, tolerance, min_cosine)
    figures.update(passed=not failures, failures=failures)
    return figures
