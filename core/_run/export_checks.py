"""Checks ``quanta.export`` runs before an exporter converts anything (``quanta._run.export_checks``).

- A torch model holding no quanta records (never quantized) is refused unless
  ``allow_float=True``: a float package shipped by mistake looks like a quantized one.
- The example input is checked as *the example input*: a tensor or a tuple/list of tensors,
  finite, and accepted by the model (a dry forward in eval mode, no gradients); an error names
  its shape and the model's first layer.
- The destination is checked with :func:`quanta._files.atomic.check_destination` (parent writable,
  room for the expected size, an existing path quanta did not write needs ``overwrite``),
  with the exporter's ``suffix`` added as the exporter adds it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from quanta._files.atomic import check_destination
from quanta._run.data_checks import describe_batch, dry_forward, first_layer
from quanta.errors import ExampleInputError, NotQuantizedError
from quanta.record import records

__all__ = ["check_export", "check_example_inputs", "export_destination"]


def check_example_inputs(model: torch.nn.Module, example_inputs: Any) -> None:
    """Raise :class:`ExampleInputError` unless ``example_inputs`` (tensor or tuple of tensors) runs
    through ``model`` (a dict is passed as keyword inputs). None passes (the exporter says whether
    it needs one)."""
    if example_inputs is None:
        return
    if isinstance(example_inputs, Mapping):  # keyword inputs, by name
        named = list(example_inputs.items())
    else:
        items = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
        if not isinstance(items, (tuple, list)) or not items:
            raise ExampleInputError(f"the example input is a {type(example_inputs).__name__}; pass a tensor, a "
                                    "tuple of tensors (one per model input) or a dict of named tensors")
        named = list(enumerate(items))
    for i, t in named:
        if not isinstance(t, torch.Tensor):
            hint = " (convert it with torch.from_numpy)" if type(t).__module__ == "numpy" else ""
            raise ExampleInputError(f"example input {i!r} is a {type(t).__name__}, not a torch tensor{hint}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ExampleInputError(f"example input {i!r} (shape {tuple(t.shape)}) holds NaN or inf values; the "
                                    "exporter traces the model with it: pass finite values")
    call_with = example_inputs if isinstance(example_inputs, Mapping) else tuple(t for _, t in named)
    try:
        dry_forward(model, call_with)
    except Exception as exc:
        layer = first_layer(model)
        text = str(exc).strip().splitlines()
        shown = example_inputs if isinstance(example_inputs, torch.Tensor) else call_with
        raise ExampleInputError(
            f"the example input ({describe_batch(shown)}) does not fit the model: {type(exc).__name__}: "
            f"{text[0] if text else ''}{'; ' + layer if layer else ''}. Pass an example input of the shape "
            "the model takes (CLI: --input-shape)") from exc


def export_destination(path: str | os.PathLike, exporter: Any) -> str:
    """``path`` with the exporter's declared ``suffix`` added when missing (as exporters do)."""
    text = os.fspath(path).rstrip("/") or os.fspath(path)
    if exporter.suffix and not text.endswith(exporter.suffix):
        text += exporter.suffix
    return text


def check_quantized_through_backend(model: Any) -> None:
    """``allow_float`` for a model that is not a torch module: its backend lists its records
    (``Backend.records``); none, or a backend that cannot list them, is refused without ``allow_float``."""
    from quanta.errors import ConfigError
    from quanta._run.guard import plugin_code
    from quanta._run.pipeline import choose_backend

    try:
        backend = choose_backend(model).obj
    except ConfigError:
        return  # no backend accepts it: the exporter says what it takes
    try:
        with plugin_code(backend):
            held = backend.records(model)
    except ConfigError as exc:
        raise NotQuantizedError(f"quanta cannot tell whether this {type(model).__name__} is quantized: {exc}; pass "
                                "allow_float=True (CLI: --allow-float) to export it as it is") from None
    if not held:
        raise NotQuantizedError(
            f"the model holds no quantized weights (backend {backend.name!r} lists no records): quantize it first "
            "with quanta.quantize, or pass allow_float=True (CLI: --allow-float) to export its float weights on purpose")


def check_export(model: Any, path: str | os.PathLike, exporter: Any, example_inputs: Any = None, *,
                 allow_float: bool = False, overwrite: bool = False) -> None:
    """All checks of one ``quanta.export`` call, before the exporter runs (see the module docstring)."""
    if isinstance(model, torch.nn.Module):
        if not allow_float and not records(model):
            raise NotQuantizedError(
                "the model holds no quantized weights (it was never quantized, or quantize selected no layer): "
                "quantize it first with quanta.quantize, or pass allow_float=True (CLI: --allow-float) to "
                "export its float weights on purpose")
        check_example_inputs(model, example_inputs)
        expected = sum(2 * t.numel() for t in (*model.parameters(), *model.buffers()))
    else:
        expected = None
        if not allow_float:
            check_quantized_through_backend(model)
    dest = export_destination(path, exporter)
    directory = bool(exporter.writes_directory)
    from quanta._files.staging import is_quanta_file  # a file core staged carries an ownership sidecar

    check_destination(dest, overwrite=overwrite, directory=directory, expected_bytes=expected,
                      owned=is_quanta_file if exporter.staged else None)
