"""Checks ``quanta.load`` makes on a saved directory's metadata and records before the model changes:
a file that is not what ``quanta.save`` writes is a :class:`SavedModelError` naming the tensor,
never a model that loads silently wrong.

- :func:`check_metadata`: the types of ``quanta_config.json``'s sections; a tensor named by two
  records, or stored both as a record and as a plain tensor; a tied tensor (alias) that is also
  stored or points at nothing; a grid other than ``affine``/``lut``; a ``lut`` grid without a table.
- :func:`check_shards`: a tensor stored in two shard files.
- :func:`check_ties` / :func:`check_tie_values`: weights the model ties (one parameter under two
  names) that the directory describes with two records, or with a record and a different float tensor.
- :func:`check_record`: non-finite scales, zero points or tables; codes outside the range of the
  spec's dtype (e.g. 9 for int4).
"""

from __future__ import annotations

import torch

from quanta._files.saved_format import CONFIG_NAME, SavedModelError
from quanta.record import QuantizedWeight

__all__ = ["check_metadata", "check_shards", "check_ties", "check_tie_values", "check_record", "GRIDS"]

#: Record grids this quanta reads.
GRIDS = ("affine", "lut")


def _mapping(config: dict, key: str) -> dict:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise SavedModelError(f"{CONFIG_NAME}'s {key!r} must be a JSON object, got a {type(value).__name__}", key)
    return value


def _string_list(config: dict, key: str) -> list:
    value = config.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SavedModelError(f"{CONFIG_NAME}'s {key!r} must be a list of tensor names", key)
    return value


def check_metadata(config: dict, files: dict[str, str]) -> None:
    """Raise SavedModelError for the first inconsistency in ``config`` (``quanta_config.json``) given
    ``files`` (tensor key -> file)."""
    rec_meta, aliases = _mapping(config, "records"), _mapping(config, "aliases")
    _string_list(config, "buffers")
    _string_list(config, "extra_state")
    claimed: dict[str, str] = {}
    for name, meta in rec_meta.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("tensors"), dict) \
                or not isinstance(meta.get("shape"), list):
            raise SavedModelError(f"the record's entry in {CONFIG_NAME} needs a 'shape' list and a 'tensors' object",
                                  name)
        for field, entry in meta["tensors"].items():
            if entry is None:
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) \
                    or not isinstance(entry.get("shape"), list) or not isinstance(entry.get("dtype"), str):
                raise SavedModelError(f"the record's {field!r} entry needs a 'key', a 'shape' and a 'dtype'", name)
            key = entry["key"]
            if key in claimed:
                raise SavedModelError(f"tensor {key!r} is named twice (by {claimed[key]} and by the record's "
                                      f"{field!r}); a saved directory stores each tensor once", key)
            claimed[key] = f"the record {name!r}'s {field!r}"
        if name in files:
            raise SavedModelError("stored twice: as a quantized record and as a plain tensor", name)
        grid = meta.get("grid", "affine")
        if grid not in GRIDS:
            raise SavedModelError(f"unknown grid {grid!r} (allowed: {', '.join(GRIDS)})", name)
        if grid == "lut" and meta["tensors"].get("lut") is None:
            raise SavedModelError("the record's grid is 'lut' but it stores no lookup table ('lut' tensor)", name)
    for alias, canonical in aliases.items():
        if not isinstance(canonical, str):
            raise SavedModelError(f"the tied tensor's target must be a tensor name, got {canonical!r}", alias)
        if alias in rec_meta or alias in files or alias in claimed:
            raise SavedModelError(f"recorded as tied to {canonical!r} but also stored itself; a tied tensor is "
                                  "stored once", alias)
        if canonical not in files and canonical not in rec_meta:
            raise SavedModelError(f"recorded as tied to {canonical!r}, which the directory does not hold", alias)


def check_shards(keys_by_file: dict[str, list[str]]) -> None:
    """Raise SavedModelError for a tensor stored in two files (``{file: its keys}``)."""
    seen: dict[str, str] = {}
    for file, keys in keys_by_file.items():
        for key in keys:
            if key in seen:
                raise SavedModelError(f"stored in two files ({seen[key]!r} and {file!r}); a saved directory stores "
                                      "each tensor once", key)
            seen[key] = file


def check_ties(model: torch.nn.Module, record_names, plain_keys) -> list[tuple[str, str]]:
    """Raise SavedModelError when the model ties one parameter under several names and the directory
    gives those names two records. Returns ``(record, plain key)`` pairs the model ties where the
    directory stores the plain key as well: :func:`check_tie_values` compares them once read."""
    groups: dict[int, list[str]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(key)
    record_names, plain_keys = set(record_names), set(plain_keys)
    pairs = []
    for keys in groups.values():
        if len(keys) < 2:
            continue
        recs = [k for k in keys if k in record_names]
        if len(recs) > 1:
            raise SavedModelError(f"the model ties {', '.join(keys)} (one tensor), but the directory holds a record "
                                  f"for each of {', '.join(recs)}; a tied weight has one record", recs[1])
        pairs += [(recs[0], k) for k in keys if recs and k in plain_keys]
    return pairs


def check_tie_values(record_name: str, rec: QuantizedWeight, plain_key: str, plain: torch.Tensor) -> None:
    """Raise SavedModelError unless ``plain`` (stored for a key the model ties to ``record_name``)
    holds the record's dequantized values: otherwise one of the two would silently win."""
    values = rec.dequantize().to(plain.dtype)
    if tuple(plain.shape) != tuple(values.shape) or not torch.equal(plain, values):
        raise SavedModelError(f"the model ties it to {plain_key!r} (one tensor), but the directory stores "
                              f"{plain_key!r} as a float tensor that differs from this record's values; the "
                              "tied weights are inconsistent", record_name)


def _finite(name: str, field: str, value: torch.Tensor | None) -> None:
    if value is None or not value.is_floating_point():
        return
    bad = ~torch.isfinite(value)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise SavedModelError(f"the record's {field} holds a non-finite value ({value[index].item()} at index "
                              f"{index}); the directory is damaged or was edited", name)


def check_record(name: str, rec: QuantizedWeight) -> None:
    """Raise SavedModelError for a record whose values ``quanta.save`` could not have written."""
    _finite(name, "scale", rec.scale)
    _finite(name, "zero_point", rec.zero_point)
    _finite(name, "lut", rec.lut)
    dtype = rec.spec.dtype
    if rec.codes.is_floating_point() or rec.codes.is_complex():
        raise SavedModelError(f"the record's codes are {rec.codes.dtype}, not integers", name)
    lo, hi = (-(2 ** (dtype.bits - 1)), 2 ** (dtype.bits - 1) - 1) if dtype.signed else (0, 2 ** dtype.bits - 1)
    if rec.codes.numel():
        cmin, cmax = int(rec.codes.min()), int(rec.codes.max())
        if cmin < lo or cmax > hi:
            bad = cmin if cmin < lo else cmax
            raise SavedModelError(f"the record holds code {bad}, outside the range of its spec's {dtype} "
                                  f"[{lo}, {hi}]", name)
