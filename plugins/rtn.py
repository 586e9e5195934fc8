"""Algorithm ``rtn``: data-free round-to-nearest weight quantization (coremltools' PostTrainingQuantizer)."""

from __future__ import annotations

import torch

import quanta
from quanta.contracts import Algorithm

__all__ = ["RTN"]


class RTN(Algorithm):
    """Quantize every planned weight independently from its own values; no data needed."""

    name = "rtn"
    description = "data-free round-to-nearest weight quantization (per-tensor/channel/block)"
    needs_data = False
    #: What coremltools' PostTrainingQuantizer quantizes from its global_config (not Embedding).
    global_types = {"torch": ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                              "ConvTranspose3d", "Linear", "MultiheadAttention")}
    #: Weights are only replaced through the backend, never written in place: the model copy
    #: may share the float weights' storage with the user's model. (An ``inplace=True`` run writes
    #: the values over the float storage, through ``values_later``, once it can no longer fail.)
    shares_float_weights = True

    def run(self, model, plan, data, context) -> None:
        with torch.no_grad():
            for layer in plan.selected:  # no layer's weight is read after it was quantized
                context.quantize_layer(model, layer, values_later=True)


@quanta.hookimpl
def register_algorithms(register) -> None:
    register(RTN())
