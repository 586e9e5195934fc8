"""Every ```python block of README.md and docs/*.md runs as written.

A block that needs objects the reader already has (a model, calibration batches, a saved
package) declares them in an HTML comment right before it, ``<!-- fixture: mlp -->``: the
fixture functions below provide those names (and files in the working folder, a fresh temporary
one per block). A block that is not meant to run says so and why, ``<!-- not run: reason -->``;
it must still compile. A block that only includes a file (``--8<-- "docs/examples/x.py"``)
is that file, run by tests/test_docs_examples.py.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!--\s*(?P<note>[^>]*?)\s*-->\s*\n)?^```python\n(?P<code>.*?)^```", re.S | re.M)
INCLUDE = re.compile(r'^--8<-- "(?P<path>[^"]+)"$')


def _blocks():
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in BLOCK.finditer(text):
            line = text[:m.start("code")].count("\n")
            out.append(pytest.param(m.group("note") or "", m.group("code"),
                                    id=f"{page.relative_to(ROOT)}:{line}"))
    return out


# --- fixtures: the names a block may use -------------------------------------------------------

def _mlp_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128)).eval()


class MyModel(nn.Module):
    """The reader's own model class (docs/saving.md)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(128, 256), nn.Linear(256, 128)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def mlp():
    """A float MLP (128 -> 256 -> 128, a ``MyModel``) as ``model``, its input ``x``, calibration batches under
    every name the docs use, a ``recipe`` dict and ``recipe.yaml``, the class ``MyModel``."""
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 128, generator=g) for _ in range(4)]
    Path("recipe.yaml").write_text("global_config: {dtype: int4, granularity: per_block, block_size: 32}\n")
    return {"model": MyModel().eval(), "x": torch.randn(1, 128, generator=g), "batches": batches,
            "calibration_batches": batches, "dataloader": batches, "MyModel": MyModel,
            "recipe": {"global_config": {"dtype": "int8"}}}


def tiny_llama(layers: int = 1):
    """A small random Llama (grouped-query attention: 4 query heads, 2 key/value heads; an
    ``lm_head``) as ``model``, token ids ``x`` [1, 8], and calibration ``batches``."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    return {"model": model, "x": torch.randint(0, 256, (1, 8), generator=g),
            "batches": [torch.randint(0, 256, (2, 16), generator=g) for _ in range(4)]}


def llama_checkpoint():
    """The :func:`tiny_llama` model saved as a transformers checkpoint at ``path/to/checkpoint``,
    a ``recipe.yaml`` (int4 RTN) and calibration ``batches``."""
    names = tiny_llama(layers=2)  # blocks: a ModuleList of layers
    names["model"].save_pretrained("path/to/checkpoint")
    Path("recipe.yaml").write_text("global_config: {dtype: int4, granularity: per_block, block_size: 32}\n")
    return {"batches": names["batches"]}


def tiny_llama_quantized():
    """``qmodel``: the :func:`tiny_llama` model, int4 RTN."""
    import quanta

    names = tiny_llama()
    qmodel = quanta.quantize(names["model"], {"global_config": {"dtype": "int4", "granularity": "per_block",
                                                                "block_size": 32}})
    return {"qmodel": qmodel}


def qat_cnn():
    """A small CNN on 1x20x20 images as ``model``, coremltools' QAT YAML as ``config.yaml``,
    labelled batches ``data``, ``loss_fn`` and ``opt``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 18 * 18, 10))
    Path("config.yaml").write_text(textwrap.dedent("""\
        global_config:
          quantization_scheme: symmetric
          milestones: [0, 1, 2, 1]
        """))
    g = torch.Generator().manual_seed(1)
    data = [(torch.rand(4, 1, 20, 20, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(3)]
    return {"model": model, "data": data, "loss_fn": nn.functional.cross_entropy,
            "opt": torch.optim.SGD(model.parameters(), lr=0.01)}


def _float_package(path="model.mlpackage"):
    ct = pytest.importorskip("coremltools")
    model = _mlp_model()
    traced = torch.jit.trace(model, torch.randn(1, 128))
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, 128))], outputs=[ct.TensorType(name="y")],
                         convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18)
    mlmodel.save(path)
    return model, mlmodel


def quantized_package():
    """``model.mlpackage``: an int8 ``MyModel`` exported by quanta (input ``x``, output ``output``);
    ``x`` (a float32 numpy array) and ``torch_model`` (the quantized torch model)."""
    import quanta

    qmodel = quanta.quantize(MyModel().eval(), {"global_config": {"dtype": "int8"}})
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(1))
    quanta.export(qmodel, "model.mlpackage", example_inputs=(x,))
    return {"x": x.numpy(), "torch_model": qmodel}


def float_package():
    """``model.mlpackage``: a float MLP converted by coremltools (input ``x``, output ``y``);
    ``model``: it as an ``MLModel``; ``calibration_inputs``: numpy inputs for it."""
    _, mlmodel = _float_package()
    g = torch.Generator().manual_seed(1)
    return {"model": mlmodel, "calibration_inputs": [torch.randn(1, 128, generator=g).numpy() for _ in range(4)]}


def sentence_encoder():
    """``tokenizer``: MiniLM's tokenizer; ``qmodel``: a small random BERT for its vocabulary, int8."""
    transformers = pytest.importorskip("transformers")
    import quanta
    from quanta.examples import minilm_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    qmodel = quanta.quantize(transformers.BertModel(config).eval(), {"global_config": {"dtype": "int8"}})
    return {"tokenizer": tokenizer, "qmodel": qmodel}


def gptq_solver():
    """A ``layer`` (Linear 256 -> 64, no gradients), its ``weight``, a ``hessian`` from correlated
    inputs, and an int4 ``quanta.plugins.gptq.algorithm.PluginQuantizer`` as ``quantizer``."""
    from quanta._records.spec import QuantSpec
    from quanta.plugins.gptq.algorithm import PluginQuantizer

    torch.manual_seed(0)
    layer = nn.Linear(256, 64).requires_grad_(False)
    x = torch.randn(512, 256) @ (torch.eye(256) + 0.1 * torch.randn(256, 256))
    return {"layer": layer, "weight": layer.weight, "hessian": 2 * x.T @ x / len(x),
            "quantizer": PluginQuantizer(QuantSpec(dtype="int4", granularity="per_block", block_size=128))}


FIXTURES = {f.__name__: f for f in (mlp, tiny_llama, llama_checkpoint, tiny_llama_quantized, qat_cnn, quantized_package,
                                    float_package, sentence_encoder, gptq_solver)}


# --- the tests ----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("note, code", _blocks())
def test_block_runs_as_written(note, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    includes = [INCLUDE.match(line) for line in code.strip().splitlines()]
    if all(includes):  # the included files run in tests/test_docs_examples.py
        for m in includes:
            compile((ROOT / m["path"]).read_text(), m["path"], "exec")
        return
    compile(code, "<block>", "exec")
    if note.startswith("not run:"):
        assert note[len("not run:"):].strip(), "a block that is not run says why"
        return
    names: dict = {"__name__": "__docs_block__"}
    if note:
        kind, _, listed = note.partition(":")
        assert kind.strip() == "fixture", f"unknown block note {note!r} (allowed: 'fixture: a, b', 'not run: why')"
        for name in (n.strip() for n in listed.split(",")):
            assert name in FIXTURES, f"unknown fixture {name!r} (allowed: {', '.join(FIXTURES)})"
            names.update(FIXTURES[name]())
    exec(compile(code, "<block>", "exec"), names)


def test_every_block_note_is_known():
    for param in _blocks():
        note = param.values[0]
        assert not note or note.startswith(("fixture:", "not run:")), (param.id, note)
