"""Checks of the model and the compute device, run before any weight changes (``quanta._run.model_checks``).

- :func:`check_model`: a torch model whose weights sit on the ``meta`` device (a skeleton from
  ``init_empty_weights`` or ``device="meta"``) is refused: quanta needs the weights in memory
  (streaming such models block by block is planned, not yet built); a string or path that no
  backend reads is refused naming what each backend reads.
- :func:`check_device`: a device string torch does not know, ``cuda`` without a CUDA build or
  GPU, a GPU index past the last one, or ``mps`` where Metal is unavailable.
- :func:`check_units`: a model with no weight any backend quantizes.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import torch

from quanta.errors import DeviceError, ModelError

__all__ = ["check_model", "check_device", "check_units", "STREAMING_NOTE"]

STREAMING_NOTE = ("quantizing a meta-device skeleton by streaming one block's weights at a time is planned "
                  "(docs/architecture.md, 'Large models stream') but not yet supported")


def check_model(model: Any, *, need_values: bool = True) -> None:
    """Refuse a model quanta cannot work on before anything else runs (see the module docstring).

    ``need_values=False`` (``quanta.plan``: shapes are enough) accepts a meta-device model.
    """
    if isinstance(model, torch.nn.Module):
        if not need_values:
            return
        meta = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
        if meta:
            raise ModelError(f"the model's weights are on the 'meta' device ({len(meta)} tensors, e.g. "
                             f"{meta[0]!r}): they hold no values to quantize. Load the weights into memory "
                             f"first (e.g. from_pretrained without device_map='meta'); {STREAMING_NOTE}")
        return
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.exists(path):
            raise ModelError(f"no file or folder at {path!r}: pass a torch.nn.Module, or the path of a Core ML "
                             ".mlpackage")
        if os.path.isfile(path) and not path.endswith((".mlpackage", ".mlmodel")):
            raise ModelError(f"{path!r} is a file, not a model quanta reads from a path: load a torch model with "
                             "torch.load first (CLI: --model PATH), or pass a Core ML .mlpackage folder")


def check_device(device: Any) -> torch.device | None:
    """``device`` as a ``torch.device`` after checking this machine has it; None stays None.

    Raises :class:`DeviceError` naming the device and what is available.
    """
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"device {device!r} is not a torch device ({exc}); use 'cpu', 'cuda', 'cuda:N' or "
                          "'mps'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)")
            raise DeviceError(f"device {device!r} asked for, but {why}; use device='cpu' or leave device unset")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"device {device!r} asked for, but this machine has {count} CUDA GPU(s) "
                              f"(cuda:0..cuda:{count - 1})")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"device {device!r} asked for, but Metal (MPS) is not available here; use 'cpu'")
    elif dev.type not in ("cpu",):
        raise DeviceError(f"device {device!r} is not supported for quantization; use 'cpu', 'cuda' or 'mps'")
    return dev


def check_units(plan, model: Any) -> None:
    """Refuse a model in which the backend found no quantizable weight at all."""
    if not plan.layers:
        what = repr(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else f"the {type(model).__name__}"
        raise ModelError(f"{what} has no weight the {plan.backend!r} backend can quantize (torch: Linear, Conv, "
                         "ConvTranspose, Embedding and MultiheadAttention weights; Core ML: float const weights, "
                         "not already-compressed ones); check that you passed the model you meant")
