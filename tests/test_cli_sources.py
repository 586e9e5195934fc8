"""`model:` and `data:` in recipes (quanta._files.sources) and the CLI's saved output, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quanta
from quanta._files.sources import SourceError, load_data, load_model

ROOT = Path(__file__).parent.parent


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "quanta._cli", *args], capture_output=True, text=True, cwd=cwd)


USER_MODULE = '''
import torch
from torch import nn


class TinyLM(nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.fc1 = nn.Linear(dim, 64)
        self.fc2 = nn.Linear(64, 256)

    def forward(self, tokens):
        return self.fc2(torch.relu(self.fc1(self.embed(tokens))))


def build(dim=32):
    torch.manual_seed(0)
    return TinyLM(dim).eval()


def batches():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (2, 16), generator=gen) for _ in range(4)]
'''


@pytest.mark.slow
def test_own_model_and_data_from_a_script_quantize_save_export(tmp_path):
    """The issue's case: a model class defined in the user's own script, data from the same script;
    quantize writes a directory, export rebuilds the model from it without unpickling."""
    (tmp_path / "mymodel.py").write_text(USER_MODULE)
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("model: {factory: 'mymodel.py:build', kwargs: {dim: 48}}\n"
                      "data: mymodel.py:batches\n"
                      "algorithm: gptq\n"
                      "global_config: {dtype: int4, granularity: per_block, block_size: 16}\n"
                      "module_type_configs: {Embedding: null}\n")
    out = _run("quantize", str(recipe), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    saved = tmp_path / "out" / "mine"
    cfg = json.loads((saved / "quanta_config.json").read_text())
    assert cfg["rebuild"]["factory"].endswith("mymodel.py:build") and cfg["rebuild"]["kwargs"] == {"dim": 48}
    assert (saved / "example_inputs.safetensors").is_file()
    # Another process, another directory: the recorded factory is only named, never run ...
    out = _run("export", str(saved), "--output", str(tmp_path / "mine.mlpackage"), cwd=ROOT)
    assert out.returncode == 2 and "--factory" in out.stderr and "mymodel.py:build" in out.stderr
    # ... the user gives it (called with the recorded kwargs), no pickle.
    factory = f"{tmp_path / 'mymodel.py'}:build"
    out = _run("export", str(saved), "--output", str(tmp_path / "mine.mlpackage"), "--factory", factory, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "mine.mlpackage").is_dir()
    # verify takes the saved directory too, and the inputs saved with it.
    out = _run("verify", str(tmp_path / "mine.mlpackage"), "--against", str(saved), "--factory", factory, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.split("cosine: ")[1].split()[0]) > 0.999
    out = _run("plan", str(recipe), "--model", str(saved), "--factory", "mymodel.py:build", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "2 of 3 weights" in out.stdout


def test_example_recipe_own_model_loads(tmp_path):
    recipe = quanta.load_recipe(ROOT / "examples/recipes/own_model.yaml")
    source = load_model(recipe.model)
    assert source.kind == "factory" and source.rebuild == {"factory": "quanta.examples.own_model:build", "kwargs": {}}
    data = load_data(recipe.data, source)
    assert len(data) == 8 and data[0].shape == (4, 64) and data[0].dtype == torch.int64


@pytest.mark.slow
def test_own_model_example_recipe_end_to_end(tmp_path):
    out = _run("quantize", str(ROOT / "examples/recipes/own_model.yaml"), "--output", str(tmp_path / "own"))
    assert out.returncode == 0, out.stderr
    from quanta.examples import own_model

    loaded = quanta.load(tmp_path / "own")
    planned = quanta.plan(own_model.build(), ROOT / "examples/recipes/own_model.yaml").selected
    assert isinstance(loaded, own_model.TinyLM) and len(quanta.records(loaded)) == len(planned) > 0
    fresh = quanta.load(tmp_path / "own", own_model.build())
    for name, rec in quanta.records(loaded).items():
        assert torch.equal(quanta.records(fresh)[name].codes, rec.codes)


@pytest.mark.slow
def test_text_jsonl_and_safetensors_data_with_the_model_directory_tokenizer(tmp_path):
    from safetensors.torch import save_file

    from quanta.examples import minilm_path

    pytest.importorskip("transformers")
    source = load_model(minilm_path())
    assert source.kind == "transformers" and source.tokenizer_dir == minilm_path()
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(quanta.examples.SENTENCES) + "\n")
    batches = load_data({"path": str(text), "max_length": 8, "nsamples": 10, "batch_size": 4}, source)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert max(b["input_ids"].shape[1] for b in batches) == 8
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": s}) for s in quanta.examples.SENTENCES[:3]))
    with pytest.raises(SourceError, match="no string field 'text'.*found: body"):
        load_data(str(jsonl), source)
    batches = load_data({"path": str(jsonl), "field": "body"}, source)
    assert batches[0]["input_ids"].shape[0] == 3
    tensors = tmp_path / "calib.safetensors"
    save_file({"input_ids": torch.ones(10, 5, dtype=torch.int64), "attention_mask": torch.ones(10, 5, dtype=torch.int64)},
              str(tensors))
    batches = load_data({"path": str(tensors), "batch_size": 4}, source)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2] and set(batches[0]) == {"input_ids", "attention_mask"}
    # The whole path: quantize MiniLM with the user's own text file.
    qmodel = quanta.quantize(source.model, {"algorithm": "gptq", "global_config": {"dtype": "int8"},
                                            "module_type_configs": {"Embedding": None}},
                             data=load_data({"path": str(text), "nsamples": 8}, source))
    assert len(quanta.records(qmodel)) == 37


def test_bad_sources_name_the_key_and_what_was_tried(tmp_path):
    with pytest.raises(SourceError, match=r"^model: 'minlm' is not an example.*did you mean 'minilm'"):
        load_model("minlm")
    with pytest.raises(SourceError, match="no module 'nosuchpkg.models' .*on sys.path or in the current directory"):
        load_model("nosuchpkg.models:build")
    (tmp_path / "m.py").write_text("def build():\n    return 3\n")
    with pytest.raises(SourceError, match="returned a int, not a torch.nn.Module"):
        load_model(f"{tmp_path / 'm.py'}:build")
    with pytest.raises(SourceError, match="has no 'biuld'.*did you mean 'build'"):
        load_model(f"{tmp_path / 'm.py'}:biuld")
    pickled = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)
    with pytest.raises(SourceError, match="does not unpickle"):
        load_model(str(pickled))
    with pytest.raises(SourceError, match=r"model.pathh: unknown key 'pathh'.*did you mean 'path'"):
        load_model({"pathh": "x"}, "model")
    with pytest.raises(SourceError, match="data: .*unknown data file type '.csv'"):
        (tmp_path / "d.csv").write_text("a,b\n")
        load_data(str(tmp_path / "d.csv"))
    (tmp_path / "t.txt").write_text("hello\n")
    with pytest.raises(SourceError, match="needs a tokenizer"):
        load_data(str(tmp_path / "t.txt"), None)
    with pytest.raises(SourceError, match=r"data.nsamples: must be a positive integer"):
        load_data({"path": str(tmp_path / "t.txt"), "nsamples": 0})


def test_pickle_only_on_request_and_never_read_back(tmp_path, capsys):
    from quanta._cli import main

    recipe = tmp_path / "tiny.yaml"
    (tmp_path / "tinymodel.py").write_text(USER_MODULE)
    recipe.write_text(f"model: '{tmp_path / 'tinymodel.py'}:build'\nglobal_config: {{dtype: int8}}\n"
                      "module_type_configs: {Embedding: null}\n")
    assert main(["quantize", str(recipe), "--format", "pickle", "-o", str(tmp_path / "t.pt")]) == 0
    assert (tmp_path / "t.pt").is_file()
    capsys.readouterr()
    assert main(["export", str(tmp_path / "t.pt"), "-o", str(tmp_path / "t.mlpackage")]) == 2
    assert "does not unpickle" in capsys.readouterr().err
    assert main(["quantize", str(recipe), "-o", str(tmp_path / "t")]) == 0
    loaded = quanta.load(tmp_path / "t", factory=f"{tmp_path / 'tinymodel.py'}:build")  # the code: the user's
    assert type(loaded).__name__ == "TinyLM" and len(quanta.records(loaded)) == 2


@pytest.mark.slow
def test_recipe_export_to_compressed_tensors_beside_the_saved_model(tmp_path, capsys):
    from quanta._cli import main

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    from safetensors.torch import save_file

    save_file({"input_ids": torch.randint(0, 128, (8, 12))}, str(tmp_path / "calib.safetensors"))
    recipe = tmp_path / "llama.yaml"
    recipe.write_text(f"model: {{path: '{tmp_path / 'hf'}', class: AutoModelForCausalLM}}\n"
                      f"data: {{path: '{tmp_path / 'calib.safetensors'}', batch_size: 4}}\n"
                      "algorithm: gptq\n"
                      "global_config: {dtype: int4, granularity: per_block, block_size: 32}\n"
                      "module_type_configs: {Embedding: null}\nmodule_name_configs: {lm_head: null}\n"
                      "export: {format: compressed-tensors}\n")
    assert main(["quantize", str(recipe), "-o", str(tmp_path / "out" / "llama")]) == 0
    assert (tmp_path / "out" / "llama" / "quanta_config.json").is_file()
    ct = tmp_path / "out" / "llama-compressed-tensors"
    assert json.loads((ct / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(ct))
    assert type(loaded).__name__ == "LlamaForCausalLM"


def test_transformers_and_saved_directories_as_model_sources(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    source = load_model({"path": str(tmp_path / "hf"), "class": "AutoModelForCausalLM"})
    assert source.kind == "transformers" and type(source.model).__name__ == "LlamaForCausalLM"
    assert source.rebuild is None and source.tokenizer_dir is None
    with pytest.raises(SourceError, match=r"model.class: transformers has no model class 'AutoModelForCausalLN'"
                                          r".*did you mean 'AutoModelForCausalLM'"):
        load_model({"path": str(tmp_path / "hf"), "class": "AutoModelForCausalLN"})
    qmodel = quanta.quantize(source.model, {"global_config": {"dtype": "int4"}, "module_type_configs": {"Embedding": None}})
    quanta.save(qmodel, tmp_path / "saved")
    saved = load_model(str(tmp_path / "saved"))
    assert saved.kind == "saved" and saved.rebuild == {"transformers": "LlamaForCausalLM"}
    assert quanta.records(saved.model).keys() == quanta.records(qmodel).keys()
    with pytest.raises(SourceError, match="neither a quanta saved model"):
        (tmp_path / "empty").mkdir()
        load_model(str(tmp_path / "empty"))



def test_loading_line_prints_the_model_reference_not_a_dict(tmp_path, capsys):
    from quanta._cli.app import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {factory: quanta.examples.own_model:build, kwargs: {dim: 64}}\n"
                      "global_config: {dtype: int8}\n")
    assert main(["plan", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert "loading model quanta.examples.own_model:build ..." in err and "{" not in err


def test_a_plugin_offers_an_example_model(register_plugin):
    from quanta.examples import Example

    class TwoLayers:
        @quanta.hookimpl
        def example_models(self):
            model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
            return {"two-layers": lambda: Example(name="two-layers", model=model, data=[torch.randn(4, 8)],
                                                  example_inputs=(torch.randn(1, 8),), evaluate=lambda f, q: "")}

    register_plugin(TwoLayers())
    source = load_model("two-layers")
    assert source.kind == "example" and source.rebuild == {"example": "two-layers"}
    with pytest.raises(SourceError, match=r"did you mean 'two-layers'"):
        load_model("two-layer")
