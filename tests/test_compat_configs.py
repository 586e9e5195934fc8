"""quanta.compat's configs are coremltools' own; errors are coremltools' classes and quanta ConfigErrors;
2-D blocks, GPTQ refusals, decompress_weights and get_weights_metadata."""

from __future__ import annotations

import copy
import logging
import warnings

import cattrs
import numpy as np
import pytest
import torch

import quanta
import quanta.compat as cto

logging.getLogger("coremltools").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_configs_are_coremltools_objects():
    from coremltools.optimize.torch.optimization_config import QuantizationGranularity
    from coremltools.optimize.torch.quantization import ModulePostTrainingQuantizerConfig

    cfg = cto.PostTrainingQuantizerConfig.from_dict({"global_config": {"weight_dtype": "int4"}})
    assert isinstance(cfg.global_config, ModulePostTrainingQuantizerConfig)
    assert cfg.global_config.weight_n_bits == 4 and cfg.global_config.weight_dtype == torch.int8
    assert cto.QuantizationGranularity is QuantizationGranularity
    default = cto.LinearQuantizerConfig()
    assert default.global_config == cto.ModuleLinearQuantizerConfig()  # filled as coremltools does
    built = cto.PostTrainingQuantizerConfig().set_module_name("0", None).set_global(
        cto.ModulePostTrainingQuantizerConfig(weight_dtype="uint8"))
    assert built.module_name_configs == {"0": None} and built.global_config.weight_n_bits == 8
    assert cto.LayerwiseCompressionAlgorithmConfig.get_class("gptq") is cto.ModuleGPTQConfig


def test_errors_are_coremltools_classes_and_config_errors():
    with pytest.raises(cattrs.ClassValidationError) as info:
        cto.LinearQuantizerConfig.from_dict({"global_config": {"quantization_schem": "affine"}})
    assert isinstance(info.value, quanta.ConfigError)
    assert "did you mean 'quantization_scheme'" in str(info.value)
    with pytest.raises(ValueError, match="did you mean 'module_name_configs'") as info:
        cto.PostTrainingQuantizerConfig.from_dict({"module_name_config": {}})
    assert isinstance(info.value, quanta.ConfigError)
    with pytest.raises(quanta.ConfigError, match="must be a mapping"):
        cto.LayerwiseCompressorConfig.from_dict("int8")


@pytest.mark.slow
def test_two_d_blocks_equal_coremltools():
    from coremltools.optimize.torch.quantization import PostTrainingQuantizer, PostTrainingQuantizerConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 10))
    cfg = {"global_config": {"weight_dtype": "uint4", "quantization_scheme": "affine",
                             "granularity": "per_block", "block_size": (5, 2)}}
    theirs = PostTrainingQuantizer(copy.deepcopy(model), PostTrainingQuantizerConfig.from_dict(cfg)).compress()
    ours = cto.PostTrainingQuantizer(model, cto.PostTrainingQuantizerConfig.from_dict(cfg)).compress()
    record = quanta.records(ours)["0.weight"]
    assert record.block_sizes == (5, 2) and tuple(record.scale.shape) == (2, 5)
    for name in ("weight", "_COREML_/weight/quantization_scale", "_COREML_/weight/zero_point"):
        assert torch.equal(getattr(ours[0], name), getattr(theirs[0], name)), name


def test_sparse_gpt_and_normal_float_are_refused_not_substituted():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    cfg = cto.LayerwiseCompressorConfig.from_dict({"global_config": {"algorithm": "sparse_gpt"}})
    assert isinstance(cfg.global_config, cto.ModuleSparseGPTConfig)  # builds, as in coremltools
    with pytest.raises(quanta.ConfigError, match="'sparse_gpt'.*supported: 'gptq'.*no pruning"):
        cto.LayerwiseCompressor(model, cfg)
    with pytest.raises(quanta.ConfigError, match="enable_normal_float"):
        cto.LayerwiseCompressor(model, {"global_config": {"weight_dtype": "uint4", "enable_normal_float": True}})
    with pytest.raises(ValueError, match="does not divide"):
        cto.GPTQ(torch.nn.Linear(480, 8), cto.ModuleGPTQConfig(granularity="per_block", block_size=128))


@pytest.mark.slow
def test_decompress_weights_and_metadata(tmp_path):
    import coremltools as ct

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    mlmodel = ct.convert(torch.jit.trace(model, torch.rand(1, 64)), inputs=[ct.TensorType(shape=(1, 64))],
                         convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18, skip_model_load=True)
    config = cto.coreml.OptimizationConfig(global_config=cto.coreml.OpLinearQuantizerConfig(
        granularity="per_block", dtype="int4", weight_threshold=100))
    assert config.global_config.nbits == 4 and config.global_config.block_size == 32  # coremltools' defaults
    quantized = cto.coreml.linear_quantize_weights(mlmodel, config)
    ops = [op.op_type for op in quantized._mil_program.functions["main"].operations]
    assert ops.count("constexpr_blockwise_shift_scale") == 2
    decompressed = cto.coreml.decompress_weights(quantized)
    assert not any(op.op_type.startswith("constexpr_") for op in decompressed._mil_program.functions["main"].operations)
    metadata = cto.coreml.get_weights_metadata(decompressed, weight_threshold=600)  # the 64x64 weight only
    (name, meta), = metadata.items()
    assert meta.val.shape == (64, 64) and [c.op_type for c in meta.child_ops] == ["linear"]
    original = model[0].weight.detach().numpy()
    assert np.abs(meta.val.astype(np.float32) - original).max() < np.abs(original).max() / 7 / 2 + 1e-3
