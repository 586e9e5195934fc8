"""Running a user's model for a check without changing it (``quanta._run.state_guard``).

The checks run the model once (batch 0 of the calibration data, an exporter's example input).
A forward may change the model: a call counter (``self.calls += 1``), a running buffer
(``self.running.mul_(0.9).add_(x.mean())``), even a parameter (``self.bias.data += 1``).
:func:`untouched` restores all of it afterwards:

- tensors (parameters, buffers, tensor attributes) written in place are copied just before their
  first write (a ``TorchDispatchMode`` sees every in-place op), so only what the forward changes
  is copied: no second copy of a large model's weights;
- each module's plain attributes (numbers, strings, tensors, lists, dicts, sets: a shallow copy)
  and its parameter, buffer and submodule tables are put back as they were, and attributes the
  forward added are removed.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["untouched"]


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # meta tensors, subclasses without storage
        return None


class _CopyBeforeWrite(TorchDispatchMode):
    """Copies a watched tensor's storage the first time an op writes into it."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ in a dynamo "disable" that imports torch._dynamo
        # on the first op: 1-3 s of a first quantize call (the dry forward) on a busy machine. The
        # wrapper only matters where torch.compile runs inside the mode; kept when dynamo is
        # already loaded (a process that compiles), left out otherwise (torch's documented switch).
        return "torch._dynamo" in sys.modules

    def __init__(self, watched: list[torch.Tensor]):
        super().__init__()
        self.by_storage: dict[int, list[torch.Tensor]] = {}
        for t in watched:
            key = _storage_key(t)
            if key is not None and key != 0:
                self.by_storage.setdefault(key, []).append(t)
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (tensor, copy of its values)

    def _save(self, arg: Any) -> None:
        if not isinstance(arg, torch.Tensor):
            return
        key = _storage_key(arg)
        for t in self.by_storage.get(key, ()):
            if id(t) not in self.saved:
                self.saved[id(t)] = (t, t.detach().clone())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = getattr(func, "_schema", None)
        for i, arg in enumerate(schema.arguments if schema is not None else ()):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = kwargs[arg.name] if arg.name in kwargs else (args[i] if i < len(args) else None)
                for item in (value if isinstance(value, (list, tuple)) else (value,)):
                    self._save(item)
        return func(*args, **kwargs)

    def restore(self) -> None:
        with torch.no_grad():
            for t, copy in self.saved.values():
                t.copy_(copy)


_CONTAINERS = (list, dict, set)


def _module_state(module: torch.nn.Module) -> dict[str, tuple[Any, Any]]:
    """name -> (object, shallow copy of its contents or None) for each entry of the module's __dict__."""
    out = {}
    for key, value in vars(module).items():
        out[key] = (value, value.copy() if isinstance(value, _CONTAINERS) else None)
    return out


def _put_back(module: torch.nn.Module, state: dict[str, tuple[Any, Any]]) -> None:
    current = vars(module)
    for key in [k for k in current if k not in state]:
        del current[key]
    for key, (value, contents) in state.items():
        if current.get(key) is not value:
            current[key] = value
        if contents is not None:  # the same container object (hooks keep references to it): refill it
            value.clear()
            if isinstance(value, list):
                value.extend(contents)
            else:
                value.update(contents)


def _tensor_attributes(module: torch.nn.Module) -> list[torch.Tensor]:
    return [v for v in vars(module).values() if isinstance(v, torch.Tensor)]


@contextmanager
def untouched(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, run ``model`` as a check; afterwards its parameters, buffers, tensor
    attributes (values and tables), plain attributes and training flag are as before, also when
    the block raises."""
    modules = list(model.modules())
    states = [_module_state(m) for m in modules]
    watched = [*model.parameters(), *model.buffers()]
    for m in modules:
        watched += _tensor_attributes(m)
    mode = _CopyBeforeWrite(watched)
    try:
        with mode:
            yield
    finally:
        mode.restore()
        for m, state in zip(modules, states):
            _put_back(m, state)
