"""``torchrun -m quanta quantize``: the process group the command joins when torchrun started it.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` for
every process it starts; with them (and no group initialized yet) the command initializes the
default group itself: NCCL when the recipe computes on CUDA (an algorithm option ``device:
cuda``; each rank then uses GPU ``LOCAL_RANK``), else gloo. Every rank runs the same command;
rank 0 writes the outputs and prints the report, the others write nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterator

__all__ = ["process_group", "launched_by_torchrun"]


def launched_by_torchrun() -> bool:
    """Whether torchrun's variables name this process's place in a group."""
    return all(os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _wants_cuda(recipe: Any) -> bool:
    for stage in recipe.stage_recipes():
        device = getattr(stage.algorithm_config, "device", None)
        if device is not None and str(device).startswith("cuda"):
            return True
    return False


@contextlib.contextmanager
def process_group(recipe: Any, timeout_s: float) -> Iterator[None]:
    """Within the block, the default process group torchrun's variables describe (initialized
    here and destroyed on the way out), or nothing when the process was not started by torchrun
    or a group already exists."""
    import torch
    import torch.distributed as dist

    if not launched_by_torchrun() or not dist.is_available() or dist.is_initialized():
        yield
        return
    backend = "gloo"
    if _wants_cuda(recipe) and torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()
