"""An algorithm that uses calibration data and keeps extra state: an activation-aware scaling
stage. It quantizes nothing itself; chain it before a quantizing stage::

    stages:
      - {algorithm: act_scale, alpha: 0.5}
      - {algorithm: gptq, calibration_nsamples: 64}

For each planned Linear it measures the mean absolute input of every input channel over the
calibration batches, scales the weight's columns up by ``s = mean|x| ** alpha`` (salient
channels get finer steps once quantized) and divides the input by ``s`` at run time, so the
float model computes the same function. The division is part of the model, not a hook of its
own: ``context.add_transform`` declares ``1 / s`` as state ``input_scale`` and the transform
``input_mul`` that multiplies the layer's input by it, so ``inplace`` restore removes both,
``quanta.save``/``quanta.load`` carry them and a traced export (Core ML) emits the ``mul``.
(``quanta.save`` refuses a model holding a hook it cannot carry.)
"""

from __future__ import annotations

import attrs
import torch

import quanta
from quanta.contracts import Algorithm
from quanta.errors import ConfigError


@attrs.frozen(kw_only=True)
class ActScaleConfig:
    """Options of ``act_scale``."""

    alpha: float = attrs.field(default=0.5, metadata={"doc": "migration strength: s = mean|x| ** alpha (0: no scaling)"})

    def __attrs_post_init__(self):
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ConfigError(f"must be a number in [0, 1], got {self.alpha!r}", "alpha")


class ActScale(Algorithm):
    """Per-input-channel scaling of Linear layers from calibration activations (AWQ-style)."""

    name = "act_scale"
    description = "activation-aware per-channel scaling stage (chain it before gptq or rtn)"
    config_class = ActScaleConfig
    needs_data = True
    changes = "model"  # weights change in place and transforms are added: core snapshots everything

    def run(self, model, plan, data, context):
        linears = [layer for layer in plan.selected if layer.unit.module_type == "Linear"]
        sums = {layer.name: torch.zeros(layer.unit.shape[1]) for layer in linears}  # [in] each
        rows = dict.fromkeys(sums, 0)

        def observe(name):
            def hook(module, args):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # [rows, in]
                sums[name] += x.abs().sum(dim=0).cpu()
                rows[name] += x.shape[0]
            return hook

        handles = [layer.unit.handle.register_forward_pre_hook(observe(layer.name)) for layer in linears]
        try:
            with torch.no_grad():
                for batch in context.batches():  # the same batches every stage sees
                    context.call(model, batch)  # model(**batch), model(*batch) or model(batch)
        finally:
            for handle in handles:  # never leave a calibration hook behind, also on failure
                handle.remove()

        alpha = context.config.alpha
        with torch.no_grad():
            for layer in linears:
                mean = sums[layer.name] / max(rows[layer.name], 1)
                s = mean.clamp(min=1e-5).pow(alpha)
                s = s / s.mean()  # [in], geometric scale kept near 1
                module = layer.unit.handle
                module.weight.mul_(s.to(module.weight))  # W' = W · diag(s)
                # x' = x * (1 / s), so W' x' = W x; declared, so it travels with the model
                context.add_transform(model, layer.name, "input_mul", "input_scale", (1.0 / s).to(module.weight))
        context.stats["act_scale_layers"] = len(linears)


@quanta.hookimpl
def register_algorithms(register):
    register(ActScale())
