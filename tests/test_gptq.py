"""The ``gptq`` algorithm: recipe and compat forms, layer-sequential calibration, kwargs, conv."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import quanta
from quanta import ConfigError


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))


def _correlated(n, dim=64, seed=1):
    mix = torch.randn(dim, dim, generator=torch.Generator().manual_seed(0)) * 0.4  # one distribution
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, dim, generator=g) @ mix + 0.3 * torch.randn(32, dim, generator=g) for _ in range(n)]


def _out_err(model, ref, xs):
    with torch.no_grad():
        return sum(float((model(x) - ref(x)).pow(2).mean()) for x in xs) / len(xs)


def test_seed_snippet_through_compat():
    model = _mlp()
    dataloader = _correlated(16)
    # --- the seed's code, imports changed to quanta.compat ---
    from quanta.compat import LayerwiseCompressor, \
        LayerwiseCompressorConfig

    config = LayerwiseCompressorConfig.from_dict(
        {
            "global_config": {
                "algorithm": "gptq",
                "weight_dtype": 4,
                "granularity": "per_block",
                "block_size": 128,
            },
            "input_cacher": "default",
            "calibration_nsamples": 16,
        }
    )
    quantizer = LayerwiseCompressor(model, config)
    compressed_model = quantizer.compress(dataloader)
    # --- end ---
    report = quantizer.report()
    assert [r.name for r in report.layers] == ["2"]
    assert report.layers[0].extra["method"] == "gptq" and report.layers[0].spec == "uint4 symmetric(grid=full) per_block(128)"
    assert dict(report.skipped)["0"].startswith("unsupported")  # 64 inputs, block 128: float, as coremltools
    assert "2.weight" in quanta.records(compressed_model)


def test_gptq_beats_rtn_on_output_error():
    model = _mlp()
    calib, held_out = _correlated(32), _correlated(8, seed=7)
    spec = {"dtype": "int4", "granularity": "per_block", "block_size": 32}
    gptq = quanta.quantize(model, {"algorithm": "gptq", "global_config": spec, "calibration_nsamples": 32 * 32}, data=calib)
    rtn = quanta.quantize(model, {"global_config": spec})
    e_gptq, e_rtn = _out_err(gptq, model, held_out), _out_err(rtn, model, held_out)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    for name, rec in quanta.records(gptq).items():  # records are exact: the weights are their dequantized codes
        module = dict(gptq.named_modules())[name.rsplit(".", 1)[0]]
        assert torch.equal(module.weight, rec.dequantize())
    assert gptq.quanta_report["0"].extra["gptq_loss"] > 0


class _Block(nn.Module):
    """A transformer-style block taking the hidden state and a keyword attention mask."""

    def __init__(self, dim, seen):
        super().__init__()
        self.fc1, self.fc2, self.seen = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim), seen

    def forward(self, hidden, attention_mask=None):
        self.seen.append(attention_mask is not None)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return hidden + self.fc2(torch.relu(self.fc1(hidden))) * mask


class _Encoder(nn.Module):
    def __init__(self, dim=32, depth=3):
        super().__init__()
        self.seen: list[bool] = []
        self.embed = nn.Embedding(50, dim)
        self.layers = nn.ModuleList(_Block(dim, self.seen) for _ in range(depth))
        self.head = nn.Linear(dim, 8)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, attention_mask=attention_mask)
        return self.head(h)


def test_blocks_get_every_samples_keyword_inputs():
    torch.manual_seed(0)
    model = _Encoder()
    data = [{"input_ids": torch.randint(0, 50, (4, 10)), "attention_mask": (torch.rand(4, 10) > 0.3).long()}
            for _ in range(6)]
    model.seen.clear()
    q = quanta.quantize(model, {"algorithm": "gptq", "global_config": {"dtype": "int8"}, "calibration_nsamples": 24,
                                "module_type_configs": {"Embedding": {"dtype": "int8"}}}, data=data)
    assert q.seen and all(q.seen)  # the mask reached every block call, every sample (the copy ran)
    methods = {r.name: r.extra["method"] for r in q.quanta_report.layers}
    assert methods["layers.2.fc2"] == "gptq" and methods["head"] == "gptq"
    assert methods["embed"].startswith("rtn")  # named; no inputs to calibrate an embedding: said in the report
    assert set(quanta.records(q)) >= {"layers.0.fc1.weight", "head.weight", "embed.weight"}
    # Memory: the cache holds one block's inputs (hidden states and masks of every sample), never more.
    one_block = sum(4 * 10 * 32 * 4 + 4 * 10 * 8 for _ in data)
    assert q.quanta_report.stats["gptq_blocks"] == 3
    assert q.quanta_report.stats["gptq_peak_cached_activation_bytes"] == one_block


def test_conv_per_block_gptq_records():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 1))
    data = [torch.randn(2, 16, 8, 8) for _ in range(4)]
    q = quanta.quantize(model, {"algorithm": "gptq", "calibration_nsamples": 8,
                                "global_config": {"dtype": "uint4", "scheme": "affine", "granularity": "per_block",
                                                  "block_size": 8}}, data=data)
    rec = quanta.records(q)["0.weight"]
    assert tuple(rec.scale.shape) == (32, 2, 1, 1) and rec.zero_point is not None
    assert torch.equal(q[0].weight, rec.dequantize())
    assert int(rec.codes.max()) <= 15


@pytest.mark.parametrize("config,pattern", [
    ({"algorithm": "gptq", "global_config": {"granularity": "per_tensor"}}, "per_tensor"),
    ({"algorithm": "gptq", "calibration_nsample": 4}, "did you mean 'calibration_nsamples'"),
    ({"algorithm": "gptq", "hessian_dampening": 2.0}, "hessian_dampening"),
    ({"algorithm": "gptq", "input_cacher": "fancy"}, "input_cacher"),
])
def test_bad_gptq_configs(config, pattern):
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=pattern):
        quanta.quantize(model, config, data=_correlated(2))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_data_is_required():
    with pytest.raises(ConfigError, match="needs calibration data"):
        quanta.quantize(_mlp(), {"algorithm": "gptq"})


@pytest.mark.slow
def test_first_gptq_call_does_not_import_dynamo():
    # The dry forward's copy-before-write mode would import torch._dynamo on its first op
    # (seconds of a first quantize call on a busy machine); nothing on GPTQ's path needs it.
    import subprocess
    import sys

    code = ("import sys, torch, quanta\n"
            "m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))\n"
            "quanta.quantize(m, {'algorithm': 'gptq', 'calibration_nsamples': 2,\n"
            "                    'global_config': {'dtype': 'int4', 'granularity': 'per_block', 'block_size': 8}},\n"
            "                [torch.randn(1, 8, 16) for _ in range(2)])\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "False"
