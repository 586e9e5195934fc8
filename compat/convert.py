"""Plain ``ct.convert`` of a compat-quantized model keeps its compressed weights.

coremltools' own quantizers leave ``_COREML_`` metadata buffers on the modules they
compress; ``ct.convert(torch.jit.trace(model, x), minimum_deployment_target=...)`` reads
them and stores ``constexpr`` compressed weights. The compat classes do the same from
quanta's records, and say which target the model needs: below it, or with no target at all,
coremltools silently stores float weights (its behaviour, which quanta cannot change inside
``ct.convert``).
"""

from __future__ import annotations

import warnings

from quanta.errors import ConfigError

__all__ = ["annotate_for_coreml", "TARGET_ATTRIBUTE", "CompressorResult"]

#: The attribute set on an annotated model: the lowest ``ct.target`` that stores its weights.
TARGET_ATTRIBUTE = "coreml_minimum_deployment_target"


def annotate_for_coreml(model, activation_quantization: bool = False):
    """Add the Core ML converter metadata of every quanta record in ``model`` (in place) and
    record the minimum deployment target; returns ``model``.

    Needs the ``coreml`` exporter plugin (else the model is returned unchanged). Sets
    ``model.coreml_minimum_deployment_target`` to the lowest ``ct.target`` that stores the
    weights compressed (iOS16 for int8 per-tensor/per-channel, iOS17 with activation
    quantization, iOS18 for 4-bit or per-block weights), or None when no weight is quantized
    or Core ML cannot store them (e.g. 3-bit codes), and warns naming that target.
    ``activation_quantization``: the model holds quantize/dequantize activation ops.
    """
    from quanta import registry
    from quanta.record import records

    if "coreml" not in registry.names("exporter"):
        return model
    exporter = registry.get("exporter", "coreml").obj
    annotate = getattr(exporter, "annotate", None)
    plan_target = getattr(exporter, "plan_target", None)
    if annotate is None:
        return model
    annotate(model)
    target = None
    if records(model) and plan_target is not None:
        try:
            target = plan_target(model, None, activation_quantization)
        except ConfigError as exc:
            warnings.warn(f"Core ML cannot store these weights compressed ({exc}); ct.convert will store floats",
                          stacklevel=3)
        else:
            name = target.name
            warnings.warn(f"convert with ct.convert(..., minimum_deployment_target=ct.target.{name}) or later to "
                          f"keep the compressed weights: with a lower or no target coremltools stores float "
                          f"weights (model.{TARGET_ATTRIBUTE} = ct.target.{name})", stacklevel=3)
    object.__setattr__(model, TARGET_ATTRIBUTE, target)
    return model


class CompressorResult:
    """What coremltools' compressors offer after ``compress()``: the quanta report and the Core ML
    deployment target the result needs (shared by ``PostTrainingQuantizer`` and ``LayerwiseCompressor``)."""

    _result = None

    @property
    def minimum_deployment_target(self):
        """The lowest ``ct.target`` that stores the last ``compress()``'s weights compressed (or None)."""
        return getattr(self._result, TARGET_ATTRIBUTE, None)

    def report(self):
        """The quanta :class:`~quanta.Report` of the last ``compress()``."""
        if self._result is None:
            raise RuntimeError("call compress() first")
        return self._result.quanta_report
