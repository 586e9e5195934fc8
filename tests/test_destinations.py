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
    assert status == 2 and "not a regular file" in err, err


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


# -- faults: interrupts swallowed by a converter, killed runs, full disks ----------------------

class _SwallowingExporter(quanta.contracts.Exporter):
    """Converts like coremltools does in places: a bare ``except:`` around work that Ctrl-C hits."""

    name = "swallows-ctrl-c"
    description = "test exporter whose conversion swallows KeyboardInterrupt"
    writes_directory = True

    def export(self, model, path, *, example_inputs=None, overwrite=False):
        import signal

        from quanta._files.atomic import atomic_dir

        try:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the conversion
            for _ in range(1000):
                pass
        except:  # noqa: E722 - what the converter does
            pass
        with atomic_dir(path, overwrite=overwrite) as staging:
            (staging / "model.bin").write_text("converted")
        return os.fspath(path)


class _Contribute:
    def __init__(self, obj):
        self.obj = obj

    @quanta.hookimpl
    def register_exporters(self, register):
        register(self.obj)


def test_ctrl_c_swallowed_inside_an_exporter_is_raised_again(tmp_path):
    from quanta import registry

    qmodel = quanta.quantize(torch.nn.Sequential(torch.nn.Linear(8, 8)), {"global_config": {"dtype": "int8"}})
    with registry.plugin(_Contribute(_SwallowingExporter()), name="swallowing-exporter"):
        with pytest.raises(KeyboardInterrupt):
            quanta.export(qmodel, tmp_path / "out", format="swallows-ctrl-c")
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == []


def _start(args, env_extra=None, cwd=None):
    import subprocess
    import sys

    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "quanta._cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _staged(folder: Path, name: str):
    def ready():
        return any(p.name.startswith(f".{name}.") and p.name.endswith(".quanta-staging")
                   and (p / "quanta_config.json").exists() for p in folder.iterdir())
    return ready


def _wait_for(predicate, proc, timeout=180.0) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".quanta-" in p.name)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "double-SIGINT"])
def test_killed_terminated_and_twice_interrupted_runs(tmp_path, how):
    """SIGKILL leaves a staging folder that the next run removes; SIGTERM cleans up like Ctrl-C
    (exit 143); a second Ctrl-C while the first is cleaning up prints no traceback and leaves nothing."""
    import signal
    import time

    (tmp_path / "netdef.py").write_text(NETDEF)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tmp_path / 'netdef.py'}:build\n" + RTN)
    delay = "model-dir-staged:120,staging-cleanup:4" if how == "double-SIGINT" else "model-dir-staged:120"
    proc = _start(["quantize", recipe, "-o", tmp_path / "out"], {"QUANTA_FAULT_DELAY": delay}, cwd=tmp_path)
    try:
        assert _wait_for(_staged(tmp_path, "out"), proc), proc.communicate()[1]
        if how == "SIGKILL":
            proc.kill()
        elif how == "SIGTERM":
            proc.terminate()
        else:
            proc.send_signal(signal.SIGINT)
            time.sleep(1.5)  # now in the staging-cleanup pause
            proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (tmp_path / "out").exists()
    if how == "SIGKILL":
        assert len(_leftovers(tmp_path)) == 1
        with pytest.warns(UserWarning, match="interrupted earlier run"):
            check_destination(tmp_path / "out", directory=True)
        assert _leftovers(tmp_path) == []
        return
    assert "Traceback" not in err, err
    assert proc.returncode == (143 if how == "SIGTERM" else 130), err
    assert _leftovers(tmp_path) == []


def test_a_leftover_of_a_live_run_is_left_alone_and_a_lost_backup_is_put_back(tmp_path):
    live = tmp_path / f".out.{os.getpid()}.abc123.quanta-staging"
    live.mkdir()
    check_destination(tmp_path / "out", directory=True)
    assert live.exists()
    backup = tmp_path / ".out.999999999.abc123.quanta-backup"  # no such process
    backup.mkdir()
    (backup / "model.safetensors").write_text("the previous copy")
    with pytest.warns(UserWarning, match="put back"):
        check_destination(tmp_path / "out", directory=True)
    assert (tmp_path / "out" / "model.safetensors").read_text() == "the previous copy"


def test_a_file_over_the_size_limit_is_one_clear_line(tmp_path):
    """EFBIG, for real: RLIMIT_FSIZE in a subprocess (Python ignores SIGXFSZ, so the write fails)."""
    import subprocess
    import sys

    code = f"""
import resource, sys, torch, quanta
from quanta.errors import DestinationError
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
try:
    quanta.save(model, {str(tmp_path / 'out')!r})
except DestinationError as exc:
    print(exc)
    sys.exit(3)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 3, out.stderr
    assert "cannot write" in out.stdout and str(tmp_path / "out") in out.stdout and "bytes" in out.stdout
    assert "ulimit -f" in out.stdout
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_a_full_disk_is_one_clear_line(tmp_path):
    """ENOSPC, for real, on a 1 MiB tmpfs (skipped where mounting is not allowed)."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        (mnt / "previous").mkdir()
        model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))  # ~2 MiB of float32
        with pytest.raises(DestinationError, match=r"no space left.*MiB.*bytes.*free") as info:
            quanta.save(model, mnt / "out")
        assert str(mnt / "out") in str(info.value)
        assert not (mnt / "out").exists() and _leftovers(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# -- quanta verify fails loudly ---------------------------------------------------------------

VERIFY_NETS = """import torch


def _net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()


def same():
    return _net(0)


def other():
    return _net(1)


class _Inf(torch.nn.Module):
    def forward(self, x):
        return _net(0)(x) * float("inf")


def infinite():
    return _Inf()
"""


@pytest.mark.slow
def test_verify_fails_loudly_on_a_miss_and_on_non_finite_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nets.py").write_text(VERIFY_NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import nets

    x = torch.randn(1, 16)
    qmodel = quanta.quantize(nets.same(), {"global_config": {"dtype": "int8"}})
    pkg = quanta.export(qmodel, tmp_path / "m.mlpackage", example_inputs=(x,))
    manifest = Path(pkg) / "Manifest.json"
    stamp = manifest.stat().st_mtime_ns

    good = quanta.verify(pkg, qmodel, (x,))
    assert good["passed"] and good["failures"] == []
    assert manifest.stat().st_mtime_ns == stamp  # read only: the manifest is not rewritten
    bad = quanta.verify(pkg, nets.other(), (x,))
    assert not bad["passed"] and "tolerance 0.05" in bad["failures"][0] and "min_cosine 0.99" in bad["failures"][1]
    assert quanta.verify(pkg, nets.other(), (x,), tolerance=100, min_cosine=-1)["passed"]
    with pytest.raises(quanta.ConfigError, match="min_cosine must be a number from -1 to 1"):
        quanta.verify(pkg, qmodel, (x,), min_cosine=2)

    status, out, err = _main("verify", pkg, "--against", "nets.py:other", "--input-shape", "1,16")
    assert status == 3 and "passed: False" in out and "does not match" in err, err
    status, out, err = _main("verify", pkg, "--against", "nets.py:infinite", "--input-shape", "1,16")
    assert status == 3 and "not finite" in err, err
    status, out, err = _main("verify", pkg, "--against", "nets.py:same", "--input-shape", "1,16")
    assert status == 0 and "passed: True" in out, err  # the float model vs its int8 package: within 0.05
    status, out, err = _main("verify", pkg, "--against", "nets.py:same", "--input-shape", "1,16",
                             "--tolerance", "1e-9", "--min-cosine", "0.9")
    assert status == 3 and "max_rel" in err and "tolerance 1e-09" in err, err
    assert manifest.stat().st_mtime_ns == stamp


# -- clear errors and warnings instead of silent results or crashes ----------------------------

def test_a_weight_threshold_above_every_layer_warns(recwarn):
    from quanta._run.preflight import NothingQuantizedWarning

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    with pytest.warns(NothingQuantizedWarning, match=r"no layer will be quantized.*largest layer has 256 elements"):
        quanta.quantize(model, {"global_config": {"dtype": "int8", "weight_threshold": 10**9}})


def test_an_empty_recipe_file_is_refused(tmp_path):
    empty = tmp_path / "recipe.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(quanta.ConfigError, match="recipe.yaml' is empty"):
        quanta.load_recipe(empty)
    with pytest.raises(quanta.ConfigError, match="is empty"):
        quanta.quantize(torch.nn.Linear(4, 4), empty)


def test_a_huge_calibration_nsamples_reads_all_the_data():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    data = [torch.randn(2, 16) for _ in range(3)]
    with pytest.warns(UserWarning, match="3 batch"):
        q = quanta.quantize(model, {"algorithm": "gptq", "calibration_nsamples": 10**30,
                                    "global_config": {"dtype": "int8"}}, data=data)
    assert len(quanta.records(q)) == 1


def test_non_utf8_text_data_is_a_clear_error(tmp_path):
    from quanta._files.sources import SourceError, load_data

    bad = tmp_path / "calib.txt"
    bad.write_bytes(b"a fine line\n\xff\xfe not utf-8\n")
    with pytest.raises(SourceError, match=r"calib.txt' is not UTF-8 text: byte 12 \(line 2\)"):
        load_data(str(bad))


@pytest.mark.slow
def test_text_data_with_the_shipped_decoder(tmp_path):
    """``data: calib.txt`` with ``model: tiny-llama`` (what ``quanta quantize`` loads): its tokenizer
    has no padding token, so the model config's pad_token_id pads; the batches fit the model."""
    from quanta._files.sources import load_data, load_model
    from quanta._run.data_checks import check_calibration_data

    (tmp_path / "calib.txt").write_text("The cat sat on the mat.\nA much longer second line of calibration text.\n")
    source = load_model("tiny-llama")
    (batch,) = load_data(str(tmp_path / "calib.txt"), source)
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()
    check_calibration_data(source.model, [batch])
