"""Which layers GPTQ's calibration reaches, and how their inputs are captured.

GPTQ learns a layer's Hessian from the inputs the layer receives while the model runs on the
calibration data. Most layers are called as modules, and a forward pre-hook sees their input.
Two cases need more:

- ``nn.MultiheadAttention`` uses its ``out_proj`` weight (and ``in_proj_weight``, or the separate
  ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when key and value widths differ) through
  ``F.multi_head_attention_forward``, without calling ``out_proj``. :class:`AttentionFeed`, a
  forward hook on the attention module, recovers the inputs of all of them: the query, key and
  value (a packed ``in_proj_weight`` gets one Hessian per row block in cross-attention,
  :class:`PackedInputs`) and the concatenated heads before the output projection (the attention
  run again with an identity ``out_proj``, calibration only).
- A layer that is never reached (a dead branch, a weight used functionally elsewhere) gets no
  inputs at all; the reference GPTQ would zero it. :func:`unreached` finds such layers with one
  forward pass of the float model, before any weight changes, so the algorithm can refuse them
  (or quantize them data-free, when the user asked for that).

PyTorch's fused "fast path" for transformer layers (eval mode, no grad) runs
``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` without calling their submodules;
:func:`no_fastpath` turns it off while GPTQ calibrates.
"""

from __future__ import annotations

import functools

import inspect
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from quanta._run.calibration import call_model, to_device

__all__ = ["no_fastpath", "AttentionFeed", "PackedInputs", "SEPARATE_PROJECTIONS", "attach_hooks", "unreached",
           "dead_columns"]

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


class PackedInputs:
    """The inputs of an attention's packed ``in_proj_weight`` ``[3E, E]``, whose row blocks project
    the query (rows ``0:E``), the key (``E:2E``) and the value (``2E:3E``).

    Self-attention calls (query, key and value one tensor) feed one Hessian shared by the three
    blocks; cross-attention calls feed one per block, from the query, key and value inputs.
    ``make()`` builds each accumulator (a Hessian hook: ``add``, ``flush``, ``finish``, ``samples``,
    ``hessian()``, ``owner``). Under ``torch.distributed`` (``eager``) the three per-block
    accumulators exist from the start, so every rank folds the same ones; in one process they are
    made at the first cross-attention call."""

    def __init__(self, make: Callable[[], Any], eager: bool = False) -> None:
        self._make = make
        self.shared = make()
        self.parts: list[Any] | None = [make() for _ in range(3)] if eager else None
        self.handle = None

    @property
    def owner(self) -> int:
        """The rank that holds the sums (the shared accumulator's)."""
        return self.shared.owner

    @property
    def samples(self) -> int:
        """Calls seen (the calibration samples that reached the attention)."""
        return self.shared.samples + (self.parts[0].samples if self.parts else 0)

    def add_qkv(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Accumulate one call's query, key and value (batch first)."""
        if query is key and key is value:
            self.shared.add(query)
            return
        if self.parts is None:
            self.parts = [self._make() for _ in range(3)]
        for part, x in zip(self.parts, (query, key, value)):
            part.add(x)

    def flush(self) -> None:
        """*Collective* where the accumulators' ``flush`` is."""
        for hook in (self.shared, *(self.parts or ())):
            hook.flush()

    def finish(self) -> None:
        """*Collective* where the accumulators' ``finish`` is."""
        for hook in (self.shared, *(self.parts or ())):
            hook.finish()

    def hessians(self) -> list[torch.Tensor]:
        """The Hessians of the query, key and value row blocks: one tensor three times when every call
        was self-attention, else each block's own (the self-attention calls counted in all three)."""
        if self.parts is None or self.parts[0].samples == 0:
            h = self.shared.hessian()
            return [h, h, h]
        own = [p.hessian() for p in self.parts]
        n = self.shared.samples
        if n == 0:
            return own
        shared = self.shared.hessian()
        # H = 2/n Σ xᵀx: the sums add, the counts add.
        return [(shared * n + h * p.samples) / (n + p.samples) for h, p in zip(own, self.parts)]


#: The separate projection weights of an attention whose key/value widths differ from the query's
#: (``_qkv_same_embed_dim=False``), by the input that feeds each.
SEPARATE_PROJECTIONS = {"q_proj_weight": "query", "k_proj_weight": "key", "v_proj_weight": "value"}


class AttentionFeed:
    """A forward hook on one ``nn.MultiheadAttention`` that feeds the Hessian hooks of its
    weights used through ``F.multi_head_attention_forward``: ``out_proj`` (``out_hook``), the packed
    ``in_proj_weight`` (``in_hook``, a :class:`PackedInputs`) and the separate ``q_proj_weight``,
    ``k_proj_weight``, ``v_proj_weight`` (``proj_hooks``, by parameter name)."""

    def __init__(self, mha: nn.MultiheadAttention, out_hook=None, in_hook=None, proj_hooks=None) -> None:
        self.mha, self.out_hook, self.in_hook = mha, out_hook, in_hook
        self.proj_hooks = dict(proj_hooks or {})
        self._inside = False
        self.handle = mha.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, mha, args, kwargs, output) -> None:
        if self._inside:  # the identity re-run below calls the module again
            return
        bound = _MHA_SIGNATURE.bind(mha, *args, **kwargs).arguments
        inputs = {"query": bound["query"], "key": bound["key"], "value": bound["value"]}
        if self.in_hook is not None:
            q, k, v = inputs["query"], inputs["key"], inputs["value"]
            same = q is k and k is v
            q = _batch_first(mha, q.detach())
            self.in_hook.add_qkv(q, q if same else _batch_first(mha, k.detach()),
                                 q if same else _batch_first(mha, v.detach()))
        for param, hook in self.proj_hooks.items():
            hook.add(_batch_first(mha, inputs[SEPARATE_PROJECTIONS[param]].detach()))
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


def attach_hooks(scope: nn.Module, layers: Iterable[tuple[nn.Module, str]], make: Callable[..., Any],
                 eager_parts: bool = False) -> dict:
    """Hessian hooks for ``layers`` (``(module, param)`` pairs inside ``scope``), keyed by the pair.

    ``make(module, key=(module, param), weight=None, attach=True)`` builds one hook (``attach=False``:
    fed by an :class:`AttentionFeed` rather than a pre-hook of its own); a packed ``in_proj_weight``
    gets a :class:`PackedInputs` of such hooks (``eager_parts``: its per-block ones made up front).
    Every hook has ``handle`` (removing it twice is harmless)."""
    parents = _attention_parents(scope)
    hooks: dict[Any, Any] = {}
    feeds: dict[Any, Any] = {}
    for module, param in layers:
        key = (module, param)
        if isinstance(module, nn.MultiheadAttention) and param in SEPARATE_PROJECTIONS:
            hooks[key] = make(module, key=key, weight=getattr(module, param), attach=False)
            feeds.setdefault(module, {}).setdefault("proj_hooks", {})[param] = hooks[key]
        elif isinstance(module, nn.MultiheadAttention):  # its packed in_proj_weight
            weight = getattr(module, param)
            hooks[key] = PackedInputs(functools.partial(make, module, key=key, weight=weight, attach=False),
                                      eager=eager_parts)
            feeds.setdefault(module, {})["in_hook"] = hooks[key]
        elif id(module) in parents:  # an attention module's out_proj
            hooks[key] = make(module, key=key, attach=False)
            feeds.setdefault(parents[id(module)], {})["out_hook"] = hooks[key]
        else:
            hooks[key] = make(module, key=key)
    for mha, roles in feeds.items():
        feed = AttentionFeed(mha, **roles)
        for hook in (roles.get("out_hook"), roles.get("in_hook"), *roles.get("proj_hooks", {}).values()):
            if hook is not None:
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


def all_reached(model: nn.Module, modules: Iterable[nn.Module], names: frozenset[str]) -> bool:
    """Whether each of ``modules`` (an attention's ``out_proj``: the attention module, as in
    :func:`unreached`) is among ``names``, the qualified names of the modules whose forward ran in a
    pass of ``model`` (``RunContext.reached``). False when one is not: only a pass of its own decides then."""
    parents = _attention_parents(model)
    qualified = {id(m): name for name, m in model.named_modules()}
    return all(qualified.get(id(parents.get(id(m), m))) in names for m in modules)


def dead_columns(hessian: torch.Tensor, per_channel: int) -> int:
    """Input channels whose inputs were zero on every calibration sample (``diag(H) == 0``; a
    convolution's channel counts when any of its ``per_channel`` kernel columns is dead)."""
    dead = hessian.diagonal() == 0
    if per_channel > 1:
        dead = dead.reshape(-1, per_channel).any(dim=1)
    return int(dead.sum())
