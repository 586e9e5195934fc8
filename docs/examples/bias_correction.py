"""A stage that compares with the float model: empirical bias correction. It quantizes nothing
itself; run it after a quantizing stage::

    stages: [rtn, bias_correction]

Quantizing a Linear shifts the mean of its output. For each planned Linear, in order, it runs
the model as quantized so far on the calibration batches, compares the layer's mean output with
the float model's (``context.float_outputs``, cached once per layer for the whole run) and adds
the difference to the bias. The corrected bias is declared state (``context.add_state``): on a
``Linear(bias=False)`` it becomes a new parameter, and ``quanta.save``/``quanta.load`` recreate it.
"""

from __future__ import annotations

import torch

import quanta
from quanta.contracts import Algorithm


def _mean_over_rows(tensors):
    """Mean of ``[..., out]`` tensors over every axis but the last: ``[out]``."""
    flat = torch.cat([t.reshape(-1, t.shape[-1]).float() for t in tensors])
    return flat.mean(dim=0)


class BiasCorrection(Algorithm):
    """Adds E[float output] - E[quantized output] to each planned Linear's bias."""

    name = "bias_correction"
    description = "empirical bias correction against the float model (after a quantizing stage)"
    needs_data = True
    changes = "model"  # biases change (or appear): core snapshots everything for inplace restore
    reads_float = True  # with inplace=True core keeps a float copy for context.float_outputs

    def run(self, model, plan, data, context):
        corrected = 0
        for layer in plan.selected:
            if layer.unit.module_type != "Linear":
                continue
            module = layer.unit.handle
            want = _mean_over_rows(context.float_outputs(layer))  # [out], the float model's
            seen = []
            handle = module.register_forward_hook(lambda m, args, out: seen.append(out.detach()))
            try:
                with torch.no_grad():
                    for batch in context.batches():
                        context.call(model, batch)  # the model as quantized so far
            finally:
                handle.remove()  # never leave a hook behind
            shift = (want - _mean_over_rows(seen)).to(module.weight.dtype)
            bias = shift if module.bias is None else module.bias.detach() + shift
            context.add_state(model, layer.name, "bias", bias)  # declared: saved, and recreated on load
            corrected += 1
        context.stats["bias_corrected_layers"] = corrected


@quanta.hookimpl
def register_algorithms(register):
    register(BiasCorrection())
