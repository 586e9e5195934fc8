"""Algorithm ``calibrate``: static W8A8 post-training quantization.

Observers on every quantized activation, one pass over the calibration data (batch norms in
inference mode, no fake quantization), then qparams: int8 activations, and weights quantized
round-to-nearest with their layer spec (int8 per-channel by default). Same machinery as
``qat`` with milestones ``[0, inf, inf, 0]`` (coremltools' calibration recipe).

Calibration batches may be tensors, tuples (positional) or dicts (keywords: ``model(**batch)``,
as a Hugging Face tokenizer's output). A model whose forward ``torch.fx`` cannot trace is
calibrated part by part (``untraceable: submodules``, the default here): see
"Models that torch.fx cannot trace" in ``docs/activation-quantization.md``.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

import quanta
from quanta.errors import ConfigError
from quanta.contracts import Algorithm
from quanta.fx.options import (
    activation_dtype_field,
    activation_observer_field,
    activation_scheme_field,
    activation_sites_field,
    averaging_constant_field,
    make_session,
    relu_activation_scheme_field,
    untraceable_field,
)
from quanta._run.calibration import call_model, count_samples

__all__ = ["CalibrateConfig", "Calibrate"]


@attrs.frozen(kw_only=True)
class CalibrateConfig:
    """Options of ``calibrate``."""

    activation_dtype: str = activation_dtype_field("int8")
    activation_scheme: str | None = activation_scheme_field()
    activation_observer: str = activation_observer_field("minmax")
    averaging_constant: float = averaging_constant_field()
    activation_sites: str = activation_sites_field()
    nsamples: int | None = attrs.field(default=None, metadata={
        "doc": "use this many calibration samples (rows; whole batches until there are this many; null: all)"})
    untraceable: str = untraceable_field("submodules")
    relu_activation_scheme: str | None = relu_activation_scheme_field()


class _CalibrationSession:
    """Wraps an ActivationSession so ``Quantizer.step()`` is a no-op: observers are on from prepare."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def prepare(self, example_inputs=None, inplace=False) -> Any:
        gm = self.inner.prepare(example_inputs, inplace)
        self.inner.set_state(observers=True, fake_quant=False, bn_frozen=True)
        return gm

    def step(self) -> None:
        if self.inner.gm is None:
            self.inner.step()  # raises "call prepare() first"

    def finalize(self, model=None, inplace=False) -> Any:
        return self.inner.finalize(model, inplace)

    def __getattr__(self, name) -> Any:
        return getattr(self.inner, name)


class Calibrate(Algorithm):
    """Static W8A8: observe activations over calibration data, then finalize."""

    name = "calibrate"
    description = "static W8A8 post-training quantization: activation observers over calibration data (torch.fx)"
    config_class = CalibrateConfig
    needs_data = True
    backends = frozenset({"torch"})  # walks torch modules itself: refused at plan time on other backends
    training_loop = True
    #: The weights the torch.fx session quantizes (its rules' weighted modules): an Embedding or
    #: ConvTranspose under global_config would be planned and then silently left float.
    global_types = {"torch": ("Linear", "Conv1d", "Conv2d", "Conv3d")}
    changes = "model"  # the result is a rewritten graph with observers folded into quantize/dequantize pairs

    def max_batches(self) -> int | None:
        """``nsamples``: at most that many calibration batches (each holds one sample or more; None: all)."""
        return self.config.nsamples

    def session(self, model, plan, recipe, backend, context=None) -> Any:
        config = self.config
        return _CalibrationSession(make_session(model, plan, recipe, backend, config, context=context))

    def run(self, model, plan, data, context) -> Any:
        config = self.config
        batches = iter(data)
        try:
            first = next(batches)
        except StopIteration:
            raise ConfigError("calibration data is empty", "data") from None
        session = self.session(model, plan, context.recipe, context.backend, context=context)
        # The first batch is called as every batch is: model(**batch) for a dict.
        gm = session.prepare(example_inputs=first, inplace=True)
        if context.ranks.active:
            used = [first]
            seen = count_samples(first)
            for batch in batches:
                if config.nsamples is not None and seen >= config.nsamples:
                    break
                used.append(batch)
                seen += count_samples(batch)
            _observe_distributed(gm, used, context.ranks)
            return session.finalize(inplace=True)
        with torch.no_grad():
            call_model(gm, first)
            seen = count_samples(first)
            for batch in batches:
                if config.nsamples is not None and seen >= config.nsamples:
                    break
                call_model(gm, batch)
                seen += count_samples(batch)
        return session.finalize(inplace=True)


def _observe_distributed(gm, batches: list, ranks) -> None:
    """Observe ``batches`` sharded over the ranks (batch ``i`` on rank ``i % world``), then give
    every observer every call's summary in global order (batch by batch, call by call), so the
    ranges equal one process's, bit for bit, for order-dependent observers too (moving averages)."""
    observers = [m for _, m in gm.named_modules() if isinstance(getattr(m, "observer", None), torch.nn.Module)
                 and getattr(m, "observer_enabled", False)]
    for owner in observers:
        obs = owner.observer
        if not (callable(getattr(obs, "summarize", None)) and callable(getattr(obs, "absorb", None))):
            raise ConfigError(f"the activation observer {type(obs).__name__} (site {getattr(owner, 'site', '?')!r}) "
                              "has no summarize/absorb methods, which a torch.distributed run needs to combine the "
                              "ranks' observations in order; run in one process or use 'minmax' or "
                              "'moving_average_minmax' (docs/plugins.md, \"Distributed runs\")", "activation_observer")
    # chunk -> per observer, its calls' summaries in call order
    summaries: dict[int, list[list]] = {}
    current: list = []

    def recorder(k: int, obs: Any) -> Any:
        def forward(x: torch.Tensor) -> None:
            current[0][k].append(obs.summarize(x))
        return forward

    for k, owner in enumerate(observers):
        owner.observer.forward = recorder(k, owner.observer)
    try:
        with torch.no_grad():
            for i in ranks.mine(len(batches)):
                current[:] = [summaries.setdefault(i, [[] for _ in observers])]
                call_model(gm, batches[i])
    finally:
        for owner in observers:
            del owner.observer.forward
    for chunk in ranks.collect(summaries):  # every rank: every batch's summaries, in batch order
        for owner, calls in zip(observers, chunk):
            for summary in calls:
                owner.observer.absorb(summary.to(owner.observer.min_val.device))


@quanta.hookimpl
def register_algorithms(register) -> None:
    register(Calibrate())
