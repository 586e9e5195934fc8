"""Model inputs and outputs as the Core ML exporter and ``verify`` see them.

Example inputs are a tensor, a tuple of tensors (positional: ``model(*inputs)``) or a mapping
name -> tensor (keyword: ``model(**inputs)``, e.g. a tokenizer's ``input_ids`` and
``attention_mask``). Each input keeps its kind: integer and bool tensors (token ids, masks)
become Core ML ``int32`` inputs, floating tensors ``float32`` inputs. A keyword model is traced
through :class:`KeywordInputs`, a wrapper that maps positional arguments to the keywords;
the user's model is not changed. Outputs are the tensors of the model's output, flattened in
order (:func:`flatten_outputs`), so a transformers ``ModelOutput`` becomes its tensors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np
import torch

from quanta.errors import ConfigError

__all__ = ["ExampleInputs", "KeywordInputs", "example_inputs", "flatten_outputs", "output_names",
           "core_ml_dtype", "torch_input"]


def core_ml_dtype(t: torch.Tensor | np.ndarray) -> type:
    """The numpy dtype of the Core ML input for example tensor ``t``: ``np.int32`` for integer and
    bool tensors (Core ML has no int64 inputs), else ``np.float32``."""
    if isinstance(t, torch.Tensor):
        is_int = not (t.dtype.is_floating_point or t.dtype.is_complex)
    else:
        is_int = bool(np.issubdtype(t.dtype, np.integer) or np.issubdtype(t.dtype, np.bool_))
    return np.int32 if is_int else np.float32


def torch_input(value: Any, like: torch.Tensor | None = None) -> torch.Tensor:
    """``value`` as the torch model takes it: integer arrays as int64 (token ids for
    ``nn.Embedding``), or ``like``'s dtype when given; floating arrays as float32."""
    t = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
    if like is not None:
        return t.to(like.dtype)
    if t.dtype.is_floating_point:
        return t.to(torch.float32)
    return t.to(torch.int64) if t.dtype != torch.bool else t


def _sanitize(name: str) -> str:
    name = re.sub(r"\W", "_", name)
    return name if not name[:1].isdigit() else f"input_{name}"


@attrs.frozen
class ExampleInputs:
    """Normalised example inputs: ``names`` (Core ML input names, in order), ``tensors`` (the
    torch tensors, same order), ``keywords`` (the model is called as ``model(**inputs)``; the
    names are then the keywords)."""

    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]
    keywords: bool

    def traced_tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors to trace with: bool tensors as int32 (what the Core ML input holds; the
        :class:`KeywordInputs` wrapper turns them back to bool), the others unchanged."""
        return tuple(t.to(torch.int32) if t.dtype == torch.bool else t for t in self.tensors)

    def bool_positions(self) -> tuple[int, ...]:
        """Indices of the bool inputs (masks)."""
        return tuple(i for i, t in enumerate(self.tensors) if t.dtype == torch.bool)


def example_inputs(example: Any, positional_names=None) -> ExampleInputs:
    """Normalise ``example`` (tensor, tuple/list of tensors, or mapping name -> tensor).

    ``positional_names``: names for positional inputs (e.g. the ``forward()`` argument names);
    a mapping's keys are its names, put in that order (the signature's), others after as given. Raises ConfigError naming ``example_inputs`` otherwise.
    """
    if example is None:
        raise ConfigError("the coreml exporter traces the model: pass example_inputs=<tensor, tuple of tensors "
                          "or dict name -> tensor>", "example_inputs")
    if isinstance(example, Mapping):
        items = [(k, v) for k, v in example.items() if v is not None]
        bad = [k for k, v in items if not isinstance(v, torch.Tensor)]
        if bad or not items:
            raise ConfigError(f"expected a dict of tensors; {bad or 'nothing'} given", "example_inputs")
        order = {n: i for i, n in enumerate(positional_names or [])}  # the forward() signature's order
        items.sort(key=lambda kv: order.get(str(kv[0]), len(order)))
        names = tuple(str(k) for k, _ in items)
        if any(not n.isidentifier() for n in names):
            raise ConfigError(f"dict keys must be the model's keyword argument names, got {list(names)}",
                              "example_inputs")
        return ExampleInputs(names, tuple(v for _, v in items), True)
    if isinstance(example, torch.Tensor):
        example = (example,)
    if not (isinstance(example, (tuple, list)) and example and all(isinstance(t, torch.Tensor) for t in example)):
        raise ConfigError(f"expected a tensor, a tuple of tensors or a dict of tensors, got {type(example).__name__}",
                          "example_inputs")
    n = len(example)
    given = [_sanitize(p) for p in (positional_names or [])][:n]
    if len(given) != n or len(set(given)) != n:
        given = [f"input_{i}" for i in range(n)]
    return ExampleInputs(tuple(given), tuple(example), False)


def output_names(out: Any, prefix: str = "") -> list[str]:
    """Names for :func:`flatten_outputs` of ``out``, in the same order: mapping keys (``logits``,
    ``last_hidden_state``), joined with ``_`` when nested, else ``output_<i>``."""
    if isinstance(out, torch.Tensor):
        return [prefix or "output"]
    if isinstance(out, Mapping):
        return [n for k, v in out.items() for n in output_names(v, f"{prefix}_{k}" if prefix else _sanitize(str(k)))]
    if isinstance(out, (tuple, list)):
        return [n for i, v in enumerate(out) for n in output_names(v, f"{prefix or 'output'}_{i}")]
    return []


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output in order: a tensor, or nested tuples/lists/mappings
    (a transformers ``ModelOutput`` gives its non-None fields). Non-tensor leaves (None, a
    key-value cache object) are not outputs and are skipped."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)]
    return []


class KeywordInputs(torch.nn.Module):
    """Traceable view of ``model``: ``forward(*tensors)`` calls ``model(**dict(zip(names, tensors)))``
    (or ``model(*tensors)`` when ``names`` is None) and returns :func:`flatten_outputs` as a tuple.

    Inputs at ``bool_positions`` arrive as int32 (Core ML has no bool inputs) and are turned
    back into bool before the model sees them. The wrapped model is held as the ``model``
    attribute, unchanged; after a call, ``output_names`` holds :func:`output_names` of its output.
    """

    def __init__(self, model: torch.nn.Module, names: tuple[str, ...] | None, bool_positions: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.model = model
        self.names = names
        self.bool_positions = tuple(bool_positions)
        self.output_names: list[str] = []

    def forward(self, *tensors) -> Any:
        """``(*tensors)`` in input order -> tuple of output tensors."""
        tensors = tuple(t != 0 if i in self.bool_positions else t for i, t in enumerate(tensors))
        out = self.model(**dict(zip(self.names, tensors))) if self.names else self.model(*tensors)
        flat = flatten_outputs(out)
        self.output_names = output_names(out)
        if not flat:
            raise ConfigError(f"the model returned no tensor (got {type(out).__name__})", "model")
        return tuple(flat)
