"""coremltools' ``LinearQuantizer.report()`` for compat's torch.ao-prepared model."""

from __future__ import annotations

import torch
from torch import nn

from quanta.compat._ao_modules import LearnableFakeQuantize, is_symmetric

__all__ = ["report"]


def _summary(fq, kind: str) -> dict:
    per_channel = fq.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
    return {"type": kind, "algorithm": "learnable" if isinstance(fq, LearnableFakeQuantize) else "vanilla",
            "qscheme": "symmetric" if is_symmetric(fq.qscheme) else "affine", "per_channel": per_channel,
            "dtype": fq.dtype, "qmin": fq.quant_min, "qmax": fq.quant_max}


def report(model: nn.Module) -> dict:
    """``{module name: statistics}`` for every weight and activation fake quantizer of ``model``
    (weights: the RMSE of fake quantization and the parameter count; activations: NaN and -1)."""
    from quanta.compat._ao_prepare import is_activation_quantizer

    out: dict[str, dict] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for name, module in model.named_modules():
                fq = getattr(module, "weight_fake_quant", None)
                if is_activation_quantizer(fq):
                    row = _summary(fq, "weight")
                    weight = module.weight.detach()
                    qweight = fq(weight)
                    row.update(device=weight.device, error=float(torch.sqrt(torch.mean((weight - qweight) ** 2))),
                               **{"#params": int(qweight.numel())})
                    out[name] = row
                elif not name.endswith(".weight_fake_quant") and is_activation_quantizer(module) and hasattr(
                        module, "activation_post_process"):
                    row = _summary(module, "activation")
                    scale, _ = module.calculate_qparams()
                    row.update(device=scale.device, error=float("nan"), **{"#params": -1})
                    out[name] = row
    finally:
        model.train(was_training)
    return out
