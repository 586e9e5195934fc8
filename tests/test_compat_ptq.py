"""The seed's PostTrainingQuantizer snippet runs through quanta.compat with only imports changed."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import quanta


def test_seed_snippet_data_free(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(128, 64, 3), torch.nn.ReLU(), torch.nn.Conv2d(64, 32, 3),
                                torch.nn.Flatten(), torch.nn.Linear(32, 10))
    original = copy.deepcopy(model.state_dict())
    # --- the seed's code, imports changed to quanta.compat ---
    from quanta.compat import PostTrainingQuantizer, \
        PostTrainingQuantizerConfig

    config = PostTrainingQuantizerConfig.from_dict(
        {
            "global_config": {
                "weight_dtype": "int8",
                "granularity": "per_block",
                "block_size": 128,
            },
            "module_type_configs": {
                torch.nn.Linear: None
            },
        }
    )
    quantizer = PostTrainingQuantizer(model, config)
    with pytest.warns(UserWarning, match="layer '2'.*block_size 128"):
        quantized_model = quantizer.compress()
    # --- end of seed code ---
    report = quantizer.report()
    assert [r.name for r in report.layers] == ["0"]  # 128 input channels: one block per output channel
    skipped = dict(report.skipped)
    assert skipped["4"] == "module_type_configs['Linear'] is null"
    assert skipped["2"].startswith("unsupported")  # 64 channels, block 128: left float and said so
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())
    assert "0.weight" in quanta.records(quantized_model)


def test_matches_coremltools_post_training_quantizer():
    from coremltools.optimize.torch.quantization import PostTrainingQuantizer as CtPTQ
    from coremltools.optimize.torch.quantization import PostTrainingQuantizerConfig as CtConfig

    from quanta.compat import PostTrainingQuantizer, PostTrainingQuantizerConfig

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    cfg = {"global_config": {"weight_dtype": "uint4", "quantization_scheme": "affine", "granularity": "per_block",
                             "block_size": 16}, "module_name_configs": {"2": None}}
    ref = CtPTQ(copy.deepcopy(model), CtConfig.from_dict(cfg)).compress()
    ours = PostTrainingQuantizer(model, PostTrainingQuantizerConfig.from_dict(cfg)).compress()
    for k, v in ref.state_dict().items():
        if not k.startswith("_COREML_") and "_COREML_" not in k:
            assert torch.equal(v, ours.state_dict()[k]), k


def test_from_yaml_and_unknown_keys(tmp_path):
    from quanta.compat import PostTrainingQuantizerConfig

    path = tmp_path / "c.yaml"
    path.write_text("global_config:\n  weight_dtype: int4\n  granularity: per_channel\n")
    cfg = PostTrainingQuantizerConfig.from_yaml(path)
    assert str(cfg.to_recipe().global_config.dtype) == "int4"
    with pytest.raises(quanta.ConfigError, match="did you mean 'module_name_configs'"):
        PostTrainingQuantizerConfig.from_dict({"module_name_config": {}})
    with pytest.raises(quanta.ConfigError, match="weight_dtype"):
        PostTrainingQuantizerConfig.from_dict({"global_config": {"weight_dtype": "int3x"}})


def test_compress_names_the_deployment_target_plain_convert_needs():
    import coremltools as ct

    from quanta.compat import PostTrainingQuantizer, PostTrainingQuantizerConfig

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    int4 = PostTrainingQuantizer(model, PostTrainingQuantizerConfig.from_dict({"global_config": {"weight_dtype": "int4"}}))
    with pytest.warns(UserWarning, match=r"minimum_deployment_target=ct\.target\.iOS18\) or later"):
        qmodel = int4.compress()
    assert qmodel.coreml_minimum_deployment_target == int4.minimum_deployment_target == ct.target.iOS18
    assert int(quanta.records(qmodel)["0.weight"].codes.abs().max()) == 7  # coremltools' restricted grid
    assert torch.equal(getattr(qmodel[0], "_COREML_/weight/quantization_n_bits"), torch.tensor(4))
    int8 = PostTrainingQuantizer(model, PostTrainingQuantizerConfig())
    with pytest.warns(UserWarning, match=r"ct\.target\.iOS16\) or later"):
        assert int8.compress().coreml_minimum_deployment_target == ct.target.iOS16
