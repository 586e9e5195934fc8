"""Algorithm ``gptq``: layer-wise, Hessian-based weight quantization from calibration data.

The model is processed one block at a time (the children of its largest ``nn.ModuleList``
of layers, e.g. a transformer's layers; else its top-level children when it is a
``Sequential``; else the whole model as one block). The first block's inputs (positional
and keyword: attention masks travel with every sample) are cached once; for each block the
Hessians ``H = 2/n Σ xᵀx`` of its Linear/Conv layers are accumulated in float32 from that
block's inputs, the layers are solved with the GPTQ column solver, and the *quantized*
block's outputs replace the cached inputs for the next block. Memory holds one block's
activations. Layers outside the blocks are calibrated by a final pass of the (already
quantized) model. Stateful keyword inputs (a decoder's key-value cache) are copied for every
block call, so a cache filled by one call never reaches the next. Weights GPTQ cannot calibrate (Embedding, MultiheadAttention input
projections, grouped convs, ConvTranspose) get round-to-nearest, said in the report.

No layer is quantized blind: ``nn.MultiheadAttention``'s ``out_proj`` (and a self-attention
``in_proj_weight``), used through ``F.multi_head_attention_forward``, get their inputs captured
(:mod:`.capture`); a layer the calibration data never reaches is refused before any weight
changes (``uncalibrated: rtn`` quantizes it data-free instead). Input channels that never fire
are reported per layer (``dead_inputs``); the reference GPTQ zeroes their weights
(``dead_inputs: zero``, the default), ``dead_inputs: rtn`` keeps and rounds them.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable

import attrs
import torch
import torch.nn.functional as F
from torch import nn

import quanta
from quanta._run.calibration import call_model, fresh_state, hidden_state, take_samples, to_device
from quanta.errors import ConfigError, QuantizationError
from quanta._run.model_checks import check_device
from quanta.contracts import Algorithm
from quanta._records.qmath import scale_shape
from quanta.record import QuantizedWeight
from quanta._records.spec import Granularity
from quanta._run.weights import check_finite, scheme_for

from .capture import SEPARATE_PROJECTIONS, all_reached, attach_hooks, dead_columns, no_fastpath, unreached
from .gemm import linear_forward
from .hessian import HessianHook, solve_cost
from .quantizer import PluginQuantizer
from .solver import WorkBuffers, gptq_quantize

__all__ = ["GPTQConfig", "GPTQ", "PluginQuantizer", "find_blocks"]


def _doc(text: str) -> dict:
    return {"doc": text}


@attrs.frozen(kw_only=True)
class GPTQConfig:
    """Options of the ``gptq`` algorithm (coremltools' names where they exist)."""

    calibration_nsamples: int = attrs.field(default=128, metadata=_doc(
        "calibration samples (rows of the batches; whole batches are read until there are this many)"))
    hessian_dampening: float = attrs.field(default=0.01, metadata=_doc("dampening as a fraction of mean(diag(H))"))
    processing_group_size: int = attrs.field(default=128, metadata=_doc("columns per lazy batch update"))
    use_activation_order_heuristic: bool = attrs.field(
        default=True, metadata=_doc("quantize columns by descending Hessian diagonal (act-order; quanta.compat "
                                    "keeps coremltools' False)"))
    static_groups: bool = attrs.field(default=True, metadata=_doc(
        "per-block qparams fitted up front on the float weight (quanta.compat keeps coremltools' False)"))
    input_cacher: str = attrs.field(
        default="default", metadata=_doc("'default' or 'gpt' (coremltools' names): both cache the first block's "
                                         "positional and keyword inputs"))
    layers: Any = attrs.field(default=None, metadata=_doc("block names or 're:' patterns to process (default: found)"))
    device: Any = attrs.field(default=None, metadata=_doc("torch device for the computation (default: the model's)"))
    enable_normal_float: bool = attrs.field(default=False, metadata=_doc("coremltools' NF mode (not supported)"))
    uncalibrated: str = attrs.field(default="error", metadata=_doc(
        "a layer the calibration data never reaches (dead branch, functional use): 'error' refuses before "
        "any weight changes, 'rtn' quantizes it data-free (round-to-nearest)"))
    dead_inputs: str = attrs.field(default="zero", metadata=_doc(
        "input channels that are zero on all calibration data: 'zero' zeroes their weights (reference GPTQ, "
        "coremltools), 'rtn' keeps and rounds them (data-free)"))

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.calibration_nsamples, int) or self.calibration_nsamples < 1:
            raise ConfigError(f"must be a positive integer, got {self.calibration_nsamples!r}", "calibration_nsamples")
        if not isinstance(self.processing_group_size, int) or self.processing_group_size < 1:
            raise ConfigError(f"must be a positive integer, got {self.processing_group_size!r}", "processing_group_size")
        if not 0 <= float(self.hessian_dampening) < 1:
            raise ConfigError(f"must be in [0, 1), got {self.hessian_dampening!r}", "hessian_dampening")
        if self.input_cacher not in ("default", "gpt"):
            raise ConfigError(f"unknown input cacher {self.input_cacher!r} (allowed: default, gpt)", "input_cacher")
        if self.uncalibrated not in ("error", "rtn"):
            raise ConfigError(f"unknown value {self.uncalibrated!r} (allowed: error, rtn)", "uncalibrated")
        if self.dead_inputs not in ("zero", "rtn"):
            raise ConfigError(f"unknown value {self.dead_inputs!r} (allowed: zero, rtn)", "dead_inputs")
        if self.enable_normal_float:
            raise ConfigError("normal-float (NF) quantization is not supported by quanta's gptq; use a scheme plugin",
                              "enable_normal_float")


class _Stop(Exception):
    """Raised by the input cacher's hook to end a forward pass early."""


def find_blocks(model: nn.Module, names: Iterable[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The blocks processed in order: named ones, else the largest ModuleList's children, else
    a Sequential's children, else ``[("", model)]``."""
    modules = dict(model.named_modules())
    if names:
        import re

        out: list[tuple[str, nn.Module]] = []
        for pattern in names:
            hits = [n for n in modules if (re.fullmatch(pattern[3:], n) if pattern.startswith("re:") else n == pattern)]
            if not hits:
                raise ConfigError(f"no module named {pattern!r}", "layers")
            out.extend((n, modules[n]) for n in hits)
        return out
    lists = [(n, m) for n, m in modules.items() if isinstance(m, nn.ModuleList) and len(m) >= 2]
    if lists:
        name, best = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
        return [(f"{name}.{i}", child) for i, child in enumerate(best)]
    if isinstance(model, nn.Sequential):
        return [(n, c) for n, c in model.named_children()]
    return [("", model)]


def _calibratable(module: nn.Module) -> str | None:
    """None when GPTQ can calibrate this module's weight, else the reason it cannot."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and not isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
        if module.groups != 1:
            return "grouped convolution"
        if module.padding_mode != "zeros":
            return f"padding_mode {module.padding_mode!r}"
        return None
    return f"{type(module).__name__} weights get no calibration inputs"


def _calibratable_layer(layer: Any, module: nn.Module) -> str | None:
    """None when GPTQ can calibrate this planned layer (computed by ``module``), else the reason it
    gets round-to-nearest."""
    if isinstance(module, nn.MultiheadAttention):
        if layer.unit.param == "in_proj_weight" or layer.unit.param in SEPARATE_PROJECTIONS:
            return None
        return f"{layer.unit.param} of an attention gets no calibration inputs"
    return _calibratable(module)


def _blind_error(names: list[str]) -> QuantizationError:
    shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    first = names[0]
    return QuantizationError(
        f"gptq: the calibration data never reaches layer(s) {shown} (a branch forward() does not take, or a "
        f"weight used functionally): GPTQ would quantize them blind (zeroed). Nothing was changed. Either leave "
        f"them float (module_name_configs: {{{first!r}: null}}) or quantize them data-free with round-to-nearest "
        f"(gptq option uncalibrated: rtn)", first)


class GPTQ(Algorithm):
    """GPTQ (Frantar et al., 2022) with layer-sequential calibration and the plugin schemes."""

    name = "gptq"
    description = "GPTQ: Hessian-based, layer-wise weight quantization from calibration data"
    config_class = GPTQConfig
    needs_data = True
    backends = frozenset({"torch"})  # walks torch modules itself: refused at plan time on other backends
    #: Weights are read (forwards, the solver works on its own copies) and replaced through the
    #: backend, never written in place: the working copy shares the float weights' storage.
    shares_float_weights = True
    #: What coremltools' LayerwiseCompressor quantizes from its global_config.
    global_types = {"torch": ("Conv2d", "Linear")}

    def max_batches(self) -> int:
        """``calibration_nsamples``: GPTQ reads at most that many batches (each holds one sample or more)."""
        return self.config.calibration_nsamples

    def validate(self, plan, recipe) -> None:
        check_device(self.config.device)  # DeviceError before any work, as for quantize(device=...)
        for layer in plan.selected:
            if layer.spec.granularity is Granularity.per_tensor:
                raise ConfigError(f"gptq supports per_channel and per_block, not per_tensor (layer {layer.name!r})",
                                  "granularity")
            if layer.spec.output_block_size not in (None, 1):
                raise ConfigError(f"gptq blocks the input axis only; output_block_size {layer.spec.output_block_size} "
                                  f"(a 2-D block) is not supported (layer {layer.name!r})", "block_size")

    def run(self, model, plan, data, context) -> None:
        cfg: GPTQConfig = self.config
        device = torch.device(cfg.device or context.device or next(model.parameters()).device)
        samples = _take(data, cfg.calibration_nsamples)
        todo, rtn = {}, []
        for layer in plan.selected:
            module = context.module(model, layer)
            reason = _calibratable_layer(layer, module)
            if reason is None:  # keyed by (module, param): one attention holds up to three weights
                todo[(module, layer.unit.param)] = layer
            else:
                rtn.append((layer, reason))
        # Before any weight changes: every layer GPTQ calibrates must receive inputs. Core's dry
        # forward of the same first batch, on the model as this stage gets it, answers that when it
        # reached them all; otherwise (or in a later stage) a pass of our own (fast path off) decides.
        modules = {key[0]: None for key in todo}
        first = context.data[0] if context.data else None
        if context.reached is not None and samples[0] is first and all_reached(model, modules, context.reached):
            missed: set[int] = set()
        else:
            missed = {id(m) for m in unreached(model, modules, samples[0])}
        blind = [key for key in todo if id(key[0]) in missed]
        if blind and cfg.uncalibrated == "error":
            raise _blind_error([todo[key].name for key in blind])
        for key in blind:
            rtn.append((todo.pop(key), "no calibration inputs reach it; uncalibrated: rtn"))
        for layer, reason in rtn:
            context.quantize_layer(model, layer, extra={"method": f"rtn ({reason})"})
        if not todo:
            return
        was_training = model.training
        model.eval()
        self._dead: list[Any] = []
        self._workspace = WorkBuffers()  # the sweep's work buffers, reused by the next layer of the same size
        try:
            with torch.no_grad(), no_fastpath():
                self._run_blocks(model, todo, samples, cfg, device, context)
        finally:
            model.train(was_training)
            self._workspace.clear()
        if self._dead and cfg.dead_inputs == "zero":
            listed = "; ".join(f"{name}: {n}" for name, n in self._dead)
            warnings.warn(f"gptq: input channels that never fire on the calibration data, weights zeroed (set the "
                          f"gptq option dead_inputs: rtn to quantize them data-free): {listed}", stacklevel=2)

    def _run_blocks(self, model, todo, samples, cfg, device, context) -> None:
        ranks = context.ranks
        blocks = find_blocks(model, cfg.layers)
        block_modules = [b for _, b in blocks if any(m is b or _contains(b, m) for m, _ in todo)]
        scratch: dict = {}  # one partial-product buffer per Hessian size (one process)

        def hooks_for(scope: nn.Module, layers: dict) -> dict:
            owner = _owners(layers, ranks)
            return attach_hooks(scope, list(layers),
                                lambda m, key, **kw: HessianHook(m, device, ranks=ranks, owner=owner[key],
                                                                 scratch=scratch, **kw),
                                eager_parts=ranks.active)

        if blocks and blocks[0][1] is not model and block_modules:
            # This rank's calibration batches (all of them in one process): chunk index -> inputs.
            cache = _cache_inputs(model, blocks[0][1], samples, device, ranks.mine(len(samples)))
            peak = 0
            for name, block in blocks:
                peak = max(peak, _nbytes(cache))
                mine = {key: l for key, l in todo.items() if _contains(block, key[0])}
                home = _device_of(block)
                block.to(device)
                if mine:
                    # A block that is itself the only layer (a Sequential's Linear): its Hessian needs
                    # only the cached inputs, not a forward through it.
                    direct = [m for m, _ in mine] == [block] and not block._forward_pre_hooks and all(
                        not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor)
                        for args, kwargs in cache.values())
                    hooks = hooks_for(block, mine)
                    try:
                        for i in ranks.chunks(len(samples)):  # in steps; one chunk per rank per step
                            if i is not None:
                                args, kwargs = cache[i]
                                if direct:
                                    hooks[next(iter(mine))]._hook(block, args)
                                else:
                                    block(*args, **fresh_state(kwargs))
                            for hook in hooks.values():
                                hook.flush()
                        if name == blocks[-1][0]:
                            cache.clear()  # the last block's outputs feed nothing: free its inputs before the solves
                        self._solve(model, mine, hooks, cfg, device, context)
                    finally:  # a failure must not leave Hessian hooks on the user's (inplace) model
                        _remove_hooks(hooks)
                    for key in mine:
                        del todo[key]
                if name == blocks[-1][0]:
                    block.to(home)
                    break  # the last block's outputs feed nothing
                for i, (args, kwargs) in cache.items():  # quantized outputs feed the next block
                    # A plain Linear block: its product through oneDNN where gemm says (None: call it).
                    out = linear_forward(block, args[0]) if len(args) == 1 and not kwargs else None
                    if out is None:
                        out = hidden_state(block(*args, **fresh_state(kwargs)))
                    cache[i] = ((out, *args[1:]), kwargs)
                block.to(home)
            del cache
            # Accounting, not sampling: the cache is the only activation storage between blocks.
            context.stats["gptq_blocks"] = len(blocks)
            context.stats["gptq_peak_cached_activation_bytes"] = peak
        if todo:  # layers outside the blocks (heads, poolers): one pass of the quantized model
            home = _device_of(model)
            model.to(device)
            hooks = hooks_for(model, todo)
            try:
                for i in ranks.chunks(len(samples)):
                    if i is not None:
                        call_model(model, to_device(samples[i], device))
                    for hook in hooks.values():
                        hook.flush()
                self._solve(model, dict(todo), hooks, cfg, device, context)
            finally:
                _remove_hooks(hooks)
            model.to(home)

    def _solve(self, model, mine, hooks, cfg, device, context) -> None:
        """Solve each layer on its owner rank, then write every layer on every rank, in order."""
        ranks = context.ranks
        for (module, _), layer in mine.items():
            check_finite(getattr(module, layer.unit.param), layer.name)
        for hook in hooks.values():
            hook.finish()
            getattr(hook, "scratch", {}).clear()  # the accumulation's buffers: not needed by the solves
        solved: dict = {}
        if ranks.active:  # each rank solves the layers it owns first, then the results travel
            for key, layer in mine.items():
                hook = hooks[key]
                if hook.owner == ranks.rank and self._fallback_reason(hook, cfg, layer) is None:
                    solved[key] = self._solve_layer(key[0], layer, _hessians(hook), cfg, device)
        for key, layer in mine.items():
            module, hook = key[0], hooks[key]
            reason = self._fallback_reason(hook, cfg, layer)
            if reason is not None:
                context.quantize_layer(model, layer, extra={"method": f"rtn ({reason})"})
                continue
            if ranks.active:
                result = ranks.share(solved.pop(key, None), hook.owner)
            else:
                result = self._solve_layer(module, layer, _hessians(hook), cfg, device)
            self._write(model, module, layer, result, context)
            hook.xtx = result = None  # one layer's Hessian and solution at a time (memory)

    def _solve_layer(self, module, layer, hessians: list, cfg, device) -> dict:
        """GPTQ-solve one layer from its Hessians: codes, qparams, dequantized weight and figures.

        ``hessians``: one for the whole weight, or one per row block (a packed attention
        ``in_proj_weight`` in cross-attention: the query, key and value blocks), each block solved
        with its own and the results stacked in row order."""
        original = getattr(module, layer.unit.param).detach()
        w = original.to(device, torch.float32).reshape(original.shape[0], -1)
        spec = layer.spec
        per_col = original[0, 0].numel()  # kernel elements per input channel
        dead = sum(dead_columns(h, per_col) for h in hessians)
        if dead and cfg.dead_inputs == "rtn":  # a unit diagonal: the solver keeps (and rounds) their weights
            for hessian in hessians:
                hessian.diagonal()[hessian.diagonal() == 0] = 1.0
        block = spec.block_size * per_col if spec.granularity is Granularity.per_block else None
        rows = w.shape[0] // len(hessians)
        parts = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i, hessian in enumerate(hessians):
                parts.append(gptq_quantize(w[i * rows:(i + 1) * rows], hessian, PluginQuantizer(spec),
                                           block_size=block, processing_group_size=cfg.processing_group_size,
                                           damp=float(cfg.hessian_dampening),
                                           act_order=cfg.use_activation_order_heuristic,
                                           static_groups=cfg.static_groups, codes_dtype=spec.dtype.torch_storage,
                                           _overwrite_hessian=True,  # the hook's sum: dropped after
                                           _workspace=getattr(self, "_workspace", None)))
        for warning in caught:
            warnings.warn(f"layer {layer.name!r}: {warning.message}", stacklevel=2)
        cat = (lambda name: getattr(parts[0], name)) if len(parts) == 1 else \
            (lambda name: None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts]))
        return {"codes": cat("codes"), "scale": cat("scale"), "zero_point": cat("zero_point"),
                "weight": cat("weight"), "loss": sum(float(p.loss) for p in parts),
                "damp": max(float(p.damp) for p in parts), "dead": dead, "blocks": len(parts)}

    def _write(self, model, module, layer, result: dict, context) -> None:
        original = getattr(module, layer.unit.param).detach()
        spec = layer.spec
        sizes = spec.block_sizes(tuple(original.shape), 0, 1, layer.name)
        qshape = scale_shape(tuple(original.shape), sizes)
        storage = spec.dtype.torch_storage
        zp = result["zero_point"]
        record = QuantizedWeight(
            codes=result["codes"].reshape(original.shape).to(storage),
            scale=result["scale"].reshape(qshape).to(torch.float32),
            zero_point=None if zp is None else zp.reshape(qshape).to(storage),
            spec=spec, block_sizes=tuple(sizes), channel_axis=0, input_axis=1, grid=scheme_for(spec).grid,
        ).to(original.device)
        values = result["weight"].reshape(original.shape).to(original.device)
        extra = {"method": "gptq", "gptq_loss": result["loss"], "damp": result["damp"]}
        if result.get("blocks", 1) > 1:
            extra["hessians"] = "q, k, v"
        if result["dead"]:
            self._dead.append((layer.name, result["dead"]))
            n = result["dead"]
            extra["dead_inputs"] = f"{n} kept (rtn)" if self.config.dead_inputs == "rtn" else f"{n}: weights zeroed"
        context.write_layer(model, layer, record, original, values=values, extra=extra)

    def _fallback_reason(self, hook, cfg, layer) -> str | None:
        """Why ``layer`` is not GPTQ-solved (round-to-nearest instead), or None: no inputs reached it
        in this pass (refused unless ``uncalibrated: rtn``). The same on every rank (the counts are
        summed over the ranks)."""
        if hook.samples == 0:
            if cfg.uncalibrated == "error":  # the pipeline restores the weights already written
                raise _blind_error([layer.name])
            return "no calibration inputs reach it; uncalibrated: rtn"
        return None


def _hessians(hook) -> list:
    """A hook's Hessians: one, or one per row block of a packed attention weight (once when equal)."""
    hessians = hook.hessians() if hasattr(hook, "hessians") else [hook.hessian()]
    return hessians[:1] if all(h is hessians[0] for h in hessians) else hessians


def _remove_hooks(hooks: dict) -> None:
    for hook in hooks.values():
        if hook.handle is not None:
            hook.handle.remove()  # idempotent: hessian() removed the solved ones already


def _contains(parent: nn.Module, module: nn.Module) -> bool:
    return any(m is module for m in parent.modules())


def _device_of(module: nn.Module) -> Any:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _take(data, n: int) -> list:
    out = take_samples(data, n)  # whole batches until n samples (rows)
    if not out:
        raise ConfigError("calibration data is empty", "data")
    return out


def _cache_inputs(model, first_block, samples, device, chunks: list[int]) -> dict:
    """Run the model until ``first_block`` for each of the ``chunks`` (indices into ``samples``);
    keep its (args, kwargs) on ``device``, by chunk."""
    cache: dict = {}
    current: list[int] = []

    def hook(module, args, kwargs) -> None:
        cache[current[0]] = (to_device(tuple(args), device), to_device(dict(kwargs), device))
        raise _Stop

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    home = _device_of(model)
    try:
        for i in chunks:
            current[:] = [i]
            try:
                call_model(model, to_device(samples[i], home))
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(cache) != len(chunks):
        raise QuantizationError(f"the first block was reached by {len(cache)} of {len(chunks)} samples")
    return cache


def _owners(layers: dict, ranks) -> dict:
    """The rank that solves each layer (``module -> rank``), by its solve cost (``Ranks.owners``)."""
    costs = []
    for (module, _), layer in layers.items():
        weight = getattr(module, layer.unit.param)
        rows = weight.shape[0]
        costs.append(solve_cost(rows, weight.numel() // max(rows, 1)))
    return dict(zip(layers, ranks.owners(costs)))


@quanta.hookimpl
def register_algorithms(register) -> None:
    register(GPTQ())
