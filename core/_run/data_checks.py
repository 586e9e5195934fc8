"""Calibration data checks, run before any weight changes (``quanta._run.data_checks``).

The rules, in the order they are checked:

- Data is an iterable of *batches*; each batch is a tensor (one positional input), a tuple or
  list of tensors (positional inputs) or a mapping of keyword inputs. A bare tensor or a single
  mapping passed as the data is **one batch** (the documented rule core's ``materialize_data``
  applies), never split into rows. A numpy array, a string or bytes as the data is refused: they
  would be iterated row by row or character by character.
- The data holds at least one batch.
- Every input of every batch that is a tensor of a floating type is finite; the error names the
  batch index (and the input).
- Every batch has the same structure and dtypes as batch 0.
- Batch 0 runs through the model in memory (a dry forward in eval mode, no gradients, the model
  unchanged: what its forward writes is put back): a batch of the wrong shape or dtype is refused naming ``calibration batch 0`` and the
  model's first layer, instead of failing deep inside an algorithm.
- Fewer batches than the algorithm will use (``calibration_nsamples``) is a warning giving both
  numbers, never an error.

``quanta.quantize`` reads the data once into a list (at most the batches its algorithms use) and
checks that list with :func:`check_batches`. :func:`check_calibration_data` applies the same rules
to data as given (lists checked whole; a ``DataLoader`` or generator has batch 0 checked up front
and each later batch as it is read).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from quanta._run.calibration import call_model, count_samples, to_device
from quanta.errors import DataError

__all__ = ["check_calibration_data", "check_data_container", "check_batches", "CheckedBatches",
           "CalibrationWarning", "describe_batch", "first_layer", "dry_forward"]


class CalibrationWarning(UserWarning):
    """Calibration data is usable but not what the recipe asked for (fewer batches than used)."""


def describe_batch(batch: Any) -> str:
    """A short text of a batch's structure: ``"a tensor of dtype float32 and shape (8, 64)"``,
    ``"2 inputs: int64 (1, 12), int64 (1, 12)"``, ``"keys input_ids: int64 (1, 12), ..."``."""
    def leaf(x):
        if isinstance(x, torch.Tensor):
            return f"{str(x.dtype).replace('torch.', '')} {tuple(x.shape)}"
        return type(x).__name__

    if isinstance(batch, torch.Tensor):
        return f"a tensor of dtype {leaf(batch).split(' ', 1)[0]} and shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return "keys " + ", ".join(f"{k}: {leaf(v)}" for k, v in batch.items())
    if isinstance(batch, (tuple, list)):
        return f"{len(batch)} input{'' if len(batch) == 1 else 's'}: " + ", ".join(leaf(v) for v in batch)
    return f"a {type(batch).__name__}"


def first_layer(model: torch.nn.Module) -> str:
    """The first module with weights, as text (``"layer '0' is Linear(in_features=64, ...)"``), or ``""``."""
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            return f"its first layer {name!r} is {module}"
    return ""


def _model_device(model: torch.nn.Module) -> torch.device | None:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


def dry_forward(model: torch.nn.Module, inputs: Any, *, record: bool = False) -> frozenset[str] | None:
    """Run ``model`` once on ``inputs`` (a calibration item) in eval mode without gradients and
    restore its training flag. Raises whatever the model raises. The model's weights, buffers
    (BatchNorm running statistics included), attributes and mode are left as they were, also when
    its forward changes them (:func:`quanta._run.state_guard.untouched`).

    With ``record=True``, returns the qualified names (``named_modules``) of the modules whose
    forward pre-hook fired during the pass (None when a module refuses a hook); otherwise None."""
    from quanta._run.state_guard import untouched

    device = _model_device(model)
    reached: set[str] = set()
    with untouched(model):  # what forward writes (counters, running buffers, weights) is put back
        handles: list | None = [] if record else None
        try:
            for name, module in (model.named_modules() if record else ()):
                handles.append(module.register_forward_pre_hook(  # type: ignore[union-attr]
                    lambda m, a, name=name: reached.add(name)))
        except Exception:  # a module that takes no hooks: nothing recorded
            for handle in handles or ():
                handle.remove()
            handles = None
        try:
            model.eval()
            with torch.no_grad():
                call_model(model, to_device(inputs, device) if device is not None else inputs)
        finally:
            for handle in handles or ():
                handle.remove()
    return frozenset(reached) if handles is not None else None


def _bare_data_error(data: Any) -> DataError | None:
    if type(data).__module__ == "numpy":
        shape = tuple(getattr(data, "shape", ()))
        return DataError(
            f"calibration data is a bare numpy {type(data).__name__} of shape {shape}, not a list of batches; "
            f"pass [torch.from_numpy(data)] for one batch, or a list of tensors (its rows are never taken as "
            "batches silently)")
    if isinstance(data, (str, bytes)):
        return DataError(f"calibration data is a {type(data).__name__}; pass a list of batches (tensors, "
                         "tuples of tensors or dicts of keyword inputs)")
    if not isinstance(data, (Iterable, torch.Tensor, Mapping)):
        return DataError(f"calibration data of type {type(data).__name__} is not iterable; pass a list of "
                         "batches or a DataLoader")
    return None


def check_data_container(data: Any) -> None:
    """Refuse data that is not a collection of batches (a numpy array, a string, a non-iterable).

    A tensor or a mapping is accepted: it is one batch (see the module docstring)."""
    error = _bare_data_error(data)
    if error is not None:
        raise error


def check_batches(model: Any, batches: Sequence, *, limit: int | None = None, reader: str = "the algorithm",
                  forward: bool = True, record: bool = False) -> frozenset[str] | None:
    """Check a list of calibration ``batches`` (as core read them) against ``model``.

    Structure and finiteness of every batch, the same inputs as batch 0, a dry forward of batch 0
    on a ``torch.nn.Module``; warns (:class:`CalibrationWarning`) when the batches hold fewer samples
    (rows) than ``limit``, the number ``reader`` would use (``forward=False`` skips the dry forward). Raises
    :class:`DataError` naming the batch. With ``record=True``, returns the names of the modules the
    dry forward reached (:func:`dry_forward`); None when it did not run or recorded nothing.
    """
    if len(batches) == 0:
        raise DataError("calibration data is empty; pass at least one batch")
    reference = _check_batch(batches[0], 0, None)
    reached = _dry_forward_first(model, batches[0], forward, record=record)
    for index, batch in enumerate(batches[1:], start=1):
        _check_batch(batch, index, reference)
    samples = sum(count_samples(b) for b in batches) if limit is not None else 0
    if limit is not None and samples < limit:  # samples are rows: docs/config.md, "Samples"
        warnings.warn(f"calibration data has {samples} sample(s) in {len(batches)} batch(es) but calibration_nsamples "
                      f"is {limit} ({reader} reads up to {limit} samples): using all {samples}", CalibrationWarning,
                      stacklevel=3)
    return reached


def _leaves(batch: Any, index: int) -> list[tuple[str, Any]]:
    where = f"calibration batch {index}"
    if isinstance(batch, torch.Tensor):
        return [("", batch)]
    if isinstance(batch, Mapping):
        bad = [k for k in batch if not isinstance(k, str)]
        if bad:
            raise DataError(f"{where} is a mapping with a non-string key {bad[0]!r}; keyword inputs need "
                            "string keys", index)
        return [(f" input {k!r}", v) for k, v in batch.items()]
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise DataError(f"{where} is an empty {type(batch).__name__}; a batch holds at least one input", index)
        out = []
        for i, v in enumerate(batch):
            if not isinstance(v, torch.Tensor):
                raise DataError(f"{where} input {i} is a {type(v).__name__}, not a torch tensor"
                                f"{_convert_hint(v)}", index)
            out.append((f" input {i}", v))
        return out
    raise DataError(f"{where} is a {type(batch).__name__}; a batch is a tensor, a tuple of tensors or a dict "
                    f"of keyword inputs{_convert_hint(batch)}", index)


def _convert_hint(value: Any) -> str:
    if type(value).__module__ == "numpy":
        return " (convert it with torch.from_numpy)"
    if isinstance(value, (int, float, list)):
        return " (convert it with torch.tensor)"
    return ""


def _signature(leaves: list[tuple[str, Any]]) -> list[tuple[str, Any, int]]:
    return [(name, v.dtype, v.dim()) if isinstance(v, torch.Tensor) else (name, type(v), -1) for name, v in leaves]


def _check_batch(batch: Any, index: int, reference: list | None) -> list:
    """Check one batch's structure and finiteness; returns its signature (names, dtypes, ranks)."""
    leaves = _leaves(batch, index)
    for name, v in leaves:
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.device.type != "meta":
            if not bool(torch.isfinite(v).all()):
                bad = int((~torch.isfinite(v)).sum())
                raise DataError(f"calibration batch {index}{name} holds {bad} NaN or inf value(s); fix or drop "
                                "that batch", index)
    sig = _signature(leaves)
    if reference is not None and sig != reference:
        def text(s):
            return ", ".join(f"{n.strip() or 'tensor'}: {str(d).replace('torch.', '')} rank {r}" for n, d, r in s)

        raise DataError(f"calibration batch {index} ({text(sig)}) differs from batch 0 ({text(reference)}); "
                        "every batch needs the same inputs, dtypes and ranks", index)
    return sig


class CheckedBatches:
    """An iterable over calibration batches that checks each one as it is read.

    Wraps a re-iterable source (e.g. a ``DataLoader``) or a one-shot iterator whose batch 0 was
    already read (``first``). Warns (:class:`CalibrationWarning`) when the data ends before
    ``nsamples`` batches were read.
    """

    def __init__(self, source: Iterable, first: Any, reference: list, nsamples: int | None, one_shot: bool):
        self.source, self.first, self.reference = source, first, reference
        self.nsamples, self.one_shot = nsamples, one_shot
        self._used = False

    def __iter__(self) -> Iterator:
        if self.one_shot:
            if self._used:
                raise DataError("calibration data is a one-shot iterator and was already read; pass a list "
                                "or a DataLoader to read it twice")
            self._used = True
            items = itertools.chain([self.first], self.source)
        else:
            items = iter(self.source)
        count = 0
        for index, batch in enumerate(items):
            if index > 0:
                _check_batch(batch, index, self.reference)
            count += count_samples(batch)
            yield batch
        _warn_count(count, self.nsamples)


def _warn_count(count: int, nsamples: int | None) -> None:
    if nsamples is not None and count < nsamples:
        warnings.warn(f"calibration data has {count} sample(s) but calibration_nsamples is {nsamples}: "
                      f"using all {count}", CalibrationWarning, stacklevel=3)


def check_calibration_data(model: Any, data: Any, *, nsamples: int | None = None, forward: bool = True) -> Any:
    """Check calibration ``data`` against ``model``; returns the data to hand to the algorithm.

    ``model`` is the model in memory (a ``torch.nn.Module`` gets the dry forward of batch 0;
    other model types only the structural checks). ``nsamples`` is how many batches the
    algorithm will read (None: all). Lists and tuples come back as they are, fully checked;
    other iterables come back wrapped in :class:`CheckedBatches`. Raises :class:`DataError`
    naming the batch (``"calibration batch 3 input 'input_ids' ..."``) and the fix.
    """
    check_data_container(data)
    if isinstance(data, (torch.Tensor, Mapping)):
        data = [data]  # one batch
    if isinstance(data, Sequence):
        check_batches(model, data if nsamples is None else data[:nsamples], limit=nsamples, forward=forward)
        return data
    iterator = iter(data)
    one_shot = iterator is data
    try:
        first = next(iterator)
    except StopIteration:
        raise DataError("calibration data is empty; pass at least one batch") from None
    reference = _check_batch(first, 0, None)
    _dry_forward_first(model, first, forward)
    return CheckedBatches(iterator if one_shot else data, first, reference, nsamples, one_shot)


def _dry_forward_first(model: Any, batch: Any, forward: bool, record: bool = False) -> frozenset[str] | None:
    if not forward or not isinstance(model, torch.nn.Module):
        return None
    try:
        return dry_forward(model, batch, record=record)
    except Exception as exc:
        layer = first_layer(model)
        raise DataError(f"calibration batch 0 ({describe_batch(batch)}) does not fit the model: "
                        f"{type(exc).__name__}: {_first_line(exc)}"
                        f"{'; ' + layer if layer else ''}. Pass batches the model accepts as "
                        "model(batch), model(*batch) or model(**batch)", 0) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
