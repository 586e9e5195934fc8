"""The embedding rows calibration looks up: recorded while the blocks run, and read alone from
the checkpoint for the last pass (an untied input embedding costs only those rows)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from quanta._files.checkpoints import CheckpointTensors

__all__ = ["looked_up", "read_looked_up_rows"]


@contextlib.contextmanager
def looked_up(model: nn.Module) -> Iterator[dict[str, set[int] | None]]:
    """Within the block, the rows each ``nn.Embedding`` of ``model`` looks up (None: called
    without an index tensor, so unknown)."""
    seen: dict[str, set[int] | None] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            seen[name] = set()

            def hook(mod, args, kwargs, name=name) -> None:
                x = args[0] if args else kwargs.get("input")
                rows = seen[name]
                if rows is not None:
                    if isinstance(x, torch.Tensor) and not x.is_floating_point():
                        rows.update(x.reshape(-1).unique().tolist())
                    else:
                        seen[name] = None

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def read_looked_up_rows(model: nn.Module, looked_up: dict, selected: set[str], tensors: CheckpointTensors) -> None:
    """For the last pass, read only the rows the calibration samples look up of each embedding
    that pass does not quantize and no other layer shares (an untied LM head's input embedding):
    the pass computes the same hidden states, and the other rows cost no memory."""
    every = [p for m in model.modules() for p in m._parameters.values() if p is not None]
    for name, rows in looked_up.items():
        module = model.get_submodule(name)
        weight = module._parameters.get("weight")
        key = f"{name}.weight"
        if (rows is None or name in selected or weight is None or weight.device.type != "meta"
                or key not in tensors.source.weight_map or sum(p is weight for p in every) > 1):
            continue
        with tensors.reading():
            module._parameters["weight"] = nn.Parameter(tensors.get_rows(key, sorted(rows)), requires_grad=False)
