"""Which layers GPTQ's calibration reaches, and how their inputs are captured.

GPTQ learns a layer's Hessian from the inputs the layer receives while the model runs on the
calibration data. Most layers are called as modules, and a forward pre-hook sees their input.
Two cases need more:

- ``nn.MultiheadAttention`` uses its ``out_proj`` weight (and ``in_proj_weight``) through
  ``F.multi_head_attention_forward``, without calling ``out_proj``. :class:`AttentionFeed`, a
  forward hook on the attention module, recovers the inputs of both: the query (for a
  self-attention ``in_proj_weight``, whose query, key and value are one tensor) and the
  concatenated heads before the output projection (the attention run again with an identity
  ``out_proj``, calibration only).
- A layer that is never reached (a dead branch, a weight used functionally elsewhere) gets no
  inputs at all; the reference GPTQ would zero it. :func:`unreached` finds such layers with one
  forward pass of the float model, before any weight changes, so the algorithm can refuse them
  (or quantize them data-free, when the user asked for that).

PyTorch's fused "fast path" for transformer layers (eval mode, no grad) runs
``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` without calling their submodules;
:func:`no_fastpath` turns it off while GPTQ calibrates.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from quanta._run.calibration import call_model, to_device

__all__ = ["no_fastpath", "AttentionFeed", "attach_hooks", "unreached", "dead_columns"]

_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


@contextmanager
def no_fastpath() -> Iterator[None]:
    """Within the block, PyTorch's fused transformer fast path is off (restored after)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def _batch_first(mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """``x`` with the batch dimension first (the Hessian hooks count samples on dimension 0)."""
    return x.transpose(0, 1) if x.dim() == 3 and not mha.batch_first else x


def _attention_parents(scope: nn.Module) -> dict[int, nn.MultiheadAttention]:
    """``id(out_proj) -> the MultiheadAttention that owns it`` within ``scope``."""
    return {id(m.out_proj): m for m in scope.modules() if isinstance(m, nn.MultiheadAttention)}


class AttentionFeed:
    """A forward hook on one ``nn.MultiheadAttention`` that feeds the Hessian hooks of its
    ``out_proj`` (``out_hook``) and of its ``in_proj_weight`` (``in_hook``).

    ``in_hook`` gets the query; when a call's query, key and value are not one tensor
    (cross-attention), ``in_hook.mixed`` is set True: the three row blocks of ``in_proj_weight``
    would need three Hessians, and the algorithm falls back to round-to-nearest for it.
    """

    def __init__(self, mha: nn.MultiheadAttention, out_hook=None, in_hook=None) -> None:
        self.mha, self.out_hook, self.in_hook = mha, out_hook, in_hook
        self._inside = False
        self.handle = mha.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, mha, args, kwargs, output) -> None:
        if self._inside:  # the identity re-run below calls the module again
            return
        bound = _MHA_SIGNATURE.bind(mha, *args, **kwargs).arguments
        query, key, value = bound["query"], bound["key"], bound["value"]
        if self.in_hook is not None:
            if not (query is key and key is value):
                self.in_hook.mixed = True
            self.in_hook.add(_batch_first(mha, query.detach()))
        if self.out_hook is not None:
            weight = mha.out_proj.weight
            swap = {"out_proj.weight": torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)}
            if mha.out_proj.bias is not None:
                swap["out_proj.bias"] = torch.zeros_like(mha.out_proj.bias)
            self._inside = True
            try:
                heads = torch.func.functional_call(mha, swap, args, kwargs)
            finally:
                self._inside = False
            heads = heads[0] if isinstance(heads, (tuple, list)) else heads
            self.out_hook.add(_batch_first(mha, heads.detach()))


def attach_hooks(scope: nn.Module, layers: Iterable[tuple[nn.Module, str]], make: Callable[..., Any]) -> dict:
    """Hessian hooks for ``layers`` (``(module, param)`` pairs inside ``scope``), keyed by module.

    ``make(module, weight=None, attach=True)`` builds one hook (``attach=False``: fed by an
    :class:`AttentionFeed` rather than a pre-hook of its own). Every hook has ``handle`` (removing
    it twice is harmless)."""
    parents = _attention_parents(scope)
    hooks: dict[Any, Any] = {}
    feeds: dict[Any, Any] = {}
    for module, param in layers:
        if isinstance(module, nn.MultiheadAttention):  # its in_proj_weight
            hooks[module] = make(module, weight=getattr(module, param), attach=False)
            feeds.setdefault(module, {})["in_hook"] = hooks[module]
        elif id(module) in parents:  # an attention module's out_proj
            hooks[module] = make(module, attach=False)
            feeds.setdefault(parents[id(module)], {})["out_hook"] = hooks[module]
        else:
            hooks[module] = make(module)
    for mha, roles in feeds.items():
        feed = AttentionFeed(mha, **roles)
        for hook in roles.values():
            hook.handle = feed.handle
    return hooks


def unreached(model: nn.Module, modules: Iterable[nn.Module], sample: Any) -> list[nn.Module]:
    """The ``modules`` that one forward pass of ``model`` on ``sample`` never reaches (an attention
    module's ``out_proj`` counts as reached when the attention module runs). Changes nothing."""
    modules = list(modules)
    parents = _attention_parents(model)
    seen: set[int] = set()
    handles = []
    for module in modules:
        watched = parents.get(id(module), module)
        handles.append(watched.register_forward_pre_hook(lambda m, a, key=id(module): seen.add(key)))
    home = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), no_fastpath():
            call_model(model, to_device(sample, home))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [m for m in modules if id(m) not in seen]


def dead_columns(hessian: torch.Tensor, per_channel: int) -> int:
    """Input channels whose inputs were zero on every calibration sample (``diag(H) == 0``; a
    convolution's channel counts when any of its ``per_channel`` kernel columns is dead)."""
    dead = hessian.diagonal() == 0
    if per_channel > 1:
        dead = dead.reshape(-1, per_channel).any(dim=1)
    return int(dead.sum())
