"""``check_observer``: the contract suite of ``quanta.contracts.Observer``."""

from __future__ import annotations

from typing import Any

import torch

from quanta.contracts import Observer, Scheme
from quanta._records.spec import QuantSpec

from .failure import check, fail
from .schemes import scheme_test_groups

__all__ = ["check_observer"]


def _default_scheme() -> Scheme:
    from quanta import registry

    return registry.get("scheme", "symmetric").obj


def _observe(observer, values, spec, scheme, where) -> tuple[torch.Tensor, torch.Tensor]:
    before = values.clone()
    out = observer.observe(values, spec, scheme)
    check(torch.equal(values, before) or (torch.isnan(before).any() and torch.equal(values.isnan(), before.isnan())),
          observer, f"observe() modified its input values {where}")
    check(isinstance(out, tuple) and len(out) == 2, observer, f"observe() must return (min_val, max_val) {where}")
    lo, hi = out
    g = values.shape[0]
    check(isinstance(lo, torch.Tensor) and isinstance(hi, torch.Tensor), observer,
          f"observe() must return two tensors {where}")
    check(tuple(lo.shape) == (g,) and tuple(hi.shape) == (g,), observer,
          f"observe() returned shapes {tuple(lo.shape)} and {tuple(hi.shape)}; expected ({g},) each {where}")
    return lo, hi


def check_observer(observer: Observer, scheme: Scheme | None = None, spec: QuantSpec | None = None,
                   values: torch.Tensor | None = None) -> None:
    """Check ``observer`` against the ``quanta.contracts.Observer`` contract; raise AssertionError naming it.

    On ``values`` ``[G, K]`` (default: rows of every awkward kind, see
    ``quanta.testing.scheme_test_groups``) with ``scheme`` (default: the built-in ``symmetric``)
    and ``spec`` (default: int8 per-channel):

    - ``observe`` returns two tensors of shape ``[G]``, finite for finite input, ``min <= max``,
      and leaves its input unchanged;
    - rows are independent: observing the rows in two chunks gives what observing all gives
      (core calls it on chunks of rows);
    - NaN/inf behaviour is as declared: with ``ranges_carry_non_finite = True`` a group holding
      NaN or inf gets a non-finite range and the other groups are unaffected; with False the
      call must not raise anything but a ``quanta.QuantaError`` (core scans the weight itself);
    - ``check_spec`` accepts ``spec`` or refuses it with ``quanta.ConfigError`` only.
    """
    from quanta.errors import ConfigError, QuantaError

    if not isinstance(observer, Observer):
        raise AssertionError(f"{observer!r} is not a quanta.contracts.Observer (subclass it; docs/plugins.md)")
    scheme = scheme if scheme is not None else _default_scheme()
    spec = spec if spec is not None else QuantSpec(dtype="int8", scheme=scheme.name, observer=observer.name or "minmax")
    try:
        observer.check_spec(spec)
    except ConfigError:
        fail(observer, f"check_spec refuses the default spec {spec.describe()}: pass a spec it serves (spec=...)")
    except Exception as exc:
        fail(observer, f"check_spec raised {type(exc).__name__}: {exc}; refuse with quanta.ConfigError")
    values = scheme_test_groups(k=64) if values is None else values
    try:
        lo, hi = _observe(observer, values, spec, scheme, "on all rows")
        check(bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()), observer,
              "observe() returned a non-finite range for finite input")
        if bool((lo > hi).any()):
            fail(observer, f"observe() returned min > max for groups {(lo > hi).nonzero().flatten().tolist()}")
        # Chunk independence: core observes chunks of rows.
        cut = values.shape[0] // 2
        lo1, hi1 = _observe(observer, values[:cut].contiguous(), spec, scheme, "on the first rows")
        lo2, hi2 = _observe(observer, values[cut:].contiguous(), spec, scheme, "on the last rows")
        if not (torch.equal(torch.cat([lo1, lo2]), lo) and torch.equal(torch.cat([hi1, hi2]), hi)):
            fail(observer, "observing rows in two chunks differs from observing them all at once: rows must be "
                           "independent (core observes a weight's groups in chunks)")
        _check_non_finite(observer, values, spec, scheme, lo, hi, QuantaError)
    except AssertionError:
        raise
    except Exception as exc:
        fail(observer, f"raised {type(exc).__name__}: {exc}")


def _check_non_finite(observer: Any, values, spec, scheme, lo, hi, quanta_error) -> None:
    bad = values.clone()
    bad[0, 3] = float("nan")
    bad[2, 5] = float("inf")
    try:
        blo, bhi = _observe(observer, bad, spec, scheme, "on rows holding NaN and inf")
    except quanta_error:
        if observer.ranges_carry_non_finite:
            fail(observer, "declares ranges_carry_non_finite = True but raised on NaN/inf instead of returning "
                           "a non-finite range")
        return
    if observer.ranges_carry_non_finite:
        for row in (0, 2):
            check(not (bool(torch.isfinite(blo[row])) and bool(torch.isfinite(bhi[row]))), observer,
                  f"declares ranges_carry_non_finite = True but group {row} holding NaN/inf got the finite range "
                  f"({float(blo[row])}, {float(bhi[row])}); declare False (core then scans weights itself)")
        rest = [r for r in range(values.shape[0]) if r not in (0, 2)]
        check(torch.equal(blo[rest], lo[rest]) and torch.equal(bhi[rest], hi[rest]), observer,
              "NaN/inf in one group changed the range of other groups")
