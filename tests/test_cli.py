"""The quanta command, run as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "quanta.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_quantize_example_recipe_prints_table_and_writes_model(tmp_path):
    out = _run("quantize", str(ROOT / "examples/recipes/digits_int8.yaml"), "--output", str(tmp_path / "d.pt"))
    assert out.returncode == 0, out.stderr
    assert "int8 affine per_channel" in out.stdout and "test accuracy" in out.stdout
    assert "[3/3]" in out.stderr  # progress display, from the layer_quantized hook
    model = torch.load(tmp_path / "d.pt", weights_only=False)
    import quanta

    assert len(quanta.records(model)) == 3


def test_plan_describe_and_errors(tmp_path):
    out = _run("plan", str(ROOT / "examples/recipes/digits_int8.yaml"))
    assert out.returncode == 0 and "3 of 3 weights would be quantized" in out.stdout
    out = _run("describe", "observer", "percentile")
    assert out.returncode == 0 and "percentile: float = 99.99" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: digits\nglobal_config: {granularity: per_blok}\n")
    out = _run("plan", str(bad))
    assert out.returncode == 2 and "did you mean 'per_block'" in out.stderr and "Traceback" not in out.stderr
    out = _run("describe", "scheme", "afine")
    assert out.returncode == 2 and "did you mean 'affine'" in out.stderr


@pytest.mark.slow
def test_minilm_example_recipe(tmp_path):
    out = _run("quantize", str(ROOT / "examples/recipes/minilm_int4.yaml"), "--output", str(tmp_path / "m.pt"))
    assert out.returncode == 0, out.stderr
    assert "37 layers quantized" in out.stdout
    cosine = float(out.stdout.split("mean ")[1].split(",")[0])
    assert cosine > 0.9
