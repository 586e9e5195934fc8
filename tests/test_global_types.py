"""Which layer types ``global_config`` quantizes follows coremltools per algorithm
(``Algorithm.global_types``): RTN what PostTrainingQuantizer takes, GPTQ Conv2d and Linear;
Embedding only when a config names it. ``quanta plan`` says why."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import quanta

logging.getLogger("coremltools").setLevel(logging.ERROR)


class _Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.c1 = nn.Conv1d(32, 32, 1)
        self.c2 = nn.Conv2d(32, 32, 1)
        self.c3 = nn.Conv3d(32, 32, 1)
        self.t1 = nn.ConvTranspose1d(32, 32, 1)
        self.t2 = nn.ConvTranspose2d(32, 32, 1)
        self.t3 = nn.ConvTranspose3d(32, 32, 1)
        self.attn = nn.MultiheadAttention(32, 2)
        self.fc = nn.Linear(32, 32)

    def forward(self, ids):
        x = self.emb(ids)
        x = self.c1(x.transpose(1, 2))
        x = self.t1(x).transpose(1, 2)
        y = self.t2(self.c2(x[..., None])) + self.t3(self.c3(x[..., None, None]))[..., 0]
        x = x + y[..., 0].transpose(1, 2).transpose(1, 2)
        x, _ = self.attn(x, x, x)
        return self.fc(x)


RTN_SELECTED = {"c1", "c2", "c3", "t1", "t2", "t3", "attn.in_proj_weight", "attn.out_proj", "fc"}


def test_rtn_global_config_takes_what_post_training_quantizer_takes():
    plan = quanta.plan(_Zoo(), {"global_config": {"dtype": "int8"}})
    assert {p.name for p in plan.selected} == RTN_SELECTED
    emb = next(p for p in plan.layers if p.name == "emb")
    assert emb.spec is None and emb.reason.startswith("Embedding is not quantized by global_config under 'rtn'")
    assert "name it in module_type_configs" in emb.reason
    assert "Embedding is not quantized" in plan.table()


def test_rtn_agrees_with_coremltools_on_which_layers():
    from coremltools.optimize.torch.quantization import PostTrainingQuantizer, PostTrainingQuantizerConfig

    torch.manual_seed(0)
    model = _Zoo()
    ref = PostTrainingQuantizer(copy.deepcopy(model), PostTrainingQuantizerConfig.from_dict(
        {"global_config": {"weight_dtype": "int8"}})).compress()
    theirs = {f"{n}.{b.split('/')[1]}" for n, m in ref.named_modules() for b, _ in m.named_buffers(recurse=False)
              if b.startswith("_COREML_/") and b.endswith("quantization_scale")}
    ours = set(quanta.records(quanta.quantize(model, {"global_config": {"dtype": "int8"}})))
    assert ours == theirs == {f"{n}.weight" for n in RTN_SELECTED - {"attn.in_proj_weight"}} | {"attn.in_proj_weight"}


def test_gptq_global_config_takes_conv2d_and_linear_only():
    plan = quanta.plan(_Zoo(), {"algorithm": "gptq", "global_config": {"dtype": "int8"}})
    assert {p.name for p in plan.selected} == {"c2", "fc", "attn.out_proj"}
    why = {p.name: p.reason for p in plan.layers}
    assert why["emb"] == ("Embedding is not quantized by global_config under 'gptq' (its types: Conv2d, Linear); "
                          "name it in module_type_configs to quantize it")
    assert why["c1"].startswith("Conv1d is not quantized by global_config under 'gptq'")


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_embedding_when_a_config_names_it(algorithm):
    by_type = quanta.plan(_Zoo(), {"algorithm": algorithm, "global_config": {"dtype": "int8"},
                                   "module_type_configs": {"Embedding": {"dtype": "int4"}}})
    by_name = quanta.plan(_Zoo(), {"algorithm": algorithm, "global_config": {"dtype": "int8"},
                                   "module_name_configs": {"emb": {"dtype": "int4"}}})
    for plan, reason in ((by_type, "module_type_configs['Embedding']"), (by_name, "module_name_configs['emb']")):
        emb = next(p for p in plan.layers if p.name == "emb")
        assert str(emb.spec.dtype) == "int4" and emb.reason == reason


def test_gptq_quantizes_embedding_by_rtn_only_when_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(40, 32), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    data = [torch.randint(0, 40, (4, 6)) for _ in range(4)]
    plain = quanta.quantize(model, {"algorithm": "gptq", "global_config": {"dtype": "int8"}}, data=data)
    assert set(quanta.records(plain)) == {"1.weight", "3.weight"}
    named = quanta.quantize(model, {"algorithm": "gptq", "global_config": {"dtype": "int8"},
                                    "module_type_configs": {"Embedding": {"dtype": "int8"}}}, data=data)
    assert set(quanta.records(named)) == {"0.weight", "1.weight", "3.weight"}
    assert named.quanta_report.layers[0].extra["method"].startswith("rtn")


def test_algorithms_without_a_declaration_take_every_type(register_plugin):
    from quanta.contracts import Algorithm

    class Undeclared(Algorithm):  # (calibrate now declares the types its torch.fx session quantizes)
        name, description = "undeclared_types", "declares no global_types"

        def run(self, model, plan, data, context):
            for layer in plan.selected:
                context.quantize_layer(model, layer)

    class Plugin:
        @quanta.hookimpl
        def register_algorithms(self, register):
            register(Undeclared())

    register_plugin(Plugin())
    assert Algorithm.global_types is None and Undeclared.global_types is None
    plan = quanta.plan(_Zoo(), {"algorithm": "undeclared_types", "global_config": {"dtype": "int8"}})
    assert "emb" in {p.name for p in plan.selected}
