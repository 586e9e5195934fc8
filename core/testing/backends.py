"""``check_backend``: the contract suite of ``quanta.contracts.Backend``."""

from __future__ import annotations

from typing import Any

import torch

from quanta.contracts import Backend, Unit

from .failure import check, raising_fails

__all__ = ["check_backend"]


def _key(units: list[Unit]) -> list[tuple]:
    return [(u.name, u.module_type, tuple(u.type_mro), u.param, tuple(u.shape), u.channel_axis, u.input_axis)
            for u in units]


def _weights(backend, model, units) -> dict[str, torch.Tensor]:
    return {u.name: backend.read_weight(model, u).detach().clone() for u in units}


def _same(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


def _record(backend, model, unit) -> Any:
    from quanta._records.spec import QuantSpec
    from quanta._run.weights import quantize_weight

    weight = backend.read_weight(model, unit)
    return quantize_weight(weight, QuantSpec(dtype="int8"), channel_axis=unit.channel_axis,
                           input_axis=unit.input_axis, layer=unit.name,
                           compute_dtype=backend.compute_dtype(model, unit))


def _records_of(backend: Backend, model: Any) -> dict | None:
    """``backend.records(model)``, or None when the backend declares it cannot list records."""
    from quanta.errors import ConfigError

    try:
        return dict(backend.records(model))
    except ConfigError:
        return None


def check_backend(backend: Backend, model: Any) -> None:
    """Check ``backend`` against the ``quanta.contracts.Backend`` contract on ``model`` (a model it
    accepts, with at least one quantizable weight); raise AssertionError naming it.

    - ``accepts(model)`` is a bool and True; ``units`` is a non-empty list of ``Unit`` whose
      shapes match ``read_weight``, stable across calls and across ``copy``;
    - writing int8 records into a ``copy`` (also ``copy(model, share=units)``) leaves the
      original's weights untouched;
    - write/read round trip: after ``write(copy, unit, record)``, ``read_weight`` gives
      ``record.dequantize()`` in the weight's dtype;
    - ``snapshot``/``restore`` (``everything`` False, with and without ``share``, and True) bring
      every weight back exactly, and leave no record behind (``records`` after restore, for a
      backend that lists records);
    - ``records`` (when implemented) lists one record per unit written;
    - a declared ``priority`` is an int and ``grids`` a non-empty frozenset of ``GRIDS``;
      ``compute_dtype`` is a float dtype.
    """
    from quanta.contracts import GRIDS

    if not isinstance(backend, Backend):
        raise AssertionError(f"{backend!r} is not a quanta.contracts.Backend (subclass it; docs/plugins.md)")
    check(isinstance(backend.priority, int) and not isinstance(backend.priority, bool), backend,
          f"priority must be an int, got {backend.priority!r}")
    check(isinstance(backend.grids, frozenset) and backend.grids and backend.grids <= set(GRIDS), backend,
          f"grids must be a non-empty frozenset of {GRIDS}, got {backend.grids!r}")
    with raising_fails(backend):
        _check(backend, model)


def _check(backend: Backend, model: Any) -> None:
    accepted = backend.accepts(model)
    check(accepted is True, backend, f"accepts(model) returned {accepted!r} for the model given; expected True")
    units = backend.units(model)
    check(isinstance(units, list) and units and all(isinstance(u, Unit) for u in units), backend,
          "units(model) must return a non-empty list of quanta.contracts.Unit")
    check(_key(backend.units(model)) == _key(units), backend, "units(model) differs between two calls")
    check(len({u.name for u in units}) == len(units), backend, "units(model) names a weight twice")
    original = _weights(backend, model, units)
    for u in units:
        check(tuple(original[u.name].shape) == tuple(u.shape), backend,
              f"read_weight({u.name!r}) has shape {tuple(original[u.name].shape)}, the unit says {u.shape}")
        dt = backend.compute_dtype(model, u)
        check(isinstance(dt, torch.dtype) and dt.is_floating_point, backend,
              f"compute_dtype({u.name!r}) must be a float torch dtype, got {dt!r}")

    for share in ((), tuple(units)):
        work = backend.copy(model, share=share)
        work_units = backend.units(work)
        check(_key(work_units) == _key(units), backend, f"units of copy(model, share={len(share)} units) differ "
                                                         "from the original's")
        check(not _same(_weights(backend, work, work_units), original), backend,
              "the copy's weights differ from the original's")
        records = {}
        for u in work_units:
            rec = _record(backend, work, u)
            records[u.name] = rec
            backend.write(work, u, rec)
        changed = _same(original, _weights(backend, model, backend.units(model)))
        check(not changed, backend, f"writing into copy(model, share={len(share)} units) changed the original's "
                                    f"weights {changed[:3]}")
        for u in work_units:
            got = backend.read_weight(work, u)
            want = records[u.name].dequantize().to(got.dtype).reshape(got.shape)
            check(torch.equal(got, want), backend, f"write/read round trip: after write(), read_weight({u.name!r}) is "
                                                   "not the record's dequantized values")
        held = _records_of(backend, work)
        if held is not None:
            check(len(held) == len(work_units), backend, f"records() lists {len(held)} records after "
                                                         f"{len(work_units)} units were written")

    for everything, shared in ((False, False), (False, True), (True, False)):
        work = backend.copy(model)
        work_units = backend.units(work)
        before = _weights(backend, work, work_units)
        snap = backend.snapshot(work, work_units, everything=everything, share=tuple(work_units) if shared else ())
        for u in work_units:
            backend.write(work, u, _record(backend, work, u))
        backend.restore(work, snap)
        changed = _same(before, _weights(backend, work, backend.units(work)))
        check(not changed, backend, f"restore(snapshot(everything={everything})) did not bring back {changed[:3]}")
        held = _records_of(backend, work)
        if held is not None:
            check(not held, backend, f"restore(snapshot(everything={everything})) left records behind: "
                                     f"{sorted(held)[:3]} (backend.records after restore)")
