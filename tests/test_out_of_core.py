"""Out-of-core quantization of a transformers checkpoint (``quanta.quantize_checkpoint``,
``quanta quantize --out-of-core``): codes equal the in-memory path's, resume after SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

import quanta
from quanta.errors import ConfigError, ModelError

transformers = pytest.importorskip("transformers")
from quanta.examples import tiny_llama  # noqa: E402

from quanta._run.out_of_core import PROGRESS_NAME, CheckpointMismatchError  # noqa: E402

RTN = {"algorithm": "rtn", "global_config": {"dtype": "int4", "granularity": "per_block", "block_size": 32},
       "module_type_configs": {"Embedding": None}}
GPTQ = {"algorithm": "gptq", "global_config": {"dtype": "int4", "granularity": "per_block", "block_size": 64},
        "calibration_nsamples": 3}


@pytest.fixture(scope="module")
def sentences():
    return tiny_llama.training_sentences()[:12]


@pytest.fixture(scope="module")
def data(sentences):
    return tiny_llama.token_batches(tiny_llama.load_tokenizer(), sentences, batch_size=4)


def write_checkpoint(directory: Path, dtype=torch.float32, max_shard_size=None, tied=False) -> Path:
    """The shipped, trained tiny Llama as a transformers checkpoint directory (safetensors)."""
    model = tiny_llama.load_model()
    if tied:  # a config with tied embeddings, the head's trained weight in the embedding
        config = transformers.LlamaConfig(**{**tiny_llama.MODEL_CONFIG, "tie_word_embeddings": True})
        tied_model = transformers.LlamaForCausalLM(config)
        state = dict(model.state_dict())
        state["model.embed_tokens.weight"] = state["lm_head.weight"]
        tied_model.load_state_dict(state)
        model = tied_model
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(directory), **kwargs)
    shutil.copyfile(tiny_llama.HERE / "tokenizer.json", directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>", "bos_token": "<s>"}))
    return directory


def in_memory(checkpoint: Path, recipe: dict, data) -> dict:
    model = transformers.LlamaForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    return quanta.records(quanta.quantize(model, recipe, data=data if recipe["algorithm"] == "gptq" else None))


def assert_same_codes(expected: dict, output: Path) -> None:
    got = quanta.records(quanta.load(output))
    assert sorted(got) == sorted(expected)
    for name, rec in expected.items():
        assert torch.equal(rec.codes, got[name].codes), name
        assert torch.equal(rec.scale, got[name].scale), name


@pytest.mark.parametrize("recipe", [RTN, GPTQ], ids=["rtn", "gptq"])
def test_codes_equal_the_in_memory_path(tmp_path, data, recipe):
    checkpoint = write_checkpoint(tmp_path / "src")
    lines = []
    out = quanta.quantize_checkpoint(checkpoint, recipe, data, output=tmp_path / "out", progress=lines.append)
    assert_same_codes(in_memory(checkpoint, recipe, data), out)
    assert sum(line.startswith("block ") for line in lines) == tiny_llama.MODEL_CONFIG["num_hidden_layers"]
    assert "peak RSS" in lines[0]
    report = json.loads((out / "quanta_report.json").read_text())
    assert len(report["layers"]) == len(quanta.records(quanta.load(out)))
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    # Accounting for long runs: per block (and the layers outside them) the time, the peak
    # memory and the error summary, on the progress display and in the report.
    n_blocks = tiny_llama.MODEL_CONFIG["num_hidden_layers"]
    blocks = report["blocks"]
    assert [b["part"] for b in blocks] == [f"model.layers.{i}" for i in range(n_blocks)] + ["outside the blocks"]
    assert sum(b["layers"] for b in blocks) == len(report["layers"])
    for b, line in zip(blocks, [line for line in lines if line.startswith(("block ", "outside "))]):
        assert b["seconds"] >= 0 and b["peak_rss_bytes"] > 2**20
        errors = [r["rel_error"] for r in report["layers"] if r["name"].startswith(b["part"] + ".")]
        if b["part"].startswith("model.layers."):
            assert b["rel_error_max"] == max(errors) and b["rel_error_mean"] == pytest.approx(sum(errors) / len(errors))
        assert f"peak RSS {b['peak_rss_bytes'] / 2**20:.0f} MiB" in line
        assert (f"max {b['rel_error_max']:.3%}" in line) == (b["rel_error_max"] is not None)


@pytest.mark.slow
def test_bf16_sharded_tied_checkpoint(tmp_path, data):
    checkpoint = write_checkpoint(tmp_path / "src", dtype=torch.bfloat16, max_shard_size="1MB", tied=True)
    assert (checkpoint / "model.safetensors.index.json").is_file()
    out = quanta.quantize_checkpoint(checkpoint, GPTQ, data, output=tmp_path / "out")
    assert_same_codes(in_memory(checkpoint, GPTQ, data), out)


def test_activations_beyond_the_budget_go_to_disk(tmp_path, data):
    checkpoint = write_checkpoint(tmp_path / "src")
    work = tmp_path / "ckpt"
    seen = []

    def progress(line):
        seen.append(sorted(p.name for p in (work / "quanta_activations").glob("*.safetensors"))
                    if (work / "quanta_activations").is_dir() else [])

    out = quanta.quantize_checkpoint(checkpoint, GPTQ, data, output=tmp_path / "out", checkpoint_dir=work,
                                     activation_budget=1, progress=progress)
    assert any(seen), "no activation was kept on disk with a 1-byte budget"
    assert_same_codes(in_memory(checkpoint, GPTQ, data), out)
    assert not work.exists(), "the checkpoint directory is removed after a successful run"


def test_a_checkpoint_of_another_recipe_is_refused(tmp_path, data):
    checkpoint = write_checkpoint(tmp_path / "src")
    work = tmp_path / "ckpt"
    work.mkdir()
    (work / PROGRESS_NAME).write_text(json.dumps({"fingerprint": {"model": "x"}, "done": 1}))
    with pytest.raises(CheckpointMismatchError, match="model"):
        quanta.quantize_checkpoint(checkpoint, GPTQ, data, output=tmp_path / "out", checkpoint_dir=work)
    assert not (tmp_path / "out").exists()


def test_refusals(tmp_path, data):
    checkpoint = write_checkpoint(tmp_path / "src")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "evil.Model"}}))
    with pytest.raises(ModelError, match="auto_map"):
        quanta.quantize_checkpoint(checkpoint, RTN, output=tmp_path / "out")
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="calibration data"):
        quanta.quantize_checkpoint(checkpoint, GPTQ, None, output=tmp_path / "out")
    with pytest.raises(ModelError, match="not a transformers checkpoint"):
        quanta.quantize_checkpoint(tmp_path, RTN, output=tmp_path / "out")


RESUMABLE = textwrap.dedent("""
    import sys, torch, quanta
    from quanta.examples import tiny_llama
    data = tiny_llama.token_batches(tiny_llama.load_tokenizer(), tiny_llama.training_sentences()[:12], batch_size=4)
    recipe = {"algorithm": "gptq", "global_config": {"dtype": "int4", "granularity": "per_block", "block_size": 64},
              "calibration_nsamples": 3}
    quanta.quantize_checkpoint(sys.argv[1], recipe, data, output=sys.argv[2], checkpoint_dir=sys.argv[3])
""")


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_codes_of_an_uninterrupted_run(tmp_path, data):
    checkpoint = write_checkpoint(tmp_path / "src")
    work, out = tmp_path / "ckpt", tmp_path / "out"
    script = tmp_path / "run.py"
    script.write_text(RESUMABLE)
    env = {**os.environ, "QUANTA_FAULT_DELAY": "block-checkpointed:60"}
    proc = subprocess.Popen([sys.executable, str(script), str(checkpoint), str(out), str(work)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (work / PROGRESS_NAME).is_file() and json.loads((work / PROGRESS_NAME).read_text())["done"] >= 1:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads((work / PROGRESS_NAME).read_text())["done"] == 1
    assert not out.exists()
    lines = []
    quanta.quantize_checkpoint(checkpoint, GPTQ, data, output=out, checkpoint_dir=work, progress=lines.append)
    assert lines[0].startswith("resuming after block 1 of 2"), lines
    assert sum(line.startswith("block ") for line in lines) == 1
    assert_same_codes(in_memory(checkpoint, GPTQ, data), out)


@pytest.mark.slow
def test_cli_out_of_core_with_text_data(tmp_path, sentences):
    checkpoint = write_checkpoint(tmp_path / "src")
    (tmp_path / "calib.txt").write_text("\n".join(sentences) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {checkpoint}\nalgorithm: gptq\ndata: {tmp_path / 'calib.txt'}\n"
                      "global_config: {dtype: int4, granularity: per_block, block_size: 64}\n"
                      "module_type_configs: {Embedding: null}\ncalibration_nsamples: 2\n")
    result = subprocess.run([sys.executable, "-m", "quanta", "quantize", str(recipe), "--out-of-core",
                             "-o", str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path / "ckpt"),
                             "--activation-budget", "1M"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "block 2/2 model.layers.1" in result.stderr
    assert "layers quantized" in result.stdout
    loaded = quanta.load(tmp_path / "out")
    assert len(quanta.records(loaded)) == 15  # 7 per block + lm_head
    bad = subprocess.run([sys.executable, "-m", "quanta", "quantize", str(recipe), "--checkpoint-dir", "x"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--out-of-core" in bad.stderr


def test_python_m_quanta_runs_the_command():
    result = subprocess.run([sys.executable, "-m", "quanta", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "quantize" in result.stdout


def test_recipe_checkpoint_dir_key(tmp_path, data):
    checkpoint = write_checkpoint(tmp_path / "src")
    work = tmp_path / "from-recipe"
    seen = []
    recipe = {**RTN, "checkpoint_dir": str(work)}
    quanta.quantize_checkpoint(checkpoint, recipe, output=tmp_path / "out",
                               progress=lambda line: seen.append(work.is_dir()))
    assert seen[0] and not work.exists()  # used while running, removed after success
    model = transformers.LlamaForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    with pytest.raises(ConfigError, match="out-of-core") as info:
        quanta.quantize(model, recipe)
    assert info.value.key == "checkpoint_dir"


RTN_PEAK = textwrap.dedent("""
    import json, os, sys
    import torch, quanta
    from transformers import LlamaForCausalLM  # its import alone takes over 100 MiB
    before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    quanta.quantize_checkpoint(sys.argv[1], {"algorithm": "rtn", "global_config": {"dtype": "int4",
                               "granularity": "per_block", "block_size": 32}}, output=sys.argv[2])
    # VmHWM: this process image's own peak (ru_maxrss keeps the parent's peak across fork + exec).
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"before": before, "peak": int(hwm.split()[1]) * 1024}))
""")


@pytest.mark.slow
def test_rtn_out_of_core_never_holds_the_whole_model(tmp_path):
    # A ~290 MB checkpoint (24 small Llama blocks, one shard each), quantized with rtn in a fresh
    # process: what the run adds to the process's memory stays far below the checkpoint's size
    # (one block and the layers outside the blocks at a time, never the whole float model).
    if not Path("/proc/self/statm").is_file():
        pytest.skip("reads the resident size from /proc (Linux)")
    from safetensors.torch import save_file

    from quanta._files.checkpoints import params_on_meta

    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=24, vocab_size=4000,
                                      num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    with params_on_meta():
        skeleton = transformers.LlamaForCausalLM(config)
    src = tmp_path / "src"
    src.mkdir()
    config.to_json_file(str(src / "config.json"))
    groups: dict = {}
    for key, p in skeleton.named_parameters():
        groups.setdefault(key.split(".")[2] if key.startswith("model.layers.") else "outside", {})[key] = p.shape
    g = torch.Generator().manual_seed(0)
    weight_map, size = {}, 0
    for part, shapes in groups.items():
        tensors = {k: torch.randn(shape, generator=g) * 0.02 for k, shape in shapes.items()}
        save_file(tensors, str(src / f"model-{part}.safetensors"), metadata={"format": "pt"})
        weight_map.update({k: f"model-{part}.safetensors" for k in tensors})
        size += sum(t.numel() * 4 for t in tensors.values())
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": size},
                                                                   "weight_map": weight_map}))
    assert size > 250e6
    done = subprocess.run([sys.executable, "-c", RTN_PEAK, str(src), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    added = figures["peak"] - figures["before"]
    assert added < size / 3, f"the run added {added / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB checkpoint"
    assert len(quanta.records(quanta.load(tmp_path / "out"))) == 24 * 7 + 1
