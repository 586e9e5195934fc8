"""``verify``: run a saved ``.mlpackage`` with the numpy reference runner and compare it with torch."""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
import torch

from quanta._run.exporting import DEFAULT_MIN_COSINE, verification_failures
from quanta.errors import ConfigError

from .ct_import import import_coremltools
from .inputs import flatten_outputs, torch_input
from .package_check import check_package

__all__ = ["verify_package", "verify_program", "package_inputs", "random_inputs", "MIN_COSINE", "within_tolerance"]

#: The smallest cosine similarity ``verify`` accepts (``quanta verify``'s documented default,
#: ``quanta._run.exporting.DEFAULT_MIN_COSINE``): fp16 rounding stays far above it; an fp16
#: overflow or a wrong conversion falls below.
MIN_COSINE = DEFAULT_MIN_COSINE


def within_tolerance(figures: Mapping[str, Any], min_cosine: float = MIN_COSINE) -> bool:
    """Whether ``verify`` figures pass ``quanta verify``'s default tolerance, per output: finite,
    ``max_rel`` at most ``DEFAULT_TOLERANCE`` and cosine at least ``min_cosine`` (one rule, the one
    ``quanta.verify`` and the CLI's "verified" line use: ``verification_failures``)."""
    return not verification_failures(dict(figures), min_cosine=min_cosine)


def package_inputs(program) -> list[tuple[str, tuple]]:
    """``[(name, shape)]`` of the ``main`` function's inputs, in declaration order (a flexible
    dimension is left symbolic, not an int)."""
    func = program.functions["main"]
    return [(name, tuple(int(d) if isinstance(d, (int, np.integer)) else d for d in var.shape))
            for name, var in func.inputs.items()]


def _is_integer_input(var) -> bool:
    from coremltools.converters.mil.mil import types

    return types.is_int(var.dtype) or types.is_bool(var.dtype)


def random_inputs(program, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal float32 inputs of the program's declared input shapes.

    Raises ConfigError for an integer input (token ids: only the caller knows the vocabulary)
    or a flexible shape: pass example inputs then."""
    rng = np.random.default_rng(seed)
    out = {}
    func = program.functions["main"]
    for name, shape in package_inputs(program):
        if _is_integer_input(func.inputs[name]):
            raise ConfigError(f"input {name!r} is an integer input (token ids): pass example_inputs", "example_inputs")
        if not all(isinstance(d, int) and d > 0 for d in shape):
            raise ConfigError(f"input {name!r} has a flexible shape {shape}: pass example_inputs", "example_inputs")
        out[name] = rng.standard_normal(shape).astype(np.float32)
    return out


def _tensor(v) -> torch.Tensor:
    return v.detach().cpu() if isinstance(v, torch.Tensor) else torch_input(np.asarray(v))


def _named_inputs(program, example_inputs: Any) -> tuple[dict[str, torch.Tensor], bool]:
    """(name -> torch input in the package's input order, keywords?)."""
    names = [n for n, _ in package_inputs(program)]
    if example_inputs is None:
        return {k: torch_input(v) for k, v in random_inputs(program).items()}, False
    if isinstance(example_inputs, Mapping):
        given = {k: _tensor(v) for k, v in example_inputs.items() if v is not None}
        if set(given) != set(names):
            raise ConfigError(f"example inputs {sorted(given)} do not match the package's inputs {names}",
                              "example_inputs")
        return {n: given[n] for n in names}, True
    if isinstance(example_inputs, (torch.Tensor, np.ndarray)):
        example_inputs = (example_inputs,)
    values = list(example_inputs)
    if len(values) != len(names):
        raise ConfigError(f"{len(values)} example inputs for a model with inputs {names}", "example_inputs")
    return {n: _tensor(v) for n, v in zip(names, values)}, False


def verify_package(path: str | os.PathLike, against: torch.nn.Module, example_inputs: Any = None) -> dict:
    """Run the package at ``path`` and ``against`` on the same inputs; return the worst figures.

    ``example_inputs``: a tensor or tuple (``against(*inputs)``), a dict name -> tensor
    (``against(**inputs)``, names = the package's input names), or None (seeded normal inputs;
    float inputs of fixed shape only). Integer inputs reach the runner as int32 and torch as int64.

    Returns ``{"max_abs", "max_rel", "cosine", "outputs": [names], "per_output": {name: figures},
    "min_cosine", "within_tolerance"}``: ``max_abs``/``max_rel`` are the largest and ``cosine`` the
    smallest over the outputs; ``within_tolerance``: :func:`within_tolerance` of these figures.
    The package is only read: no file in it is written or touched (its spec is parsed from its
    file, not opened through coremltools' package reader, which rewrites ``Manifest.json``).
    """
    from quanta.mil.program import load_program

    import_coremltools()
    check_package(path)
    return verify_program(load_program(os.fspath(path)), against, example_inputs)


def verify_program(program: Any, against: torch.nn.Module, example_inputs: Any = None) -> dict:
    """:func:`verify_package`'s figures for a MIL ``Program`` already in memory (a loaded package,
    or the program ``ct.convert`` built, as the exporter's overflow check uses it)."""
    from quanta.mil.runner import compare, declared_numpy_dtype, run

    inputs, keywords = _named_inputs(program, example_inputs)
    func = program.functions["main"]
    # Each input with its own dtype: the runner gets the declared one (int32 token ids, fp32...),
    # torch gets int64 for integer inputs (what nn.Embedding takes) and float32 otherwise.
    got = run(program, {n: t.numpy().astype(declared_numpy_dtype(func.inputs[n])) for n, t in inputs.items()})
    torch_inputs = {n: torch_input(t) for n, t in inputs.items()}
    with torch.no_grad():
        out = against.eval()(**torch_inputs) if keywords else against.eval()(*torch_inputs.values())
    ref = [t.detach().cpu().float().numpy() for t in flatten_outputs(out)]
    out_names = list(program.functions["main"].outputs)
    out_names = [v.name for v in out_names]
    if len(ref) != len(out_names):
        raise ConfigError(f"the torch model gives {len(ref)} outputs, the package {len(out_names)}", "against")
    per = {n: compare(got[n].astype(np.float32).reshape(r.shape), r) for n, r in zip(out_names, ref)}
    figures = {"max_abs": max(f["max_abs"] for f in per.values()),
               "max_rel": max(f["max_rel"] for f in per.values()),
               "cosine": min(f["cosine"] for f in per.values()),
               "outputs": out_names, "per_output": per, "min_cosine": MIN_COSINE}
    figures["within_tolerance"] = within_tolerance(figures)
    return figures
