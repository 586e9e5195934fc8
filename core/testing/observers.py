"""``check_observer``: the contract suite of ``quanta.contracts.Observer``."""

from __future__ import annotations

from typing import Any

import torch

from quanta.contracts import Observer, Scheme
from quanta._records.spec import QuantSpec

from .failure import check, fail, raising_fails
from .schemes import scheme_test_groups

__all__ = ["check_observer"]

#: The bit widths ``check_observer`` tries when no spec is given (per channel, the scheme's signed dtypes).
_DEFAULT_DTYPES = ("int8", "int4", "int3", "int2")


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
    and ``spec`` (default: int8, int4, int3 and int2 per channel, each the scheme accepts; a clip
    search that wrongly shares one ratio across rows may show only at low bit widths):

    - ``observe`` returns two tensors of shape ``[G]``, finite for finite input, ``min <= max``,
      and leaves its input unchanged;
    - rows are independent: observing the rows in two chunks gives what observing all gives
      (core calls it on chunks of rows);
    - NaN/inf behaviour is as declared: with ``ranges_carry_non_finite = True`` a group holding
      NaN or inf gets a non-finite range and the other groups are unaffected; with False the
      call must not raise anything but a ``quanta.QuantaError`` (core scans the weight itself);
    - ``exact_ranges = True`` (declared on the class defining ``observe``) holds: every range is
      its group's exact minimum and maximum;
    - ``check_spec`` accepts ``spec`` or refuses it with ``quanta.ConfigError`` only.
    """
    from quanta.errors import ConfigError, QuantaError

    if not isinstance(observer, Observer):
        raise AssertionError(f"{observer!r} is not a quanta.contracts.Observer (subclass it; docs/plugins.md)")
    scheme = scheme if scheme is not None else _default_scheme()
    if spec is not None:
        specs = [spec]
    else:  # low bit widths too: a search sharing one clip across rows may show only at int4 or int2
        specs = [QuantSpec(dtype=dt, scheme=scheme.name, observer=observer.name or "minmax") for dt in _DEFAULT_DTYPES]
    accepted = []
    for one in specs:
        try:
            observer.check_spec(one)
        except ConfigError as exc:
            if spec is not None:
                fail(observer, f"check_spec refuses the spec {one.describe()}: {exc}; pass a spec it serves (spec=...)")
            continue
        except Exception as exc:
            fail(observer, f"check_spec raised {type(exc).__name__}: {exc}; refuse with quanta.ConfigError")
        accepted.append(one)
    check(accepted, observer, f"check_spec refuses every default spec ({', '.join(s.describe() for s in specs)}): "
                              "pass a spec it serves (spec=...)")
    values = scheme_test_groups(k=64) if values is None else values
    for one in accepted:
        _check_spec_run(observer, values, one, scheme, QuantaError)


def _check_spec_run(observer, values, spec, scheme, quanta_error) -> None:
    where = f"for {spec.dtype}"
    with raising_fails(observer, where=f"({where})"):
        lo, hi = _observe(observer, values, spec, scheme, f"on all rows {where}")
        check(bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()), observer,
              f"observe() returned a non-finite range for finite input {where}")
        if bool((lo > hi).any()):
            fail(observer, f"observe() returned min > max for groups {(lo > hi).nonzero().flatten().tolist()} {where}")
        # Chunk independence: core observes chunks of rows.
        cut = values.shape[0] // 2
        lo1, hi1 = _observe(observer, values[:cut].contiguous(), spec, scheme, f"on the first rows {where}")
        lo2, hi2 = _observe(observer, values[cut:].contiguous(), spec, scheme, f"on the last rows {where}")
        if not (torch.equal(torch.cat([lo1, lo2]), lo) and torch.equal(torch.cat([hi1, hi2]), hi)):
            fail(observer, f"observing rows in two chunks differs from observing them all at once {where}: rows "
                           "must be independent (core observes a weight's groups in chunks)")
        if _declares_exact_ranges(observer):
            lo_true, hi_true = values.float().amin(dim=1).to(lo.dtype), values.float().amax(dim=1).to(hi.dtype)
            wrong = ((lo != lo_true) | (hi != hi_true)).nonzero().flatten().tolist()
            if wrong:
                fail(observer, f"declares exact_ranges = True but observe() returned ranges other than the groups' "
                               f"minimum and maximum for groups {wrong[:8]} {where} (QAT then decides from them "
                               "that no code clamps); declare False")
        _check_non_finite(observer, values, spec, scheme, lo, hi, quanta_error)


def _declares_exact_ranges(observer: Any) -> bool:
    # As QAT reads it: the flag on the class that defines observe() (a subclass overriding
    # observe() alone does not inherit the declaration).
    owner = next((c for c in type(observer).__mro__ if "observe" in c.__dict__), None)
    return bool(owner is not None and owner.__dict__.get("exact_ranges", False))


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
