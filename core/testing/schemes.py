"""``check_scheme``: the contract suite of ``quanta.contracts.Scheme``."""

from __future__ import annotations

from typing import Iterable

import torch

from quanta.contracts import GRIDS, Scheme
from quanta.errors import ConfigError
from quanta._records.spec import QuantDtype, QuantSpec

from .failure import check, fail, raising_fails

__all__ = ["check_scheme", "scheme_test_groups"]

_ALL_DTYPES = tuple(QuantDtype(b, s) for b in range(2, 9) for s in (True, False))


def scheme_test_groups(k: int = 32, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values ``[G, k]`` whose rows are the cases a scheme must handle: normal, all zeros, one
    constant (positive, negative), all positive, all negative, a huge and a tiny range, one outlier."""
    gen = torch.Generator().manual_seed(seed)
    rows = [
        torch.randn(k, generator=gen),
        torch.zeros(k),
        torch.full((k,), 0.75),
        torch.full((k,), -2.0),
        torch.rand(k, generator=gen) + 0.1,
        -torch.rand(k, generator=gen) - 0.1,
        torch.randn(k, generator=gen) * 1e3,
        torch.randn(k, generator=gen) * 1e-4,
        torch.cat([torch.randn(k - 1, generator=gen) * 0.01, torch.tensor([5.0])]),
    ]
    return torch.stack(rows).to(dtype)


def _storable(dtype: QuantDtype) -> tuple[int, int]:
    if dtype.signed:
        return -(1 << (dtype.bits - 1)), (1 << (dtype.bits - 1)) - 1
    return 0, (1 << dtype.bits) - 1


def _base_spec(scheme: Scheme, spec: QuantSpec | None) -> QuantSpec:
    if spec is None:
        return QuantSpec(dtype="int8", scheme=scheme.name or "symmetric")
    check(isinstance(spec, QuantSpec), scheme, f"spec must be a quanta.QuantSpec, got {type(spec).__name__}")
    return spec


def _served(scheme: Scheme, dtypes: Iterable[QuantDtype], base: QuantSpec) -> tuple[list[QuantDtype], dict]:
    """The dtypes whose specs (``base`` with that dtype) ``check_spec`` accepts, and why it refused the others."""
    import attrs

    served, refused = [], {}
    for dt in dtypes:
        spec = attrs.evolve(base, dtype=dt)
        try:
            scheme.check_spec(spec)
        except ConfigError as exc:
            refused[str(dt)] = str(exc)
            continue
        except Exception as exc:
            fail(scheme, f"check_spec({dt}) raised {type(exc).__name__}: {exc}; refuse a spec with quanta.ConfigError")
        served.append(dt)
    return served, refused


def _qparams(scheme, values, dtype, where) -> tuple[torch.Tensor, torch.Tensor | None]:
    lo, hi = values.amin(dim=1), values.amax(dim=1)
    lo0, hi0 = lo.clone(), hi.clone()
    out = scheme.qparams(lo, hi, dtype)
    check(isinstance(out, tuple) and len(out) == 2, scheme, f"qparams() must return (scale, zero_point) {where}")
    scale, zp = out
    g = values.shape[0]
    check(torch.equal(lo, lo0) and torch.equal(hi, hi0), scheme, f"qparams() modified min_val/max_val {where}")
    check(isinstance(scale, torch.Tensor) and tuple(scale.shape) == (g,), scheme,
          f"qparams() scale has shape {tuple(getattr(scale, 'shape', ()))}, expected ({g},) {where}")
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        fail(scheme, f"qparams() returned a zero, negative, NaN or inf scale for groups {rows} {where} "
                     f"(ranges {[(float(lo[r]), float(hi[r])) for r in rows[:3]]}); an all-zero group needs a positive scale too")
    qmin, qmax = scheme.quant_range(dtype)
    if zp is not None:
        check(isinstance(zp, torch.Tensor) and tuple(zp.shape) == (g,), scheme,
              f"qparams() zero_point has shape {tuple(getattr(zp, 'shape', ()))}, expected ({g},) or None {where}")
        check(bool(torch.isfinite(zp).all()) and torch.equal(zp, zp.round()), scheme,
              f"qparams() zero_point must hold integers {where}, got {zp.tolist()[:4]}")
        check(bool(((zp >= qmin) & (zp <= qmax)).all()), scheme,
              f"qparams() zero_point outside quant_range {(qmin, qmax)} {where}: {zp.tolist()[:4]}")
    return scale, zp


def _check_dtype(scheme: Scheme, dtype: QuantDtype, float_dtype: torch.dtype) -> None:
    where = f"for {dtype} in {str(float_dtype).replace('torch.', '')}"
    qr = scheme.quant_range(dtype)
    check(isinstance(qr, tuple) and len(qr) == 2 and all(isinstance(q, int) and not isinstance(q, bool) for q in qr),
          scheme, f"quant_range({dtype}) must return two ints, got {qr!r}")
    qmin, qmax = qr
    smin, smax = _storable(dtype)
    check(smin <= qmin < qmax <= smax, scheme,
          f"quant_range({dtype}) = {qr} does not fit the dtype (it stores {smin}..{smax}) or is empty")

    values = scheme_test_groups(dtype=float_dtype)
    scale, zp = _qparams(scheme, values, dtype, where)
    s2, z2 = scale[:, None], (None if zp is None else zp[:, None])

    before = values.clone()
    codes = scheme.quantize(values, s2, z2, dtype)
    check(torch.equal(values, before), scheme, f"quantize() modified its input values {where}")
    check(isinstance(codes, torch.Tensor) and codes.shape == values.shape, scheme,
          f"quantize() returned shape {tuple(getattr(codes, 'shape', ()))}, expected {tuple(values.shape)} {where}")
    check(codes.dtype.is_floating_point, scheme, f"quantize() must return codes as a float tensor, got {codes.dtype}")
    check(bool(torch.isfinite(codes).all()) and torch.equal(codes, codes.round()), scheme,
          f"quantize() returned non-integer codes {where}")
    check(bool(((codes >= qmin) & (codes <= qmax)).all()), scheme,
          f"quantize() codes outside quant_range {(qmin, qmax)} {where}: {codes.min().item()}..{codes.max().item()}")
    far = scheme.quantize(values * 1000 + torch.sign(values) * 1e3, s2, z2, dtype)
    check(bool(((far >= qmin) & (far <= qmax)).all()) and torch.equal(far, far.round()), scheme,
          f"quantize() does not clamp values far outside the range to {(qmin, qmax)} {where}")

    deq = scheme.dequantize(codes, s2, z2)
    check(isinstance(deq, torch.Tensor) and deq.shape == values.shape, scheme,
          f"dequantize() returned shape {tuple(getattr(deq, 'shape', ()))} {where}")
    check(deq.dtype == float_dtype, scheme, f"dequantize() returned {deq.dtype}; compute in the inputs' dtype {where}")
    check(bool(torch.isfinite(deq).all()), scheme, f"dequantize() returned NaN or inf {where}")
    check(torch.equal(deq[1], torch.zeros_like(deq[1])), scheme,
          f"an all-zero group does not come back as zeros {where}: {deq[1].tolist()[:4]}")
    if scheme.grid == "affine":
        affine = codes * s2 if z2 is None else (codes - z2) * s2
        if not torch.allclose(deq, affine, rtol=1e-3 if float_dtype == torch.float16 else 1e-6, atol=0):
            fail(scheme, f"declares grid = 'affine' but dequantize() is not (codes - zero_point) * scale {where} "
                         f"(max difference {float((deq - affine).abs().max()):.3g}); declare grid = 'lut'")

    # Grid points round-trip exactly: quantizing a dequantized value gives its code back.
    again = scheme.quantize(deq, s2, z2, dtype)
    if not torch.equal(again, codes):
        n = int((again != codes).sum())
        fail(scheme, f"round trip on grid points is not exact {where}: quantize(dequantize(codes)) differs from "
                     f"codes in {n} of {codes.numel()} elements")
    check(torch.equal(scheme.dequantize(again, s2, z2), deq), scheme,
          f"dequantize(quantize(grid values)) differs from the grid values {where}")

    # The in-place fast path gives what the plain methods give.
    out = torch.full_like(values, 7.5)
    res = scheme.quantize_into(values, s2, z2, dtype, out)
    check(res is out or (isinstance(res, torch.Tensor) and res.data_ptr() == out.data_ptr()), scheme,
          f"quantize_into() must return ``out`` {where}")
    check(torch.equal(values, before), scheme, f"quantize_into() modified its input values {where}")
    if not torch.equal(out, codes):
        fail(scheme, f"quantize_into() differs from quantize() in {int((out != codes).sum())} elements {where}")
    buf = codes.clone()
    res = scheme.dequantize_(buf, s2, z2)
    check(isinstance(res, torch.Tensor) and res.data_ptr() == buf.data_ptr(), scheme,
          f"dequantize_() must return the tensor it overwrote {where}")
    if not torch.equal(buf, deq):
        fail(scheme, f"dequantize_() differs from dequantize() in {int((buf != deq).sum())} elements {where}")


def _granularity_specs(base: QuantSpec, dtype: QuantDtype) -> list[QuantSpec]:
    import attrs

    from quanta._records.spec import Granularity

    return [attrs.evolve(base, dtype=dtype, granularity=Granularity.per_tensor, block_size=None),
            attrs.evolve(base, dtype=dtype, granularity=Granularity.per_channel, block_size=None),
            attrs.evolve(base, dtype=dtype, granularity=Granularity.per_block, block_size=16)]


def _test_weight() -> torch.Tensor:
    """A ``[16, 64]`` weight: normal rows of different magnitudes, one all-zero row, one outlier."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=gen) * torch.linspace(0.5, 2.0, 16)[:, None]
    w[3] = 0.0
    w[7, 5] = 4.0
    return w


def _check_records(scheme: Scheme, spec: QuantSpec) -> None:
    """Quantize a weight with ``spec`` (a granularity and bit width) as core does and bound the error."""
    from quanta._run.weights import observer_for, quantize_weight_with_values

    where = f"for {spec.describe()}"
    try:
        observer = observer_for(spec)
    except Exception:  # an observer this registry lacks: the built-in min/max
        from quanta import registry

        observer = registry.get("observer", "minmax").obj
    w = _test_weight()
    record, values, (sq_err, ref_sq) = quantize_weight_with_values(w, spec, scheme=scheme, observer=observer,
                                                                   layer="quanta.testing")
    check(bool(torch.isfinite(values).all()), scheme, f"quantizing a weight {where} gave NaN or inf values")
    from quanta._records.spec import Granularity

    if spec.granularity is not Granularity.per_tensor:  # the zero row is a group (or groups) of its own
        check(torch.equal(values[3], torch.zeros_like(values[3])), scheme,
              f"an all-zero row of a weight does not come back as zeros {where}")
    bits = spec.dtype.bits
    bound = 2.0 ** (3 - bits)  # 8 levels of error per step: far above any sound scheme, far below a broken one
    err = float(torch.linalg.vector_norm(values - w) / torch.linalg.vector_norm(w))
    if err > bound:
        fail(scheme, f"quantizing a weight {where}: it comes back with relative error {err:.1%} "
                     f"(bound for {bits} bits: {bound:.0%})")
    if record.lut is not None:
        from quanta._records.qmath import to_groups

        codes = to_groups(record.codes.to(torch.float32), list(record.block_sizes))
        lut = record.lut.reshape(codes.shape[0], -1)
        check(lut.shape[1] <= (1 << bits), scheme, f"lut() gave {lut.shape[1]} levels {where}; at most {1 << bits}")
        again = scheme.dequantize_lut(codes, lut, record.scale.reshape(-1, 1).to(torch.float32))
        check(torch.equal(again, to_groups(values.to(torch.float32), list(record.block_sizes))), scheme,
              f"dequantize_lut() of the record's codes and table differs from the values quantizing gave {where}")


def _check_dequantize_lut(scheme: Scheme, float_dtype: torch.dtype) -> None:
    """``dequantize_lut(codes, lut, scale)`` is ``lut[g, codes[g, k]] * scale[g]`` (records carrying a table)."""
    gen = torch.Generator().manual_seed(2)
    lut = torch.randn(6, 16, generator=gen).to(float_dtype)  # [G, L]
    codes = torch.randint(0, 16, (6, 40), generator=gen).to(float_dtype)  # [G, K]
    scale = (torch.rand(6, 1, generator=gen) * 3 + 0.25).to(float_dtype)  # [G, 1], not 1
    want = torch.gather(lut, 1, codes.long()) * scale
    got = scheme.dequantize_lut(codes, lut, scale)
    where = f"in {str(float_dtype).replace('torch.', '')}"
    check(isinstance(got, torch.Tensor) and got.shape == want.shape, scheme,
          f"dequantize_lut() returned shape {tuple(getattr(got, 'shape', ()))}, expected {tuple(want.shape)} {where}")
    err = float(torch.linalg.vector_norm((got.float() - want.float())) / torch.linalg.vector_norm(want.float()))
    if err > (1e-3 if float_dtype == torch.float16 else 1e-6):
        fail(scheme, f"dequantize_lut(codes, lut, scale) is not lut[codes] * scale {where}: relative error {err:.1%} "
                     "(the scale must multiply every group's table values)")
    check(torch.equal(scheme.quantize_lut(want / scale, lut).to(torch.float32),
                      codes.to(torch.float32)) or float_dtype == torch.float16, scheme,
          f"quantize_lut() does not give back the codes of table values {where}")


def _check_qparams_scalar(scheme: Scheme, dtype: QuantDtype) -> None:
    # Only where it is used: the class defining qparams defines qparams_scalar too.
    def owner(name: str) -> type | None:
        return next((c for c in type(scheme).__mro__ if name in c.__dict__), None)

    if owner("qparams_scalar") is not owner("qparams"):
        return
    # Ranges as float32 values: ordinary ones, zero and constant groups, one-sided ones.
    gen = torch.Generator().manual_seed(11)
    lows = (torch.randn(64, generator=gen) * 3).tolist() + [0.0, -0.0, 0.0, 2.5, -1e-6, -3.0]
    highs = (torch.rand(64, generator=gen) * 5).tolist() + [0.0, 0.0, 1e-6, 2.5, 4.0, -1.0]
    for lo, hi in zip(lows, highs):
        lo_t, hi_t = torch.tensor([lo]), torch.tensor([hi])
        got = scheme.qparams_scalar(float(lo_t), float(hi_t), dtype)
        if got is None:
            continue
        scale, zero_point = scheme.qparams(lo_t, hi_t, dtype)
        check(float(scale) == got[0] and (zero_point is None) == (got[1] is None)
              and (zero_point is None or float(zero_point) == got[1]), scheme,
              f"qparams_scalar({float(lo_t)}, {float(hi_t)}, {dtype}) gives {got}, qparams gives "
              f"({float(scale)}, {None if zero_point is None else float(zero_point)}): they must be equal bit for bit")


def check_scheme(scheme: Scheme, dtypes: Iterable[QuantDtype | str] | None = None, *,
                 spec: QuantSpec | None = None) -> None:
    """Check ``scheme`` against the ``quanta.contracts.Scheme`` contract; raise AssertionError naming it.

    For every dtype it serves (``dtypes``, default: int2..int8 and uint2..uint8, less those its
    ``check_spec`` refuses with ``quanta.ConfigError``), in float32 and float16:

    - ``quant_range`` gives two ints inside what the dtype stores;
    - ``qparams`` gives a finite, positive scale ``[G]`` for every group (all-zero and constant
      groups included) and an integer zero point within the range, without changing its inputs;
    - ``quantize`` gives integer codes of the values' shape, clamped to the range, in a float
      dtype, and leaves its input alone; values far out of range are clamped;
    - ``dequantize`` computes in the inputs' float dtype, gives zeros for an all-zero group, and
      grid points round-trip exactly (``quantize(dequantize(codes)) == codes``);
    - a declared ``grid = "affine"`` really is ``(codes - zero_point) * scale``;
    - the fast paths ``quantize_into``/``dequantize_`` equal ``quantize``/``dequantize``;
    - ``qparams_scalar``, where it is used (defined with ``qparams``) and returns qparams, equals
      ``qparams`` on float32 bit for bit;
    - ``dequantize_lut(codes, lut, scale)`` is ``lut[codes] * scale`` and ``quantize_lut`` gives
      the codes of table values back;
    - quantizing a weight as core does (``lut()`` tables included), per tensor, per channel and
      per block, at every served bit width, gives finite values, zeros for a zero row (its own group), and a
      relative error ``‖W − Ŵ‖ / ‖W‖`` within ``2 ** (3 - bits)``; a table record's ``dequantize_lut``
      gives those values.

    ``spec``: the spec the checks vary (dtype and granularity), for a scheme with options
    (``scheme_config``) or one that serves only some specs; default int8 with this scheme.
    """
    if not isinstance(scheme, Scheme):
        raise AssertionError(f"{scheme!r} is not a quanta.contracts.Scheme (subclass it; docs/plugins.md)")
    check(scheme.grid in GRIDS, scheme, f"declares grid {scheme.grid!r}; allowed: {', '.join(GRIDS)}")
    from quanta._records.spec import parse_dtype

    wanted = _ALL_DTYPES if dtypes is None else tuple(parse_dtype(d) for d in dtypes)
    base = _base_spec(scheme, spec)
    served, refused = _served(scheme, wanted, base)
    if not served:
        first = next(iter(refused.items()))
        fail(scheme, f"check_spec refuses every dtype tried ({', '.join(map(str, wanted))}) with the spec "
                     f"{base.describe()} (e.g. {first[0]}: {first[1]}); pass spec=quanta.QuantSpec(...) with the "
                     "options and granularity it serves, or dtypes=[...]")
    for dtype in served:
        for float_dtype in (torch.float32, torch.float16):
            with raising_fails(scheme, where=f"(for {dtype} in {float_dtype})"):
                _check_dtype(scheme, dtype, float_dtype)
        with raising_fails(scheme, "qparams_scalar raised", f"(for {dtype})"):
            _check_qparams_scalar(scheme, dtype)
    for float_dtype in (torch.float32, torch.float16):
        with raising_fails(scheme, "dequantize_lut/quantize_lut raised", f"(in {float_dtype})"):
            _check_dequantize_lut(scheme, float_dtype)
    for dtype in served:
        for granular in _granularity_specs(base, dtype):
            try:
                scheme.check_spec(granular)
            except ConfigError:
                continue  # a granularity it refuses at plan time is never quantized
            with raising_fails(scheme, f"quantizing a weight for {granular.describe()} raised"):
                _check_records(scheme, granular)
