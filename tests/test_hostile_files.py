"""Hostile and damaged files (issue 15, security): a downloaded directory is data.

A saved directory, a transformers folder or an ``.mlpackage`` that names code, points outside
itself, describes a huge model, or holds values quanta.save could not have written gets a clear
error naming the entry, and nothing runs: the hostile factories below would create a marker file
or delete a folder, and the tests check that neither happened. CLI commands run in-process
(``quanta._cli.main``), as a user's would.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import quanta
from quanta.errors import ConfigError, CoreMLPackageError
from quanta._files.saving import CONFIG_NAME, SavedModelError
from quanta._files.sources import SourceError, load_data, load_model

NETDEF = '''
import torch


def build(hidden=8):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 4))
'''


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


@pytest.fixture(scope="module")
def qmodel():
    return quanta.quantize(_net(), {"global_config": {"dtype": "int4", "granularity": "per_channel"}})


@pytest.fixture
def saved(tmp_path, qmodel):
    """A saved int4 model whose config records the user's netdef.py:build (with kwargs)."""
    (tmp_path / "netdef.py").write_text(NETDEF)
    return quanta.save(qmodel, tmp_path / "download", rebuild={"factory": f"{tmp_path / 'netdef.py'}:build",
                                                               "kwargs": {"hidden": 8}})


def _config(path: Path) -> dict:
    return json.loads((path / CONFIG_NAME).read_text())


def _write_config(path: Path, config: dict) -> None:
    (path / CONFIG_NAME).write_text(json.dumps(config))


def cli(*args, cwd: Path) -> tuple[int, str]:
    from quanta._cli import main

    err, out = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            status = main([str(a) for a in args])
    finally:
        os.chdir(old)
    return status, err.getvalue()


# ----------------------------------------------------------------------------- 1. a saved directory names code


def _hostile(tmp_path: Path, kind: str) -> dict:
    if kind == "subprocess":
        return {"factory": "subprocess:check_call", "kwargs": {"args": ["sh", "-c", f"id > {tmp_path / 'PWNED'}"]}}
    return {"factory": "shutil:rmtree", "kwargs": {"path": str(tmp_path / "precious")}}


def _nothing_ran(tmp_path: Path) -> None:
    assert not (tmp_path / "PWNED").exists()
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "my work"


ENTRY_POINTS = {
    "quanta.load": lambda d, t: quanta.load(d),
    "load_model": lambda d, t: load_model(str(d)),
    "cli-export": lambda d, t: cli("export", d, "-o", t / "x.mlpackage", cwd=t),
    "cli-verify": lambda d, t: cli("verify", t / "x.mlpackage", "--against", d, cwd=t),
    "cli-plan": lambda d, t: cli("plan", t / "r.yaml", "--model", d, cwd=t),
    "cli-quantize": lambda d, t: cli("quantize", t / "r.yaml", "--model", d, "-o", t / "q", cwd=t),
}


@pytest.mark.parametrize("kind", ["subprocess", "rmtree"])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_hostile_rebuild_factory_runs_nothing(tmp_path, saved, kind, entry):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("my work")
    (tmp_path / "r.yaml").write_text("global_config: {dtype: int8}\n")
    config = _config(saved)
    config["rebuild"] = _hostile(tmp_path, kind)
    _write_config(saved, config)
    try:
        result = ENTRY_POINTS[entry](saved, tmp_path)
    except SavedModelError as exc:
        message = str(exc)
    else:
        status, message = result
        assert status == 2, message
    _nothing_ran(tmp_path)
    factory = config["rebuild"]["factory"]
    assert f"--factory {factory}" in message and "never runs code" in message and "--trust-remote-code" in message


def test_model_code_shipped_in_the_download_is_not_imported(tmp_path, saved):
    (saved / "model_def.py").write_text(f"open({str(tmp_path / 'PWNED')!r}, 'w').write('x')\n{NETDEF}")
    config = _config(saved)
    config["rebuild"] = {"factory": "model_def.py:build", "kwargs": {}}
    _write_config(saved, config)
    status, message = cli("export", saved, "-o", tmp_path / "x.mlpackage", cwd=saved)
    assert status == 2 and "--factory model_def.py:build" in message
    assert not (tmp_path / "PWNED").exists()


def test_rebuild_written_twice_is_refused(tmp_path, saved):
    text = (saved / CONFIG_NAME).read_text()
    hostile = json.dumps(_hostile(tmp_path, "subprocess"))
    (saved / CONFIG_NAME).write_text(text.replace('"rebuild":', f'"rebuild": {hostile},\n "rebuild":', 1))
    with pytest.raises(SavedModelError, match=r"names the key 'rebuild' twice"):
        quanta.load(saved, trust_remote_code=True)
    assert not (tmp_path / "PWNED").exists()


def test_the_users_factory_or_an_explicit_opt_in_builds_the_model(tmp_path, saved, qmodel, capsys):
    ref = f"{tmp_path / 'netdef.py'}:build"
    for loaded in (quanta.load(saved, factory=ref), quanta.load(saved, trust_remote_code=True)):
        assert len(quanta.records(loaded)) == 2
        for name, rec in quanta.records(qmodel).items():
            assert torch.equal(quanta.records(loaded)[name].codes, rec.codes)
    assert f"trust_remote_code: importing and calling {ref}(**{{'hidden': 8}})" in capsys.readouterr().err
    (tmp_path / "r.yaml").write_text("global_config: {dtype: int8}\n")
    status, err = cli("plan", tmp_path / "r.yaml", "--model", saved, "--factory", "netdef.py:build", cwd=tmp_path)
    assert status == 0, err
    status, err = cli("plan", tmp_path / "r.yaml", "--model", saved, "--trust-remote-code", cwd=tmp_path)
    assert status == 0 and "trust_remote_code: importing and calling" in err, err
    # A recipe gives the code the same way: {path: DIR, factory: ...}.
    source = load_model({"path": str(saved), "factory": ref, "kwargs": {"hidden": 8}})
    assert source.kind == "saved" and len(quanta.records(source.model)) == 2


EVIL_CONFIG = '''open({marker!r}, "w").write("x")
from transformers import PretrainedConfig


class EvilConfig(PretrainedConfig):
    model_type = "evilnet"
'''


def _auto_map_folder(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "configuration_evil.py").write_text(EVIL_CONFIG.format(marker=str(marker)))
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evilnet", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}}))
    return folder


def test_transformers_auto_map_is_a_clear_error_and_runs_nothing(tmp_path, saved):
    pytest.importorskip("transformers")
    folder = _auto_map_folder(tmp_path / "hub_repo", tmp_path / "PWNED")
    with pytest.raises(SourceError, match=r"model_type 'evilnet' is not an architecture.*auto_map.*--trust-remote"):
        load_model(str(folder))
    config = _config(saved)
    config["rebuild"] = {"transformers": "LlamaModel"}
    _write_config(saved, config)
    _auto_map_folder(saved, tmp_path / "PWNED")
    with pytest.raises(SavedModelError, match=r"model_type 'evilnet'.*--trust-remote-code"):
        quanta.load(saved)
    assert not (tmp_path / "PWNED").exists()


# ----------------------------------------------------------------------------- 2. reads outside the directory


@pytest.fixture
def sharded(tmp_path, qmodel):
    out = quanta.save(qmodel, tmp_path / "sharded", max_shard_bytes=100)
    assert (out / "model.safetensors.index.json").is_file()
    return out


@pytest.mark.parametrize("form", ["dotdot", "absolute"])
def test_shard_names_outside_the_directory_are_refused(tmp_path, sharded, form):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "outside").mkdir()
    shutil.move(str(sharded / shard), tmp_path / "outside" / shard)
    name = f"../outside/{shard}" if form == "dotdot" else str(tmp_path / "outside" / shard)
    index["weight_map"] = {k: (name if v == shard else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(SavedModelError, match=r"absolute path or climbs out") as info:
        quanta.load(sharded, _net())
    assert info.value.name == name


def test_symlinked_weights_are_refused(tmp_path, qmodel):
    out = quanta.save(qmodel, tmp_path / "download")
    (tmp_path / "elsewhere").mkdir()
    shutil.move(str(out / "model.safetensors"), tmp_path / "elsewhere" / "model.safetensors")
    (out / "model.safetensors").symlink_to(tmp_path / "elsewhere" / "model.safetensors")
    with pytest.raises(SavedModelError, match=r"'model.safetensors'.*symlink leading outside"):
        quanta.load(out, _net())


def test_a_symlinked_tokenizer_is_never_copied(tmp_path, qmodel):
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    source = tmp_path / "tok"
    source.mkdir()
    (source / "tokenizer.json").symlink_to(secret)
    with pytest.raises(SavedModelError, match=r"tokenizer file 'tokenizer.json'.*leads outside"):
        quanta.save(qmodel, tmp_path / "out", tokenizer=source)
    assert not (tmp_path / "out").exists()
    (tmp_path / "calib.txt").write_text("hello\n")
    with pytest.raises(SourceError, match=r"tokenizer.json.*symlink leading outside"):
        load_data({"path": str(tmp_path / "calib.txt"), "tokenizer": str(source)})


def _package(tmp_path: Path, item_path: str) -> Path:
    pkg = tmp_path / "download.mlpackage"
    (pkg / "Data" / "com.apple.CoreML").mkdir(parents=True)
    (pkg / "Manifest.json").write_text(json.dumps({
        "fileFormatVersion": "1.0.0", "rootModelIdentifier": "A",
        "itemInfoEntries": {"A": {"author": "com.apple.CoreML", "description": "CoreML Model Specification",
                                  "name": "model.mlmodel", "path": item_path}}}))
    return pkg


@pytest.mark.parametrize("item", ["../../outside/model.mlmodel", "/etc/passwd"])
def test_manifest_paths_outside_the_package_are_refused(tmp_path, item):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "model.mlmodel").write_bytes(b"\x08\x07" * 40)
    pkg = _package(tmp_path, item)
    with pytest.raises(CoreMLPackageError, match=r"Manifest.json item path .*absolute path or climbs out"):
        quanta.verify(pkg, _net(), example_inputs=torch.randn(1, 16))
    from quanta.mil.program import load_program

    with pytest.raises(CoreMLPackageError, match=r"absolute path or climbs out"):
        load_program(pkg)


def test_a_package_symlinking_out_is_refused(tmp_path):
    pkg = _package(tmp_path, "com.apple.CoreML/model.mlmodel")
    (tmp_path / "outside").mkdir()
    (pkg / "Data" / "com.apple.CoreML" / "weights").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(CoreMLPackageError, match=r"weights.*symlink leading outside"):
        quanta.verify(pkg, _net(), example_inputs=torch.randn(1, 16))


# ----------------------------------------------------------------------------- 3. memory bombs


def _llama_folder(path: Path, **config) -> Path:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    data = json.loads((path / "config.json").read_text())
    data.update(config)
    (path / "config.json").write_text(json.dumps(data))
    return path


def test_a_huge_vocab_size_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    folder = _llama_folder(tmp_path / "llama", vocab_size=400_000, hidden_size=64)  # ~200 MB of float32
    monkeypatch.setenv("QUANTA_MAX_MODEL_BYTES", str(50 * 2**20))
    with pytest.raises(SourceError, match=r"above the memory budget of 50.0 MiB.*QUANTA_MAX_MODEL_BYTES"):
        load_model({"path": str(folder), "class": "AutoModelForCausalLM"})


def test_a_saved_config_with_vocab_size_2_31_fails_fast(tmp_path, qmodel):
    pytest.importorskip("quanta._files.untrusted")  # the old code would try to allocate 512 GiB
    out = quanta.save(qmodel, tmp_path / "download")
    _llama_folder(out, vocab_size=2**31, hidden_size=64)
    config = _config(out)
    config["rebuild"] = {"transformers": "LlamaForCausalLM"}
    _write_config(out, config)
    with pytest.raises(SavedModelError, match=r"would take 1.0 TiB, above the memory budget"):
        quanta.load(out)


def test_metadata_files_above_the_limit_are_not_read(tmp_path, saved, monkeypatch):
    monkeypatch.setenv("QUANTA_MAX_METADATA_BYTES", "4096")
    (saved / CONFIG_NAME).write_text((saved / CONFIG_NAME).read_text() + " " * 8000)
    with pytest.raises(SavedModelError, match=r"above the 4.0 KiB limit .*QUANTA_MAX_METADATA_BYTES"):
        quanta.load(saved, _net())
    recipe = tmp_path / "big.yaml"
    recipe.write_text("global_config: {dtype: int8}\n" + "#" * 8000 + "\n")
    with pytest.raises(ConfigError, match=r"above the 4.0 KiB limit"):
        quanta.load_recipe(recipe)


BILLION_LAUGHS = 'global_config: {dtype: int8}\nx0: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + \
    "".join(f"x{i}: &{chr(97 + i)} [{', '.join(['*' + chr(96 + i)] * 9)}]\n" for i in range(1, 9))


def test_yaml_aliases_are_refused(tmp_path):
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text(BILLION_LAUGHS)
    with pytest.raises(ConfigError, match=r"line 3.*alias \*a is not allowed"):
        quanta.load_recipe(recipe)
    with pytest.raises(ConfigError, match=r"alias \*a is not allowed"):
        quanta.plan(_net(), str(recipe))


@pytest.mark.parametrize("where", ["quanta_config", "index", "manifest"])
def test_duplicate_json_keys_are_refused(tmp_path, sharded, where):
    if where == "manifest":
        pkg = _package(tmp_path, "com.apple.CoreML/model.mlmodel")
        text = (pkg / "Manifest.json").read_text()
        (pkg / "Manifest.json").write_text(text.replace('"rootModelIdentifier": "A"',
                                                        '"rootModelIdentifier": "A", "rootModelIdentifier": "B"'))
        with pytest.raises(CoreMLPackageError, match=r"'rootModelIdentifier' twice"):
            quanta.verify(pkg, _net(), example_inputs=torch.randn(1, 16))
        return
    file = sharded / (CONFIG_NAME if where == "quanta_config" else "model.safetensors.index.json")
    text = file.read_text()
    file.write_text(text.replace("{", '{"format": "quanta", ', 1) if where == "quanta_config"
                    else text.replace('"weight_map": {', '"weight_map": {"0.bias": "x", ', 1))
    with pytest.raises(SavedModelError, match=r"names the key '(format|0.bias)' twice"):
        quanta.load(sharded, _net())


def test_deeply_nested_json_is_a_clear_error(saved):
    (saved / CONFIG_NAME).write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(SavedModelError, match=r"nested too deeply"):
        quanta.load(saved, _net())


def test_safetensors_header_larger_than_the_file_is_refused(tmp_path, qmodel):
    out = quanta.save(qmodel, tmp_path / "download")
    raw = (out / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["0.bias"]["shape"] = [2**40]
    new = json.dumps(header).encode()
    (out / "model.safetensors").write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    with pytest.raises(SavedModelError, match=r"'model.safetensors'.* not a readable safetensors file"):
        quanta.load(out, _net())


def test_a_recorded_codes_shape_bigger_than_the_stored_codes_is_refused(saved):
    config = _config(saved)
    config["records"]["0.weight"]["tensors"]["codes"]["shape"] = [2**20, 2**20]
    _write_config(saved, config)
    with pytest.raises(SavedModelError, match=r"'0.weight'.*stored codes are 64 bytes, but shape"):
        quanta.load(saved, _net())


# ----------------------------------------------------------------------------- 4. values quanta.save never writes


def _tensors(path: Path, edit) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_non_finite_scale_is_refused(saved):
    _tensors(saved, lambda t: t["2.weight_quanta_scale"].__setitem__((1, 0), float("nan")))
    with pytest.raises(SavedModelError, match=r"'2.weight'.*scale holds a non-finite value \(nan at index \(1, 0\)\)"):
        quanta.load(saved, _net())


def test_codes_outside_the_specs_range_are_refused(saved, qmodel):
    codes = quanta.records(qmodel)["0.weight"].codes.clone()
    codes[0, 0] = 9  # int4 holds -8..7
    _tensors(saved, lambda t: t.__setitem__("0.weight_quanta_codes", codes))
    config = _config(saved)
    entry = config["records"]["0.weight"]["tensors"]["codes"]
    del entry["packed_bits"], entry["signed"]
    _write_config(saved, config)
    with pytest.raises(SavedModelError, match=r"'0.weight'.*code 9, outside the range of its spec's int4 \[-8, 7\]"):
        quanta.load(saved, _net())


def test_lut_grid_without_a_table_is_refused(saved):
    config = _config(saved)
    config["records"]["0.weight"]["grid"] = "lut"
    _write_config(saved, config)
    with pytest.raises(SavedModelError, match=r"'0.weight'.*grid is 'lut' but it stores no lookup table"):
        quanta.load(saved, _net())


@pytest.mark.parametrize("how", ["two-records", "record-and-plain", "two-shards"])
def test_duplicated_tensor_names_are_refused(tmp_path, saved, sharded, how):
    if how == "two-shards":
        index = json.loads((sharded / "model.safetensors.index.json").read_text())
        first, second = sorted(set(index["weight_map"].values()))[:2]
        extra = load_file(str(sharded / first))
        tensors = load_file(str(sharded / second))
        key = next(iter(extra))
        tensors[key] = extra[key]
        save_file(tensors, str(sharded / second))
        with pytest.raises(SavedModelError, match=rf"'{key}'.*stored in two files"):
            quanta.load(sharded, _net())
        return
    config = _config(saved)
    if how == "two-records":
        config["records"]["2.weight"]["tensors"]["scale"]["key"] = "0.weight_quanta_scale"
        match = r"'0.weight_quanta_scale'.*named twice"
    else:
        _tensors(saved, lambda t: t.__setitem__("0.weight", torch.zeros(8, 16)))
        match = r"'0.weight'.*stored twice: as a quantized record and as a plain tensor"
    _write_config(saved, config)
    with pytest.raises(SavedModelError, match=match):
        quanta.load(saved, _net())


class Twin(torch.nn.Module):
    def __init__(self, tied: bool):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        if tied:
            self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("quantized", [("a", "b"), ("a",)])
def test_inconsistent_tied_weights_are_refused(tmp_path, quantized):
    config = {"global_config": {"dtype": "int4", "granularity": "per_channel"},
              "module_name_configs": {n: None for n in ("a", "b") if n not in quantized}}
    out = quanta.save(quanta.quantize(Twin(tied=False), config), tmp_path / "m")
    match = r"two records|a record for each" if len(quantized) == 2 else r"differs from this record's values"
    with pytest.raises(SavedModelError, match=match):
        quanta.load(out, Twin(tied=True))


def test_example_inputs_with_other_names_are_a_clear_error(tmp_path, qmodel):
    out = quanta.save(qmodel, tmp_path / "download", example_inputs=torch.randn(1, 16))
    save_file({"arg.7": torch.zeros(1, 16)}, str(out / "example_inputs.safetensors"))
    with pytest.raises(SavedModelError, match=r"example inputs must be named arg.0"):
        quanta._files.saving.load_example_inputs(out)


def test_a_hugging_face_cache_snapshot_may_link_to_its_blobs(tmp_path, qmodel):
    """The one allowed link out: snapshots/<rev>/x -> ../../blobs/<hash>, as huggingface_hub lays out its cache."""
    repo = tmp_path / "models--me--tiny"
    snapshot = quanta.save(qmodel, repo / "snapshots" / "abc123")
    (repo / "blobs").mkdir()
    shutil.move(str(snapshot / "model.safetensors"), repo / "blobs" / "f00d")
    (snapshot / "model.safetensors").symlink_to(Path("..") / ".." / "blobs" / "f00d")
    loaded = quanta.load(snapshot, _net())
    assert torch.equal(quanta.records(loaded)["0.weight"].codes, quanta.records(qmodel)["0.weight"].codes)
