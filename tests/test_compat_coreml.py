"""quanta.compat.coreml refuses what coremltools refuses, with coremltools' messages: a too-low
deployment target (its "supported since iOS18" sentence) and multifunction models."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

import quanta.compat as cto

logging.getLogger("coremltools").setLevel(logging.ERROR)


def _mlmodel(target_name: str):
    import coremltools as ct

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ct.convert(torch.jit.trace(model, torch.rand(1, 64)), inputs=[ct.TensorType(shape=(1, 64))],
                          convert_to="mlprogram", minimum_deployment_target=getattr(ct.target, target_name),
                          skip_model_load=True)


@pytest.mark.parametrize("op_config, what", [
    (dict(dtype="int4", granularity="per_channel"), "4-bit"),
    (dict(dtype="int8", granularity="per_block", block_size=16), "per_block"),
])
def test_too_low_target_names_coremltools_sentence(op_config, what):
    config = cto.coreml.OptimizationConfig(global_config=cto.coreml.OpLinearQuantizerConfig(**op_config))
    sentence = (f"The {what} quantization is supported since iOS18. Please re-convert your model with "
                "minimum_deployment_target set to at least ct.target.iOS18.")
    with pytest.raises(ValueError, match=sentence.replace(".", r"\.")):
        cto.coreml.linear_quantize_weights(_mlmodel("iOS16"), config)


def test_multifunction_models_are_refused(tmp_path):
    import coremltools as ct
    from coremltools.models.utils import MultiFunctionDescriptor, save_multifunction

    _mlmodel("iOS18").save(str(tmp_path / "a.mlpackage"))
    desc = MultiFunctionDescriptor()
    desc.add_function(str(tmp_path / "a.mlpackage"), "main", "f1")
    desc.add_function(str(tmp_path / "a.mlpackage"), "main", "f2")
    desc.default_function_name = "f1"
    save_multifunction(desc, str(tmp_path / "mf.mlpackage"))
    multi = ct.models.MLModel(str(tmp_path / "mf.mlpackage"), skip_model_load=True)
    config = cto.coreml.OptimizationConfig(global_config=cto.coreml.OpLinearQuantizerConfig())
    for call in (lambda: cto.coreml.linear_quantize_weights(multi, config),
                 lambda: cto.coreml.decompress_weights(multi), lambda: cto.coreml.get_weights_metadata(multi)):
        with pytest.raises(ValueError, match="not supported for a multifunction model"):
            call()
    # the package path is refused the same way, and a one-function model still works
    with pytest.raises(ValueError, match="multifunction"):
        cto.coreml.linear_quantize_weights(str(tmp_path / "mf.mlpackage"), config)
    cto.coreml.linear_quantize_weights(str(tmp_path / "a.mlpackage"), config)
