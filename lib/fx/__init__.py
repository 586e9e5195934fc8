"""Graph machinery for activation quantization, built on ``torch.fx`` (not ``torch.ao``).

- :mod:`.rules`: ``ActivationRules``, what a backend states (quantized ops, fusions, dtypes);
- :mod:`.tracer`: symbolic tracing whose errors name the module that broke the trace;
- :mod:`.fake_quant`: weight/activation fake-quant modules and the Linear/Conv/Conv+BN training forms;
- :mod:`.prepare`: conv+bn fusion, module swaps, activation quantizer insertion;
- :mod:`.milestones`: observer / fake-quant / bn-freeze switches counted in ``step()`` calls;
- :mod:`.convert`: ``finalize`` into records plus ``quantize_per_tensor``/``dequantize`` pairs;
- :mod:`.partial`: tracing below the root for models whose own forward does not trace;
- :mod:`.session`: ``ActivationSession``, prepare → step → finalize, used by ``qat`` and ``calibrate``.
"""

from .fake_quant import ActivationFakeQuantize, ConvBnQAT, WeightFakeQuantize
from .milestones import MilestoneState, check_milestones, state_at
from .partial import FloatPart, TracedPart
from .rules import ActivationRules, default_torch_rules
from .session import ActivationOptions, ActivationSession

__all__ = ["ActivationRules", "default_torch_rules", "ActivationFakeQuantize", "WeightFakeQuantize", "ConvBnQAT",
           "MilestoneState", "check_milestones", "state_at", "ActivationOptions", "ActivationSession",
           "TracedPart", "FloatPart"]
