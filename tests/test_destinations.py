"""Nothing a user owns is replaced: ownership by the marker's content, files a user added, the run's
inputs, the working/home/root folders and mount points; checks leave the user's model as it was;
leftovers of killed runs; full disks; interrupts (issue 15, data loss and faults)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import quanta
from quanta._files.atomic import MARKER, atomic_dir, check_destination, is_quanta_dir
from quanta.errors import DestinationError, DestinationExistsError

ROOT = Path(__file__).parent.parent


def _main(*args) -> tuple[int, str, str]:
    """``quanta._cli.main`` in-process: (status, stdout, stderr)."""
    from quanta._cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in args])
    return status, out.getvalue(), err.getvalue()


def _write(dest: Path, **files: str) -> None:
    with atomic_dir(dest) as staging:
        for name, text in files.items():
            (staging / name).write_text(text)


# -- ownership is the marker's content, and a user's files are never deleted -------------------

@pytest.mark.parametrize("content", ["", "x", "{}", json.dumps({"written_by": "quanta", "version": "0.1.0"})])
def test_a_forged_or_foreign_marker_does_not_make_a_folder_quanta_s(tmp_path, content):
    dest = tmp_path / "thesis"
    dest.mkdir()
    (dest / MARKER).write_text(content)
    (dest / "paper.tex").write_text("precious")
    with pytest.raises(DestinationExistsError, match="paper.tex"):
        _write(dest, a="1")
    assert (dest / "paper.tex").read_text() == "precious" and not is_quanta_dir(dest)


def test_the_marker_lists_the_files_quanta_wrote(tmp_path):
    dest = tmp_path / "out"
    with atomic_dir(dest) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "w.bin").write_bytes(b"1234")
        (staging / "config.json").write_text("{}")
    marker = json.loads((dest / MARKER).read_text())
    assert marker["tool"] == "quanta" and marker["files"] == {"sub/w.bin": 4, "config.json": 2}
    assert is_quanta_dir(dest)


def test_a_rerun_never_deletes_files_the_user_added_or_changed(tmp_path):
    dest = tmp_path / "out"
    _write(dest, **{"model.safetensors": "weights"})
    (dest / "README.md").write_text("my notes")
    (dest / "evals").mkdir()
    with pytest.raises(DestinationExistsError, match=r"README.md, evals.*never deletes them"):
        _write(dest, **{"model.safetensors": "new"})
    assert (dest / "README.md").read_text() == "my notes" and (dest / "model.safetensors").read_text() == "weights"
    (dest / "README.md").unlink()
    (dest / "evals").rmdir()
    (dest / "model.safetensors").write_text("weights, edited by hand")
    with pytest.raises(DestinationExistsError, match=r"model.safetensors \(changed\)"):
        _write(dest, **{"model.safetensors": "new"})
    with atomic_dir(dest, overwrite=True) as staging:  # asked for: replaced
        (staging / "model.safetensors").write_text("new")
    assert (dest / "model.safetensors").read_text() == "new"


def test_an_empty_folder_is_written_into(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    _write(dest, a="1")
    assert (dest / "a").read_text() == "1"


# -- never replaced, even with overwrite -------------------------------------------------------

def test_working_home_root_and_mount_points_are_never_replaced(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for path in (".", work, tmp_path):
        with pytest.raises(DestinationError, match="working directory"):
            check_destination(path, overwrite=True, directory=True)
    home = tmp_path / "elsewhere" / "home"
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    for path in (home, home.parent):
        with pytest.raises(DestinationError, match="home folder"):
            check_destination(path, overwrite=True, directory=True)
    with pytest.raises(DestinationError, match="root folder"):
        check_destination("/", overwrite=True, directory=True)
    if os.path.ismount("/proc"):
        with pytest.raises(DestinationError, match="mount point"):
            check_destination("/proc", overwrite=True, directory=True)
    with pytest.raises(DestinationError, match="empty"):
        check_destination("", overwrite=True)


def test_inputs_and_outputs_that_are_the_same_or_nested_are_refused(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: digits\n")
    cases = [(model_dir, "is the run's input"), (tmp_path, "holds the run's input"),
             (model_dir / "q", "lies inside the run's input")]
    for dest, why in cases:
        with pytest.raises(DestinationError, match=why):
            check_destination(dest, overwrite=True, directory=True, inputs=[model_dir, recipe])
    check_destination(tmp_path / "out", overwrite=True, directory=True, inputs=[model_dir, recipe])


NETDEF = """import torch


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
"""
RTN = "algorithm: rtn\nglobal_config: {weight_dtype: int8, granularity: per_channel}\n"


@pytest.mark.slow
def test_cli_refuses_the_recipe_folder_the_input_model_and_export_path_equal_to_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / "netdef.py").write_text(NETDEF)
    recipe = work / "r.yaml"
    recipe.write_text(f"model: {work / 'netdef.py'}:build\n" + RTN)
    status, _, err = _main("quantize", recipe, "-o", work, "--overwrite")
    assert status == 2 and "holds the run's input" in err, err
    assert sorted(os.listdir(work)) == ["netdef.py", "r.yaml"]
    status, _, err = _main("quantize", recipe, "-o", work / "netdef.py", "--format", "pickle", "--overwrite")
    assert status == 2 and "is the run's input" in err, err

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "hf")
    llama = tmp_path / "llama.yaml"
    llama.write_text(f"model: {tmp_path / 'hf'}\n" + RTN)
    status, _, err = _main("quantize", llama, "-o", tmp_path / "hf", "--overwrite")
    assert status == 2 and "is the run's input" in err, err
    status, _, err = _main("quantize", llama, "-o", tmp_path / "saved")
    assert status == 0, err
    saved = sorted(os.listdir(tmp_path / "saved"))
    status, _, err = _main("quantize", llama, "--model", tmp_path / "saved", "-o", tmp_path / "saved", "--overwrite")
    assert status == 2 and "is the run's input" in err, err
    assert sorted(os.listdir(tmp_path / "saved")) == saved and is_quanta_dir(tmp_path / "saved")

    with_export = tmp_path / "e.yaml"
    with_export.write_text(recipe.read_text() + f"export: {{format: coreml, path: {tmp_path / 'pkg.mlpackage'}}}\n")
    status, _, err = _main("quantize", with_export, "-o", tmp_path / "pkg.mlpackage")
    assert status == 2 and "export.path" in err and "same or nested" in err, err
    assert not (tmp_path / "pkg.mlpackage").exists()

    status, _, err = _main("quantize", recipe, "-o", "")
    assert status == 2 and "output path is empty" in err


def test_devices_and_pipes_are_not_regular_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _, err = _main("quantize", "/dev/zero")
    assert status == 2 and "not a regular file (it is a character device)" in err, err
    fifo = tmp_path / "calib.txt"
    os.mkfifo(fifo)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: tiny-llama\ndata: {fifo}\n")
    status, _, err = _main("quantize", recipe, "-o", tmp_path / "out")
    assert status == 2 and "not a regular file (it is a named pipe (FIFO))" in err, err
    status, _, err = _main("quantize", fifo)
    assert status == 2 and "named pipe" in err, err


# -- checks leave the user's model as it was ---------------------------------------------------

class _Stateful(torch.nn.Module):
    """A forward that changes its module: a counter, a running buffer and its own bias."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)
        self.register_buffer("running", torch.zeros(8))
        self.calls = 0
        self.history = []

    def forward(self, x):
        self.calls += 1
        self.history.append(x.shape)
        self.running.mul_(0.9).add_(x.mean(0))
        self.lin.bias.data += 1.0
        self.note = "ran"
        return self.lin(x)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.calls, list(model.history)


def test_checks_leave_a_stateful_model_as_it_was():
    from quanta._run.data_checks import check_calibration_data
    from quanta._run.export_checks import check_example_inputs

    torch.manual_seed(0)
    model = _Stateful()
    tensors, calls, history = _state(model)
    data = [torch.randn(2, 8) for _ in range(2)]
    check_calibration_data(model, data)
    check_example_inputs(model, (data[0],))
    quanta.quantize(model, {"algorithm": "gptq", "global_config": {"weight_dtype": "int8"}}, data=data)
    after, calls_after, history_after = _state(model)
    assert calls_after == calls == 0 and history_after == history == [] and not hasattr(model, "note")
    assert all(torch.equal(tensors[k], after[k]) for k in tensors)
    assert model.training  # the mode too
