"""Exporter ``coreml``: stored codes equal quanta's, numerics via the reference runner, targets, traps."""

from __future__ import annotations

import itertools
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import quanta

ct = pytest.importorskip("coremltools")

from quanta.plugins.coreml import exporter as exporter_module  # noqa: E402
from quanta.plugins.coreml import targets  # noqa: E402
from quanta.plugins.coreml.exporter import CoreMLExporter, check_stored_codes, stored_weights  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
FP16_TOL = 2e-3  # relative to the output range: fp16 activations through a few layers


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 64), nn.ReLU(),
                         nn.Linear(64, 10)).eval()


X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _quantize(model, dtype, scheme, granularity, block_size=16):
    g = {"dtype": dtype, "scheme": scheme, "granularity": granularity}
    if granularity == "per_block":
        g["block_size"] = block_size
    return quanta.quantize(model, {"global_config": g, "on_unsupported_layer": "skip"})


def _assert_codes_equal(path, qmodel):
    from quanta.mil.blobs import read_constexpr_weights

    stored = stored_weights(path)
    # The exporter's read-back (spec + blobs only) reads what the full program loader reads.
    direct = read_constexpr_weights(path)
    assert direct.keys() == stored.keys()
    for key, entry in direct.items():
        full = stored[key]
        for field in ("op_type", "op_name", "shape", "dtype", "axis", "block_size"):
            assert getattr(entry, field) == getattr(full, field), (key, field)
        for field in ("data", "scale", "zero_point"):
            a, b = getattr(entry, field), getattr(full, field)
            assert (a is None) == (b is None) and (a is None or (a.dtype == b.dtype and np.array_equal(a, b))), (key, field)
    matched = check_stored_codes(path, quanta.records(qmodel))
    for name, rec in quanta.records(qmodel).items():
        entry = stored[matched[name]]
        assert np.array_equal(entry.data.astype(np.int16), rec.codes.numpy().astype(np.int16)), name
        assert entry.dtype.endswith(f"int{rec.spec.dtype.bits}")


@pytest.mark.parametrize("dtype,scheme,granularity", list(itertools.product(
    ["int8", "uint8", "int4", "uint4"], ["symmetric", "affine"], ["per_channel", "per_block", "per_tensor"])))
def test_export_stores_quanta_codes_and_runs_within_fp16(tmp_path, dtype, scheme, granularity):
    q = _quantize(_cnn(), dtype, scheme, granularity)
    path = quanta.export(q, tmp_path / "m.mlpackage", format="coreml", example_inputs=X)
    _assert_codes_equal(path, q)
    figures = quanta.verify(path, q, X)
    assert figures["max_rel"] < FP16_TOL and figures["cosine"] > 0.9999
    spec = ct.models.MLModel(path, skip_model_load=True).get_spec()
    needs18 = dtype.endswith("4") or granularity == "per_block"
    assert spec.specificationVersion == (9 if needs18 else 7)  # lowest target that fits


def test_verify_draws_inputs_when_none_given(tmp_path):
    q = _quantize(_cnn(), "int8", "symmetric", "per_channel")
    path = quanta.export(q, tmp_path / "m", example_inputs=X)
    assert path.endswith(".mlpackage")
    assert quanta.verify(path, q)["max_rel"] < FP16_TOL
    assert quanta.verify(path, _cnn())["max_rel"] > quanta.verify(path, q)["max_rel"]


def test_target_too_low_names_layer_and_minimum(tmp_path):
    q = _quantize(_cnn(), "int4", "symmetric", "per_channel")
    with pytest.raises(quanta.ConfigError, match=r"iOS17.*too low.*layer '0.weight'.*iOS18"):
        quanta.export(q, tmp_path / "m.mlpackage", example_inputs=X, minimum_deployment_target="iOS17")
    assert not os.path.exists(tmp_path / "m.mlpackage")
    q8 = _quantize(_cnn(), "int8", "symmetric", "per_block")
    with pytest.raises(quanta.ConfigError, match="per_block"):
        quanta.export(q8, tmp_path / "m.mlpackage", example_inputs=X, minimum_deployment_target=ct.target.iOS16)


def test_explicit_higher_target_and_bad_options(tmp_path):
    q = _quantize(_cnn(), "int8", "symmetric", "per_channel")
    path = quanta.export(q, tmp_path / "m.mlpackage", example_inputs=X, minimum_deployment_target="macOS15")
    assert ct.models.MLModel(path, skip_model_load=True).get_spec().specificationVersion == 9
    _assert_codes_equal(path, q)
    with pytest.raises(quanta.ConfigError, match="minimum_deployment_target"):
        quanta.export(q, tmp_path / "x.mlpackage", example_inputs=X, minimum_deployment_target="iOS99")
    with pytest.raises(quanta.ConfigError, match="compute_precision"):
        quanta.export(q, tmp_path / "x.mlpackage", example_inputs=X, compute_precision="bf16")
    with pytest.raises(quanta.ConfigError, match="example_inputs"):
        quanta.export(q, tmp_path / "x.mlpackage")
    with pytest.raises(quanta.ConfigError, match="unknown option .bogus. for exporter .coreml."):
        quanta.export(q, tmp_path / "x.mlpackage", example_inputs=X, bogus=1)
    with pytest.raises(quanta.ConfigError, match="4- or 8-bit"):
        quanta.export(_quantize(_cnn(), "int3", "symmetric", "per_channel"), tmp_path / "x", example_inputs=X)


def test_float32_precision_stores_fp32_scales(tmp_path):
    q = _quantize(_cnn(), "int8", "affine", "per_channel")
    path = quanta.export(q, tmp_path / "m.mlpackage", example_inputs=X, compute_precision="float32")
    _assert_codes_equal(path, q)
    for entry in stored_weights(path).values():
        assert entry.scale.dtype == np.float32
    assert quanta.verify(path, q, X)["max_rel"] < 1e-5


def test_mismatching_codes_are_refused_and_nothing_is_left(tmp_path, monkeypatch):
    q = _quantize(_cnn(), "int8", "symmetric", "per_channel")
    rec = quanta.records(q)["3.weight"]
    real = exporter_module.check_stored_codes

    def tampered(path, recs, aliases=None):
        codes = rec.codes.clone()
        codes[0, 0] = codes[0, 0] + 1 if codes[0, 0] < 127 else codes[0, 0] - 1
        import attrs
        return real(path, {**recs, "3.weight": attrs.evolve(rec, codes=codes)}, aliases)

    monkeypatch.setattr(exporter_module, "check_stored_codes", tampered)
    with pytest.raises(quanta.QuantizationError, match=r"'3.weight'.*differ"):
        quanta.export(q, tmp_path / "m.mlpackage", example_inputs=X)
    assert not os.path.exists(tmp_path / "m.mlpackage")


def test_numpy_24_guard(monkeypatch, tmp_path):
    with pytest.raises(targets.CoreMLEnvironmentError, match="numpy<2.4"):
        targets.check_environment(numpy_version="2.4.0", coremltools_version="9.0")
    targets.check_environment(numpy_version="2.3.5", coremltools_version="9.0")
    targets.check_environment(numpy_version="2.4.1", coremltools_version="9.1")
    monkeypatch.setattr(np, "__version__", "2.4.0")
    monkeypatch.setattr(ct, "__version__", "9.0")
    q = _quantize(_cnn(), "int8", "symmetric", "per_channel")
    with pytest.raises(targets.CoreMLEnvironmentError, match="2633"):
        quanta.export(q, tmp_path / "m.mlpackage", example_inputs=X)


def _fq(x, scale, zp=0):
    return torch.quantize_per_tensor(x, scale, zp, torch.qint8).dequantize()


class _W8A8(nn.Module):
    """A finalized W8A8 CNN: avgpool -> flatten -> fc with a different scale on each side of the reshape."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = _fq(x, 0.03)
        x = _fq(torch.relu(self.conv(x)), 0.02)
        x = _fq(nn.functional.adaptive_avg_pool2d(x, 1), 0.004)
        x = _fq(torch.flatten(x, 1), 0.01)
        return _fq(self.fc(x), 0.003)


def test_w8a8_reshape_trap_is_guarded(tmp_path, monkeypatch):
    torch.manual_seed(0)
    q = quanta.quantize(_W8A8().eval(), {"global_config": {"dtype": "int8"}})
    ex = CoreMLExporter()
    path = ex.export(q, tmp_path / "good.mlpackage", example_inputs=X)
    spec = ct.models.MLModel(path, skip_model_load=True).get_spec()
    assert spec.specificationVersion == 8  # activation quantization -> iOS17
    ops = {op.type for op in spec.mlProgram.functions["main"].block_specializations.values().__iter__().__next__().operations}
    assert {"quantize", "dequantize"} <= ops
    _assert_codes_equal(path, q)
    good = quanta.verify(path, q, X)["max_abs"]
    assert good <= 0.003 * 1.01 + 1e-4  # at most one output quantization step (fp16 rounding)
    # The check above is what catches the trap: with coremltools' pass left in, it fails.
    monkeypatch.setattr(exporter_module, "UNSAFE_PASSES", ())
    bad_path = ex.export(q, tmp_path / "bad.mlpackage", example_inputs=X)
    assert quanta.verify(bad_path, q, X)["max_abs"] > 10 * good


def test_activation_quantization_needs_ios17(tmp_path):
    q = quanta.quantize(_W8A8().eval(), {"global_config": {"dtype": "int8"}})
    with pytest.raises(quanta.ConfigError, match="activation quantization.*iOS17"):
        quanta.export(q, tmp_path / "m.mlpackage", example_inputs=X, minimum_deployment_target="iOS16")


def test_annotate_then_plain_ct_convert_keeps_compressed_weights(tmp_path):
    q = _quantize(_cnn(), "int8", "affine", "per_channel")
    annotated = CoreMLExporter().annotate(q)
    assert annotated is q
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlmodel = ct.convert(torch.jit.trace(q, X), inputs=[ct.TensorType(shape=X.shape)],
                             minimum_deployment_target=ct.target.iOS17)
    path = str(tmp_path / "plain.mlpackage")
    mlmodel.save(path)
    _assert_codes_equal(path, q)
    q.forward(X)  # the annotated model still runs in torch


def test_size_4096_int4_per_block_32_within_2_percent(tmp_path):
    layer = nn.Linear(4096, 4096, bias=False)
    q = quanta.quantize(layer, {"global_config": {"dtype": "int4", "granularity": "per_block", "block_size": 32}},
                        inplace=True)
    path = quanta.export(q, tmp_path / "big.mlpackage", example_inputs=torch.randn(1, 4096))
    size = os.path.getsize(os.path.join(path, "Data", "com.apple.CoreML", "weights", "weight.bin"))
    ideal = 4096 * 4096 * 4 // 8 + (4096 * 4096 // 32) * 2  # codes + fp16 scales, no zero points
    assert size <= ideal * 1.02, (size, ideal)
    assert size >= ideal


def test_coremltools_progress_bars_hidden_unless_verbose(tmp_path, capfd):
    q = quanta.quantize(nn.Sequential(nn.Linear(32, 32)), {"global_config": {"dtype": "int8"}})
    x = torch.randn(1, 32)
    quanta.export(q, tmp_path / "quiet.mlpackage", example_inputs=(x,))
    assert "Running MIL" not in capfd.readouterr().err
    quanta.export(q, tmp_path / "loud.mlpackage", example_inputs=(x,), verbose=True)
    assert "Running MIL" in capfd.readouterr().err


def _files_and_times(root):
    """Every file and folder under ``root``: bytes (files) and every timestamp os.stat gives."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files, ""]:
            path = os.path.join(folder, name) if name else folder
            st = os.stat(path)
            data = open(path, "rb").read() if os.path.isfile(path) else None
            out[os.path.relpath(path, root)] = (data, st.st_mode, st.st_mtime_ns, st.st_ctime_ns)
    return out


def test_verify_opens_the_package_read_only(tmp_path):
    """quanta.verify and `quanta verify` leave every file of a read-only package as it was: bytes, mode,
    mtime and ctime (coremltools' package reader rewrites Manifest.json; putting it back changes ctime)."""
    import subprocess
    import sys

    q = _quantize(_cnn(), "int8", "symmetric", "per_channel")
    path = quanta.export(q, tmp_path / "m.mlpackage", format="coreml", example_inputs=X)
    saved = quanta.save(q, tmp_path / "saved", example_inputs=(X,))
    subprocess.run(["chmod", "-R", "a-w", path], check=True)
    try:
        before = _files_and_times(path)
        assert quanta.verify(path, q, X)["passed"]
        (tmp_path / "cnn.py").write_text("import torch\nfrom torch import nn\n\n\ndef build():\n"
                                         "    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), "
                                         "nn.Linear(576, 64), nn.ReLU(), nn.Linear(64, 10))\n")
        out = subprocess.run([sys.executable, "-m", "quanta._cli", "verify", str(path), "--against", str(saved),
                              "--factory", f"{tmp_path / 'cnn.py'}:build"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        assert _files_and_times(path) == before
    finally:
        subprocess.run(["chmod", "-R", "u+w", path], check=True)


def test_export_leaves_every_tensor_of_the_model_as_it_was(tmp_path):
    # The exporter's working copy shares the float tensors and copies the quantized ones, which it
    # overwrites with the records' values: the user's model keeps its own (here a stale weight).
    qmodel = _quantize(_cnn(), "int8", "symmetric", "per_channel")
    with torch.no_grad():
        qmodel[3].weight.add_(1e-3)
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    quanta.export(qmodel, tmp_path / "m.mlpackage", example_inputs=X)
    after = qmodel.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(k.startswith("_COREML_") or "/_COREML_" in k for k in after)


class _TiedHead(nn.Module):
    """A language-model shape: the head shares the embedding's weight (tie_word_embeddings)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.emb(ids))))


def test_a_quantized_head_tied_to_a_float_embedding_is_stored_once_compressed(tmp_path):
    """The tied weight is one constant in the program, named after the embedding (the converter
    meets it there first): it is stored compressed with the head's codes, and both ops use it."""
    torch.manual_seed(0)
    q = quanta.quantize(_TiedHead().eval(), {"global_config": {"dtype": "int8"}})
    assert q.head.weight is q.emb.weight and "head.weight" in quanta.records(q)
    ids = torch.randint(0, 64, (1, 8))
    out = quanta.export(q, tmp_path / "tied.mlpackage", example_inputs=(ids,))
    stored = stored_weights(out)
    assert sorted(stored) == ["model_emb_weight_cast_fp16", "model_mid_weight_cast_fp16"]  # no float copy
    codes = quanta.records(q)["head.weight"].codes
    assert np.array_equal(np.asarray(stored["model_emb_weight_cast_fp16"].data), codes.numpy())
    assert quanta.verify(out, q, example_inputs=(ids,))["passed"]
