"""``verify``: run a saved ``.mlpackage`` with the numpy reference runner and compare it with torch."""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
import torch

from quanta.errors import ConfigError

from .ct_import import import_coremltools
from .package_check import check_package

__all__ = ["verify_package", "package_inputs", "random_inputs"]


def package_inputs(program) -> list[tuple[str, tuple[int, ...]]]:
    """``[(name, shape)]`` of the ``main`` function's inputs, in declaration order."""
    func = program.functions["main"]
    return [(name, tuple(int(d) for d in var.shape)) for name, var in func.inputs.items()]


def random_inputs(program, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal float32 inputs of the program's declared input shapes."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in package_inputs(program):
        if not all(isinstance(d, int) and d > 0 for d in shape):
            raise ConfigError(f"input {name!r} has a flexible shape {shape}: pass example_inputs", "example_inputs")
        out[name] = rng.standard_normal(shape).astype(np.float32)
    return out


def _named_inputs(program, example_inputs: Any) -> dict[str, np.ndarray]:
    names = [n for n, _ in package_inputs(program)]
    if example_inputs is None:
        return random_inputs(program)
    if isinstance(example_inputs, Mapping):
        return {k: np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float32)
                for k, v in example_inputs.items()}
    if isinstance(example_inputs, torch.Tensor) or isinstance(example_inputs, np.ndarray):
        example_inputs = (example_inputs,)
    values = list(example_inputs)
    if len(values) != len(names):
        raise ConfigError(f"{len(values)} example inputs for a model with inputs {names}", "example_inputs")
    return {n: np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float32)
            for n, v in zip(names, values)}


def _flatten(out) -> list[np.ndarray]:
    if isinstance(out, torch.Tensor):
        return [out.detach().cpu().float().numpy()]
    if isinstance(out, Mapping):
        return [a for v in out.values() for a in _flatten(v)]
    if isinstance(out, (tuple, list)):
        return [a for v in out for a in _flatten(v)]
    raise ConfigError(f"cannot compare a torch output of type {type(out).__name__}", "against")


def verify_package(path: str | os.PathLike, against: torch.nn.Module, example_inputs: Any = None) -> dict:
    """Run the package at ``path`` and ``against`` on the same inputs; return the worst figures.

    Returns ``{"max_abs", "max_rel", "cosine", "outputs": [names], "per_output": {name: figures}}``:
    ``max_abs``/``max_rel`` are the largest and ``cosine`` the smallest over the outputs.
    """
    from quanta.mil.program import load_program
    from quanta.mil.runner import compare, run

    import_coremltools()
    check_package(path)
    program = load_program(os.fspath(path))
    inputs = _named_inputs(program, example_inputs)
    got = run(program, inputs)
    names = [n for n, _ in package_inputs(program)]
    with torch.no_grad():
        ref = _flatten(against.eval()(*[torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in names]))
    out_names = list(program.functions["main"].outputs)
    out_names = [v.name for v in out_names]
    if len(ref) != len(out_names):
        raise ConfigError(f"the torch model gives {len(ref)} outputs, the package {len(out_names)}", "against")
    per = {n: compare(got[n].astype(np.float32).reshape(r.shape), r) for n, r in zip(out_names, ref)}
    return {"max_abs": max(f["max_abs"] for f in per.values()),
            "max_rel": max(f["max_rel"] for f in per.values()),
            "cosine": min(f["cosine"] for f in per.values()),
            "outputs": out_names, "per_output": per}
