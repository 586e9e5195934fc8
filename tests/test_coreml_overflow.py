"""fp16 overflow in an exported program: found on the example inputs, exported in float32
(``compute_precision: auto``) or refused (``float16``), never reported verified below tolerance."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import quanta
from quanta.errors import ConfigError

pytest.importorskip("coremltools")

MODEL_SOURCE = '''
import torch
from torch import nn


class LargeActivations(nn.Module):
    """An RMSNorm of activations in the thousands: its x ** 2 exceeds fp16's 65504."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 16)
        with torch.no_grad():
            self.fc1.weight.mul_(2000)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))


def build():
    return LargeActivations().eval()


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 32, generator=g) for _ in range(2)]
'''


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    (folder / "big_model.py").write_text(MODEL_SOURCE)
    namespace: dict = {}
    exec(compile(MODEL_SOURCE, str(folder / "big_model.py"), "exec"), namespace)
    qmodel = quanta.quantize(namespace["build"](), {"algorithm": "rtn", "global_config": {"dtype": "int8"}})
    return folder, qmodel, (namespace["batches"]()[0],)


def _float32_ops(path) -> list[str]:
    """Types of the ops of a saved program that compute in float32 (casts and constants aside)."""
    from coremltools.converters.mil.mil import types

    from quanta.mil.program import load_program

    ops = load_program(str(path)).functions["main"].operations
    return sorted(op.op_type for op in ops if op.op_type not in ("const", "cast") and op.outputs
                  and op.outputs[0].dtype == types.fp32)


@pytest.mark.slow
def test_overflow_keeps_only_the_overflowing_ops_in_float32_and_is_refused_in_float16(big, tmp_path):
    _, qmodel, x = big
    with pytest.warns(UserWarning, match=r"float16 program overflows .* \(pow\).*: these 4 ops compute in float32 \(pow"):
        path = quanta.export(qmodel, tmp_path / "auto.mlpackage", example_inputs=x)
    # x ** 2 overflows; its mean, + eps and rsqrt read the overflowing values: those four in fp32,
    # the two linear layers and the scaling mul in fp16.
    assert _float32_ops(path) == ["add", "pow", "reduce_mean", "rsqrt"]
    figures = quanta.verify(path, qmodel, x)
    assert figures["within_tolerance"] and figures["cosine"] > 0.9999, figures
    with pytest.raises(ConfigError, match=r"compute_precision: auto") as err:
        quanta.export(qmodel, tmp_path / "fp16.mlpackage", example_inputs=x, compute_precision="float16")
    assert err.value.key == "compute_precision" and not (tmp_path / "fp16.mlpackage").exists()


def test_tolerance_is_documented_and_checked():
    from quanta.plugins.coreml.verify import MIN_COSINE, within_tolerance

    ok = {"max_abs": 0.001, "max_rel": 0.001}
    assert within_tolerance({**ok, "cosine": MIN_COSINE}) and not within_tolerance({**ok, "cosine": 0.850358})
    assert not within_tolerance({**ok, "cosine": float("nan")})
    assert not within_tolerance({"max_abs": 0.5, "max_rel": 0.5, "cosine": 0.999})  # quanta verify's max_rel rule
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "coreml.md")).read()
    assert f"cosine >= {MIN_COSINE}" in doc


@pytest.mark.slow
def test_cli_never_calls_an_overflowing_package_verified(big, tmp_path):
    folder, _, _ = big
    recipe = tmp_path / "big.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        model: {folder / 'big_model.py'}:build
        data: {{factory: {folder / 'big_model.py'}:batches}}
        algorithm: rtn
        global_config: {{dtype: int8}}
        export: {{format: coreml}}
        """))
    out = subprocess.run([sys.executable, "-m", "quanta._cli", "quantize", str(recipe)], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "overflows" in out.stderr and "compute in float32" in out.stderr
    verified = re.search(r"verified .* cosine (\S+) \(tolerance: cosine >= ([\d.]+)", out.stdout)
    assert verified and float(verified[1]) >= float(verified[2]), out.stdout
    # The size lines count the whole model as stored: the sum of the files written (issue 20).
    written = re.findall(r"wrote (\S+?)(?: \(\S+ s\))?: ([\d.]+) KiB on disk: quantized weights", out.stderr)
    assert len(written) == 2, out.stderr
    for path, kib in written:
        total = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(tmp_path / path) for f in files)
        assert float(kib) == round(total / 2**10, 1), (path, kib, total)
