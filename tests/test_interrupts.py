"""Ctrl-C (a real SIGINT to a real ``quanta`` process) never leaves a partial file or loses the old one.

Two kinds of runs per command. With ``QUANTA_FAULT_DELAY`` (test-only, :mod:`quanta._files.faults`) the
process pauses at the riskiest instant, the new output complete beside the destination but not
yet renamed or swapped in, and the signal lands exactly there: the previous output must be
intact, no temporary file left, exit status 130. Without it, the signal lands at a spread of
moments over the whole run: the destination must hold either the previous output or the complete
new one, never anything else.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import quanta

pytestmark = pytest.mark.slow  # several real subprocesses, each importing torch (and coremltools)


#: Exit statuses of a run that finished (0) or was interrupted: 130 from quanta's handler, or death by
#: SIGINT (-2 here, 130 in a shell) when the signal lands after the command returned, while Python exits.
DONE_OR_INTERRUPTED = (0, 130, -signal.SIGINT)


def _interrupted_before_quanta_ran(proc: subprocess.Popen, err: str) -> bool:
    """Python's own startup (importing ``site``, before any quanta code) was interrupted: it exits 1."""
    return proc.returncode == 1 and "Fatal Python error: init_import_site" in err


def _tree(path: Path) -> dict[str, str]:
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _start(args, env_extra=None, cwd=None) -> subprocess.Popen:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "quanta._cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc, timeout=120.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".quanta-tmp" in p.name or ".quanta-staging" in p.name
            or ".quanta-backup" in p.name]


NETDEF = """import torch


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
"""


@pytest.fixture
def setup(tmp_path):
    (tmp_path / "netdef.py").write_text(NETDEF)
    ref = f"{tmp_path / 'netdef.py'}:build"
    (tmp_path / "r.yaml").write_text(f"model: {ref}\nglobal_config: {{dtype: int8}}\n")
    (tmp_path / "r4.yaml").write_text(f"model: {ref}\nglobal_config: {{dtype: int4, granularity: per_block, "
                                      "block_size: 8}\n")
    return tmp_path


def _quantize(tmp: Path, recipe: str, output: str, *extra) -> None:
    out = subprocess.run([sys.executable, "-m", "quanta._cli", "quantize", tmp / recipe, "-o", tmp / output, "-q",
                          *extra], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _quantize_old(tmp: Path) -> dict:
    _quantize(tmp, "r.yaml", "q.pt", "--format", "pickle")
    return _tree(tmp / "q.pt")


def _spec_of(path: Path) -> str:
    return str(next(iter(quanta.records(torch.load(path, weights_only=False)).values())).spec.dtype)


def test_sigint_while_quantize_renames_keeps_the_previous_model(setup):
    tmp = setup
    before = _quantize_old(tmp)
    proc = _start(["quantize", tmp / "r4.yaml", "-o", tmp / "q.pt", "--format", "pickle"],
                  {"QUANTA_FAULT_DELAY": "model-file-written:60"})
    assert _wait_for(lambda: any(p.name.startswith(".q.pt.") for p in tmp.iterdir()), proc), proc.communicate()
    time.sleep(0.3)  # inside the pause: the new file is complete beside the destination
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert _tree(tmp / "q.pt") == before and _spec_of(tmp / "q.pt") == "int8"
    assert not _leftovers(tmp)


def test_sigint_while_a_saved_directory_is_swapped_in_keeps_the_previous_one(setup):
    tmp = setup
    _quantize(tmp, "r.yaml", "q")
    before = _tree(tmp / "q")
    proc = _start(["quantize", tmp / "r4.yaml", "-o", tmp / "q"], {"QUANTA_FAULT_DELAY": "model-dir-staged:60"})

    def staged():
        return any((p / "quanta_config.json").exists() for p in tmp.glob(".q.*.quanta-staging"))

    assert _wait_for(staged, proc, timeout=300), proc.communicate()
    time.sleep(0.3)  # inside the pause: the new directory is complete beside the destination
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert _tree(tmp / "q") == before
    loaded = quanta.load(tmp / "q", factory=f"{tmp / 'netdef.py'}:build")
    assert {str(r.spec.dtype) for r in quanta.records(loaded).values()} == {"int8"}
    assert not _leftovers(tmp)


@pytest.mark.parametrize("delay", [0.5, 1.2, 3.5, 7.0])
def test_sigint_at_any_moment_of_quantize_leaves_old_or_new(setup, delay):
    tmp = setup
    _quantize(tmp, "r.yaml", "q")  # a saved directory (quanta.save), the default format
    before = _tree(tmp / "q")
    proc = _start(["quantize", tmp / "r4.yaml", "-o", tmp / "q"])
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in DONE_OR_INTERRUPTED or _interrupted_before_quanta_ran(proc, err), err
    assert "pybind11" not in err  # no abort inside torch's import (quanta holds the signal there)
    now = _tree(tmp / "q")
    if now != before:  # then it must be the complete new model
        loaded = quanta.load(tmp / "q", factory=f"{tmp / 'netdef.py'}:build")
        assert {str(r.spec.dtype) for r in quanta.records(loaded).values()} == {"int4"}
    if proc.returncode == 0:
        assert now != before
    assert not _leftovers(tmp)


def _export(tmp: Path, source: str, extra=None, env=None) -> subprocess.Popen:
    """``quanta export`` of a saved directory ``source`` onto ``q.mlpackage``."""
    return _start(["export", tmp / source, "-o", tmp / "q.mlpackage", "--input-shape", "1,32",
                   "--factory", f"{tmp / 'netdef.py'}:build", *(extra or [])], env)


def test_sigint_while_export_swaps_keeps_the_previous_package(setup):
    tmp = setup
    _quantize(tmp, "r.yaml", "q8")
    proc = _export(tmp, "q8")
    assert proc.wait(timeout=300) == 0, proc.communicate()
    before = _tree(tmp / "q.mlpackage")
    _quantize(tmp, "r4.yaml", "q4")
    proc = _export(tmp, "q4", env={"QUANTA_FAULT_DELAY": "package-staged:60"})

    def staged():
        return any((p / "Manifest.json").exists() for p in tmp.glob(".q.mlpackage.*.quanta-staging"))

    assert _wait_for(staged, proc, timeout=300), proc.communicate()
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert _tree(tmp / "q.mlpackage") == before
    assert not _leftovers(tmp)


@pytest.mark.parametrize("delay", [3.0, 10.0])
def test_sigint_at_any_moment_of_export_leaves_old_or_new(setup, delay):
    from quanta.plugins.coreml.package_check import check_package

    tmp = setup
    _quantize(tmp, "r.yaml", "q8")
    assert _export(tmp, "q8").wait(timeout=300) == 0
    before = _tree(tmp / "q.mlpackage")
    _quantize(tmp, "r4.yaml", "q4")
    proc = _export(tmp, "q4")
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in DONE_OR_INTERRUPTED, err
    check_package(tmp / "q.mlpackage")  # complete, whichever it is
    now = _tree(tmp / "q.mlpackage")
    if now != before:  # then it is the complete new package, holding the int4 codes
        from quanta.plugins.coreml.exporter import stored_weights

        assert {w.dtype for w in stored_weights(tmp / "q.mlpackage").values()} == {"int4"}
    if proc.returncode == 0:
        assert now != before
    assert not _leftovers(tmp)


def test_signals_deferred_delivers_a_sigint_after_the_block_not_inside_it():
    """The command imports torch inside ``signals_deferred``: torch's import runs Python inside pybind11
    callbacks, where a KeyboardInterrupt aborts the process (SIGABRT) instead of unwinding."""
    code = ("import os, signal\n"
            "from quanta._files.interrupts import signals_deferred\n"
            "done = []\n"
            "try:\n"
            "    with signals_deferred():\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "        sum(range(10**6))  # bytecode runs: an unheld signal would be raised here\n"
            "        done.append(1)\n"
            "    print('after the block')\n"
            "except KeyboardInterrupt:\n"
            "    print('interrupted', done)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "interrupted [1]", out.stderr
