"""The bad-input table: every case fails with a clear error before any work, and changes nothing.

Each case is a function of an :class:`Env` (a small torch model, its quantized copy, a real
``.mlpackage``, model files, a user's own files and folder, all under ``tmp_path``). The test
asserts the error class, that the message names the cause (a pattern), that neither model's
tensors changed, and that every file under ``tmp_path`` is byte for byte as before (and no file
was added). CLI cases run ``quanta._cli.main`` in-process and expect exit status 2 and one line
``quanta: error: ...`` (argparse's own usage line for usage errors).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import quanta
from quanta import registry
from quanta.errors import (
    ConfigError,
    CoreMLPackageError,
    DataError,
    DestinationError,
    DestinationExistsError,
    DeviceError,
    ExampleInputError,
    ModelError,
    NotQuantizedError,
    PluginNotFoundError,
    QuantizationError,
)

WEIGHTS = "Data/com.apple.CoreML/weights/weight.bin"
SPEC = "Data/com.apple.CoreML/model.mlmodel"


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A quantized model and a real exported package, built once for the module."""
    root = tmp_path_factory.mktemp("built")
    model = _net()
    qmodel = quanta.quantize(model, {"global_config": {"dtype": "int8"}})
    package = quanta.export(qmodel, root / "good.mlpackage", example_inputs=torch.randn(1, 16))
    return model, qmodel, Path(package)


class Env:
    """What a case works on; everything lives under ``root`` (= tmp_path)."""

    def __init__(self, root: Path, built):
        model, qmodel, package = built
        self.root = root
        self.model = copy.deepcopy(model)
        self.qmodel = copy.deepcopy(qmodel)
        self.pkg = root / "model.mlpackage"
        shutil.copytree(package, self.pkg)
        self.model_file = root / "float.pt"
        torch.save(self.model, self.model_file)
        self.user_dir = root / "mine.mlpackage"
        self.user_dir.mkdir()
        (self.user_dir / "notes.txt").write_text("my notes")
        self.user_file = root / "mine.pt"
        self.user_file.write_bytes(b"my own bytes")
        (root / "netdef.py").write_text(NETDEF)  # the CLI's models: 'file.py:function' or saved directories
        self.model_ref = f"{root / 'netdef.py'}:build"
        self.saved = quanta.save(self.model, root / "float_saved", rebuild={"factory": self.model_ref})
        self.qsaved = quanta.save(self.qmodel, root / "quantized", rebuild={"factory": self.model_ref},
                                  example_inputs=torch.randn(1, 16))
        self.recipe = root / "recipe.yaml"
        self.recipe.write_text(f"model: {self.model_ref}\nglobal_config: {{dtype: int8}}\n")
        self.x = torch.randn(1, 16)
        self.good = [torch.randn(4, 16) for _ in range(3)]
        self.made: list[Path] = []  # inputs a case builds (not outputs): excluded from the "added" check

    def make(self, path: Path) -> Path:
        self.made.append(path)
        return path

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.make(self.root / name)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    def damaged(self, how) -> Path:
        """A copy of the good package damaged by ``how(path)``."""
        path = self.make(self.root / "damaged.mlpackage")
        shutil.copytree(self.pkg, path)
        how(path)
        return path


NETDEF = """import torch


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


def build_dict():
    return {"weight": torch.zeros(2, 2)}


def build_fails():
    raise RuntimeError("no weights here")
"""


class CLIExit(Exception):
    """A CLI case's non-zero exit: ``status`` and its stderr."""

    def __init__(self, status: int, stderr: str):
        self.status, self.stderr = status, stderr
        super().__init__(stderr)


def cli(env: Env, *args: str) -> None:
    from quanta._cli import main

    err, out = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(env.root)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                status = main([str(a) for a in args])
            except SystemExit as exc:  # argparse usage errors
                status = exc.code
    finally:
        os.chdir(cwd)
    if status:
        raise CLIExit(status, err.getvalue())


def gptq(env, data, **options):
    return quanta.quantize(env.model, {"algorithm": "gptq", "global_config": {"dtype": "int8"}, **options}, data=data)


def truncate(rel: str, size: int):
    def how(path: Path):
        with open(path / rel, "r+b") as fh:
            fh.truncate(size)
    return how


def edit_manifest(change):
    def how(path: Path):
        data = json.loads((path / "Manifest.json").read_text())
        change(data)
        (path / "Manifest.json").write_text(json.dumps(data))
    return how


def _failed_plugin(env, monkeypatch) -> None:
    """A real entry point (a dist-info on sys.path) whose module does not exist."""
    dist = env.make(env.root / "site") / "quanta_failing-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: quanta-failing\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[quanta]\nfailing = quanta_failing_module_that_is_missing\n")
    monkeypatch.syspath_prepend(str(env.root / "site"))
    registry.reset()


def _bad_loader(env):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.full((8, 16), float("nan"))),
                                         batch_size=4)
    return gptq(env, [b for (b,) in loader])


def _nan_weights(env):
    with torch.no_grad():
        env.model[0].weight[0, 0] = float("nan")
    before = copy.deepcopy(env.model.state_dict())
    try:
        quanta.quantize(env.model, {"global_config": {"dtype": "int8"}})
    finally:
        after = env.model.state_dict()
        assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).any() for k in before)


def _meta_model(env):
    with torch.device("meta"):
        model = _net()
    return quanta.quantize(model, {})


_NO_CUDA = not torch.cuda.is_available()

# (id, action, error class, pattern the message must match)
CASES = [
    # -- calibration data (API) --
    # a bare tensor (or dict) is one batch, never split into rows: a wrong one is named batch 0
    ("data-bare-tensor-wrong-shape", lambda e: gptq(e, torch.randn(8, 99)), DataError,
     r"calibration batch 0 \(a tensor of dtype float32 and shape \(8, 99\)\) does not fit"),
    ("data-bare-numpy", lambda e: gptq(e, np.zeros((8, 16), np.float32)), DataError,
     r"bare numpy ndarray of shape \(8, 16\).*torch.from_numpy"),
    ("data-single-dict-wrong-key", lambda e: gptq(e, {"x": torch.randn(1, 16)}), DataError,
     r"calibration batch 0 \(keys x: float32 \(1, 16\)\) does not fit"),
    ("data-string", lambda e: gptq(e, "batches.pt"), DataError, r"calibration data is a str"),
    ("data-not-iterable", lambda e: gptq(e, 42), ConfigError, r"must be an iterable of batches.*got int"),
    ("data-bytes", lambda e: gptq(e, b"\x00" * 16), DataError, r"calibration data is a bytes"),
    ("data-empty-list", lambda e: gptq(e, []), ConfigError, r"calibration data is empty"),
    ("data-empty-generator", lambda e: gptq(e, iter([])), ConfigError, r"calibration data is empty"),
    ("data-missing", lambda e: gptq(e, None), ConfigError, r"needs calibration data"),
    ("batch-wrong-shape", lambda e: gptq(e, [torch.randn(4, 99)]), DataError,
     r"calibration batch 0 \(a tensor of dtype float32 and shape \(4, 99\)\) does not fit the model.*first layer '0'"),
    ("batch-int-dtype", lambda e: gptq(e, [torch.randint(0, 5, (4, 16))]), DataError,
     r"calibration batch 0 \(a tensor of dtype int64.*does not fit"),
    ("batch-nan-in-batch-2", lambda e: gptq(e, e.good[:2] + [torch.full((4, 16), float("nan"))]), DataError,
     r"calibration batch 2 holds 64 NaN or inf"),
    ("batch-inf-in-batch-0", lambda e: gptq(e, [torch.full((4, 16), float("inf"))]), DataError,
     r"calibration batch 0 holds"),
    ("batch-nan-generator", lambda e: gptq(e, (t for t in [torch.full((4, 16), float("nan"))])), DataError,
     r"calibration batch 0 holds"),
    ("batch-nan-from-loader", _bad_loader, DataError, r"calibration batch 0 holds"),
    ("batch-numpy", lambda e: gptq(e, [np.zeros((4, 16), np.float32)]), DataError,
     r"batch 0 is a ndarray.*torch.from_numpy"),
    ("batch-python-list-input", lambda e: gptq(e, [([0.0] * 16,)]), DataError, r"batch 0 input 0 is a list.*torch.tensor"),
    ("batch-empty-tuple", lambda e: gptq(e, [()]), DataError, r"batch 0 is an empty tuple"),
    ("batch-dict-int-key", lambda e: gptq(e, [{0: torch.randn(4, 16)}]), DataError, r"non-string key 0"),
    ("batch-dtype-changes", lambda e: gptq(e, [torch.randn(4, 16), torch.randn(4, 16).double()]), DataError,
     r"calibration batch 1 .*float64.*differs from batch 0"),
    ("batch-rank-changes", lambda e: gptq(e, [torch.randn(4, 16), torch.randn(2, 4, 16)]), DataError,
     r"calibration batch 1 .*rank 3.*differs from batch 0"),
    ("batch-dict-for-positional-model", lambda e: gptq(e, [{"x": torch.randn(4, 16)}]), DataError,
     r"calibration batch 0 \(keys x: float32 \(4, 16\)\) does not fit"),
    ("batch-too-many-inputs", lambda e: gptq(e, [(torch.randn(4, 16), torch.randn(4, 16))]), DataError,
     r"calibration batch 0 \(2 inputs.*does not fit"),
    ("calibrate-bare-numpy", lambda e: quanta.quantize(e.model, {"algorithm": "calibrate"},
                                                      data=np.zeros((8, 16), np.float32)), DataError, r"bare numpy"),
    ("calibrate-wrong-shape", lambda e: quanta.quantize(e.model, {"algorithm": "calibrate"}, data=[torch.randn(2, 5)]),
     DataError, r"calibration batch 0 .*does not fit"),
    ("compat-gptq-bare-tensor", lambda e: __import__("quanta.compat", fromlist=["x"]).LayerwiseCompressor(
        e.model, {"global_config": {"weight_dtype": "int8"}}).compress(np.zeros((8, 16))), DataError, r"bare numpy"),
    # -- devices and the model (API) --
    ("device-cuda-without-cuda", lambda e: quanta.quantize(e.model, {}, device="cuda"), DeviceError,
     r"device 'cuda' asked for, but .*use device='cpu'"),
    ("device-gpu-index-past-last", lambda e: quanta.quantize(e.model, {}, device="cuda:97"), DeviceError,
     r"device 'cuda:97' asked for"),
    ("device-unknown-string", lambda e: quanta.quantize(e.model, {}, device="tpu"), DeviceError,
     r"device 'tpu' is not a torch device"),
    ("device-mps-on-linux", lambda e: quanta.quantize(e.model, {}, device="mps"), DeviceError, r"Metal \(MPS\)"),
    ("device-meta", lambda e: quanta.quantize(e.model, {}, device="meta"), DeviceError, r"not supported"),
    ("device-in-gptq-config", lambda e: gptq(e, e.good, device="cuda:97"), DeviceError, r"cuda:97"),
    ("model-on-meta-device", _meta_model, ModelError, r"'meta' device.*streaming.*not yet supported"),
    ("model-nothing-to-quantize", lambda e: quanta.quantize(torch.nn.Sequential(torch.nn.ReLU()), {"algorithm": "gptq"},
                                                           data=[torch.randn(1, 4)]),
     ModelError, r"has no weight the 'torch' backend can quantize"),
    ("model-missing-path", lambda e: quanta.quantize(str(e.root / "nope.mlpackage"), {}), ModelError,
     r"no file or folder at"),
    ("model-path-to-pt-file", lambda e: quanta.quantize(str(e.model_file), {}), ModelError,
     r"is a file.*torch.load"),
    ("model-an-int", lambda e: quanta.quantize(42, {}), ConfigError, r"no backend accepts a builtins.int"),
    ("model-nan-weight", _nan_weights, QuantizationError, r"layer '0'.*(NaN|finite)"),
    # -- recipes --
    ("yaml-duplicate-top-key", lambda e: quanta.load_recipe(e.write("r.yaml", "algorithm: rtn\nalgorithm: gptq\n")),
     ConfigError, r"line 2.*duplicate key 'algorithm' \(first set on line 1\)"),
    ("yaml-duplicate-nested-key", lambda e: quanta.load_recipe(
        e.write("r.yaml", "global_config:\n  dtype: int8\n  dtype: int4\n")), ConfigError, r"duplicate key 'dtype'"),
    ("yaml-syntax-error", lambda e: quanta.load_recipe(e.write("r.yaml", "global_config: [dtype: int8\n")),
     ConfigError, r"r.yaml' line \d+, column \d+"),
    ("yaml-tab-indent", lambda e: quanta.load_recipe(e.write("r.yaml", "global_config:\n\tdtype: int8\n")),
     ConfigError, r"r.yaml' line 2"),
    ("yaml-top-level-list", lambda e: quanta.load_recipe(e.write("r.yaml", "- rtn\n- gptq\n")), ConfigError,
     r"must be a mapping.*got a list"),
    ("yaml-top-level-scalar", lambda e: quanta.load_recipe(e.write("r.yaml", "rtn\n")), ConfigError,
     r"must be a mapping.*got a str"),
    ("yaml-not-utf8", lambda e: quanta.load_recipe(e.write("r.yaml", b"algorithm: \xff\xfe\n")), ConfigError,
     r"not UTF-8"),
    ("recipe-missing-file", lambda e: quanta.load_recipe(e.root / "nope.yaml"), ConfigError, r"nope.yaml' is missing"),
    ("recipe-is-a-folder", lambda e: quanta.load_recipe(e.root), ConfigError, r"is a folder"),
    ("recipe-an-int", lambda e: quanta.load_recipe(42), ConfigError, r"cannot read a recipe from int"),
    ("recipe-unknown-key", lambda e: quanta.quantize(e.model, {"algoritm": "rtn"}), ConfigError,
     r"did you mean 'algorithm'"),
    ("recipe-unknown-algorithm", lambda e: quanta.quantize(e.model, {"algorithm": "gtpq"}), ConfigError,
     r"no algorithm plugin named 'gtpq'"),
    ("recipe-bad-dtype", lambda e: quanta.quantize(e.model, {"global_config": {"dtype": "int9"}}), ConfigError,
     r"unknown dtype 'int9'"),
    ("recipe-block-without-size", lambda e: quanta.quantize(e.model, {"global_config": {"granularity": "per_block"}}),
     ConfigError, r"needs a block_size"),
    ("recipe-scheme-typo", lambda e: quanta.quantize(e.model, {"global_config": {"scheme": "symetric"}}), ConfigError,
     r"did you mean 'symmetric'"),
    ("recipe-unknown-export-format", lambda e: quanta.quantize(e.model, {"export": {"format": "onnx"}}), ConfigError,
     r"no exporter plugin named 'onnx'"),
    ("recipe-block-does-not-divide", lambda e: quanta.quantize(
        e.model, {"global_config": {"granularity": "per_block", "block_size": 5}}), QuantizationError,
     r"block_size 5 does not divide"),
    ("recipe-nsamples-zero", lambda e: gptq(e, e.good, calibration_nsamples=0), ConfigError,
     r"calibration_nsamples.*positive"),
    ("compat-ptq-from-yaml-list", lambda e: __import__("quanta.compat", fromlist=["x"]).PostTrainingQuantizerConfig
     .from_yaml(e.write("c.yaml", "- a\n")), ConfigError, r"PostTrainingQuantizerConfig file.*must be a mapping.*list"),
    ("compat-gptq-from-yaml-list", lambda e: __import__("quanta.compat", fromlist=["x"]).LayerwiseCompressorConfig
     .from_yaml(e.write("c.yaml", "- a\n")), ConfigError, r"LayerwiseCompressorConfig file.*must be a mapping"),
    ("compat-qat-from-yaml-list", lambda e: __import__("quanta.compat", fromlist=["x"]).LinearQuantizerConfig
     .from_yaml(e.write("c.yaml", "- a\n")), ConfigError, r"LinearQuantizerConfig file.*must be a mapping"),
    ("compat-ptq-from-dict-list", lambda e: __import__("quanta.compat", fromlist=["x"]).PostTrainingQuantizerConfig
     .from_dict([("global_config", None)]), ConfigError, r"must be a mapping.*got a list"),
    ("compat-gptq-from-dict-str", lambda e: __import__("quanta.compat", fromlist=["x"]).LayerwiseCompressorConfig
     .from_dict("int8"), ConfigError, r"must be a mapping.*got a str"),
    ("compat-from-yaml-duplicate-key", lambda e: __import__("quanta.compat", fromlist=["x"]).PostTrainingQuantizerConfig
     .from_yaml(e.write("c.yaml", "global_config: {}\nglobal_config: {}\n")), ConfigError, r"duplicate key"),
    ("compat-from-yaml-missing", lambda e: __import__("quanta.compat", fromlist=["x"]).PostTrainingQuantizerConfig
     .from_yaml(e.root / "none.yaml"), ConfigError, r"none.yaml' is missing"),
    # -- export (API) --
    ("export-never-quantized", lambda e: quanta.export(e.model, e.root / "f.mlpackage", example_inputs=e.x),
     NotQuantizedError, r"never quantized.*allow_float=True"),
    ("export-example-wrong-shape", lambda e: quanta.export(e.qmodel, e.root / "q.mlpackage",
                                                          example_inputs=torch.randn(1, 99)), ExampleInputError,
     r"the example input \(a tensor of dtype float32 and shape \(1, 99\)\) does not fit"),
    ("export-example-numpy", lambda e: quanta.export(e.qmodel, e.root / "q.mlpackage", example_inputs=(np.zeros((1, 16)),)),
     ExampleInputError, r"example input 0 is a ndarray.*torch.from_numpy"),
    ("export-example-nan", lambda e: quanta.export(e.qmodel, e.root / "q.mlpackage",
                                                  example_inputs=torch.full((1, 16), float("nan"))),
     ExampleInputError, r"example input 0 .*NaN"),
    ("export-example-dict-wrong-name", lambda e: quanta.export(e.qmodel, e.root / "q.mlpackage",
                                                              example_inputs={"x": e.x}),
     ExampleInputError, r"the example input \(keys x: float32 \(1, 16\)\) does not fit.*unexpected keyword"),
    ("export-example-a-string", lambda e: quanta.export(e.qmodel, e.root / "q.mlpackage", example_inputs="1,16"),
     ExampleInputError, r"the example input is a str"),
    ("export-example-int-dtype", lambda e: quanta.export(e.qmodel, e.root / "q.mlpackage",
                                                        example_inputs=torch.ones(1, 16, dtype=torch.long)),
     ExampleInputError, r"example input .*int64.*does not fit"),
    ("export-example-missing", lambda e: quanta.export(e.qmodel, e.root / "q.mlpackage"), ConfigError,
     r"pass example_inputs"),
    ("export-onto-users-folder", lambda e: quanta.export(e.qmodel, e.user_dir, example_inputs=e.x),
     DestinationExistsError, r"mine.mlpackage' already exists and was not written by quanta.*overwrite=True"),
    ("export-onto-a-file", lambda e: quanta.export(e.qmodel, e.write("f.mlpackage", "x"), example_inputs=e.x),
     DestinationError, r"exists and is not a directory"),
    ("export-under-a-file", lambda e: quanta.export(e.qmodel, e.user_file / "q.mlpackage", example_inputs=e.x),
     DestinationError, r"cannot create the folder"),
    ("export-unknown-format", lambda e: quanta.export(e.qmodel, e.root / "q.onnx", format="onnx"),
     ConfigError, r"format: no exporter plugin named 'onnx'"),
    ("export-unknown-option", lambda e: quanta.export(e.qmodel, e.root / "q.mlpackage", example_inputs=e.x,
                                                     precision="fp16"), ConfigError,
     r"unknown option 'precision' for exporter 'coreml'; did you mean 'compute_precision'"),
    ("export-target-too-old", lambda e: quanta.export(e.qmodel, e.root / "q.mlpackage", example_inputs=e.x,
                                                     minimum_deployment_target="iOS15"), ConfigError, r"iOS15"),
    ("export-bad-precision", lambda e: quanta.export(e.qmodel, e.root / "q.mlpackage", example_inputs=e.x,
                                                    compute_precision="int8"), ConfigError, r"float16, float32"),
    ("verify-no-exporter-for-path", lambda e: quanta.verify(e.root / "model.onnx", e.qmodel), ConfigError,
     r"no exporter writes files like"),
    # -- Core ML files --
    ("coreml-empty-folder", lambda e: quanta.quantize(str(_mkdir(e.root / "empty.mlpackage")), {}),
     CoreMLPackageError, r"is an empty folder, not a Core ML package"),
    ("coreml-empty-folder-no-suffix", lambda e: quanta.quantize(str(_mkdir(e.root / "empty")), {}),
     CoreMLPackageError, r"empty folder"),
    ("coreml-file-not-folder", lambda e: quanta.quantize(str(e.write("x.mlpackage", "zip?")), {}),
     CoreMLPackageError, r"is a file, not a Core ML package"),
    ("coreml-mlmodel-file", lambda e: quanta.quantize(str(e.write("x.mlmodel", "nn")), {}), CoreMLPackageError,
     r"\.mlmodel file is a neural-network model.*mlprogram"),
    ("coreml-no-manifest", lambda e: quanta.quantize(str(e.damaged(lambda p: (p / "Manifest.json").unlink())), {}),
     CoreMLPackageError, r"has no Manifest.json"),
    ("coreml-manifest-not-json", lambda e: quanta.quantize(
        str(e.damaged(lambda p: (p / "Manifest.json").write_text("{"))), {}), CoreMLPackageError,
     r"Manifest.json is not a valid package manifest"),
    ("coreml-manifest-no-root", lambda e: quanta.quantize(
        str(e.damaged(edit_manifest(lambda d: d.pop("rootModelIdentifier")))), {}), CoreMLPackageError,
     r"rootModelIdentifier"),
    ("coreml-manifest-root-unknown", lambda e: quanta.quantize(
        str(e.damaged(edit_manifest(lambda d: d.update(rootModelIdentifier="nope")))), {}), CoreMLPackageError,
     r"not a valid package manifest"),
    ("coreml-spec-missing", lambda e: quanta.quantize(str(e.damaged(lambda p: (p / SPEC).unlink())), {}),
     CoreMLPackageError, r"root model file Data/com.apple.CoreML/model.mlmodel is missing"),
    ("coreml-spec-truncated", lambda e: quanta.quantize(str(e.damaged(truncate(SPEC, 700))), {}), CoreMLPackageError,
     r"model.mlmodel \(700 bytes\) is truncated or corrupt"),
    ("coreml-spec-tiny", lambda e: quanta.quantize(str(e.damaged(truncate(SPEC, 9))), {}), CoreMLPackageError,
     r"model.mlmodel \(9 bytes\)"),
    ("coreml-spec-empty", lambda e: quanta.quantize(str(e.damaged(truncate(SPEC, 0))), {}), CoreMLPackageError,
     r"model.mlmodel \(0 bytes\) holds no model"),
    ("coreml-weights-truncated", lambda e: quanta.quantize(str(e.damaged(truncate(WEIGHTS, 200))), {}),
     CoreMLPackageError, r"weight.bin \(200 bytes\) is truncated"),
    ("coreml-weights-empty", lambda e: quanta.quantize(str(e.damaged(truncate(WEIGHTS, 0))), {}), CoreMLPackageError,
     r"weight.bin \(0 bytes\) is truncated"),
    ("coreml-weights-missing", lambda e: quanta.quantize(str(e.damaged(lambda p: (p / WEIGHTS).unlink())), {}),
     CoreMLPackageError, r"weights/weight.bin, which is missing"),
    ("coreml-weights-garbage", lambda e: quanta.quantize(str(e.damaged(_scramble_weights)), {}), CoreMLPackageError,
     r"weight.bin .* is corrupt: no weight header"),
    ("coreml-plan-truncated-weights", lambda e: quanta.plan(str(e.damaged(truncate(WEIGHTS, 200))), {}),
     CoreMLPackageError, r"truncated"),
    ("coreml-verify-truncated-weights", lambda e: quanta.verify(e.damaged(truncate(WEIGHTS, 200)), e.qmodel),
     CoreMLPackageError, r"truncated"),
    ("coreml-verify-truncated-spec", lambda e: quanta.verify(e.damaged(truncate(SPEC, 700)), e.qmodel),
     CoreMLPackageError, r"model.mlmodel .* truncated or corrupt"),
    ("coreml-verify-empty-folder", lambda e: quanta.verify(_mkdir(e.root / "e.mlpackage"), e.qmodel),
     CoreMLPackageError, r"empty folder"),
    ("coreml-verify-missing", lambda e: quanta.verify(e.root / "none.mlpackage", e.qmodel), CoreMLPackageError,
     r"does not exist"),
    ("coreml-requantize-compressed", lambda e: quanta.quantize(str(e.pkg), {}), ModelError,
     r"no weight the 'coreml' backend can quantize.*already-compressed"),
    ("coreml-save-onto-users-folder", lambda e: quanta.quantize(
        str(_float_package(e)), {"global_config": {"dtype": "int8"}}).save(e.user_dir), DestinationExistsError,
     r"not written by quanta"),
    # -- plugins --
    ("plugin-unknown-kind", lambda e: registry.get("schem", "affine"), PluginNotFoundError, r"did you mean 'scheme'"),
    ("plugin-unknown-name", lambda e: registry.get("observer", "minmaxx"), PluginNotFoundError,
     r"did you mean 'minmax'"),
    ("plugin-describe-unknown", lambda e: registry.describe("algorithm", "awq"), PluginNotFoundError,
     r"no algorithm plugin named 'awq'"),
    ("plugin-failed-to-load-by-name", "failed-plugin-lookup", PluginNotFoundError,
     r"failed to load \(one may provide it\): plugin 'failing' \(distribution quanta-failing\) failed to load: "
     r"ModuleNotFoundError"),
    ("plugin-failed-to-load-in-recipe", "failed-plugin-recipe", ConfigError,
     r"global_config.scheme.*'failing'.*failed to load"),
    ("plugin-failed-other-name", "failed-plugin-other", PluginNotFoundError,
     r"no scheme plugin named 'pow3'.*plugins that failed to load.*'failing'"),
    # -- the CLI (exit 2, one line) --
    ("cli-plan-yaml-syntax", lambda e: cli(e, "plan", e.write("r.yaml", "model: digits\nx: [1\n")), CLIExit,
     r"quanta: error: recipe file '.*r.yaml' line"),
    ("cli-plan-duplicate-key", lambda e: cli(e, "plan", e.write("r.yaml", "model: digits\nmodel: minilm\n")), CLIExit,
     r"duplicate key 'model'"),
    ("cli-plan-missing-recipe", lambda e: cli(e, "plan", "nope.yaml"), CLIExit, r"recipe file 'nope.yaml' is missing"),
    ("cli-plan-no-model", lambda e: cli(e, "plan", e.write("r.yaml", "global_config: {}\n")), CLIExit,
     r"names no model.*--model"),
    ("cli-plan-model-missing", lambda e: cli(e, "plan", e.recipe, "--model", "nope"), CLIExit,
     r"--model: 'nope' is not .*no such directory"),
    ("cli-plan-model-pickle", lambda e: cli(e, "plan", e.recipe, "--model", e.write("junk.pt", "junk")), CLIExit,
     r"junk.pt' is a pickle file; quanta does not unpickle models"),
    ("cli-plan-model-no-such-function", lambda e: cli(e, "plan", e.recipe, "--model", "netdef.py:biuld"), CLIExit,
     r"has no 'biuld'; did you mean 'build'"),
    ("cli-plan-model-factory-raises", lambda e: cli(e, "plan", e.recipe, "--model", "netdef.py:build_fails"), CLIExit,
     r"'netdef.py:build_fails' raised RuntimeError: no weights here"),
    ("cli-plan-model-state-dict", lambda e: cli(e, "plan", e.recipe, "--model", "netdef.py:build_dict"), CLIExit,
     r"returned a dict, not a torch.nn.Module"),
    ("cli-plan-model-folder", lambda e: cli(e, "plan", e.recipe, "--model", e.user_dir), CLIExit,
     r"mine.mlpackage' holds neither a quanta saved model"),
    ("cli-quantize-unknown-key", lambda e: cli(e, "quantize", e.write("r.yaml", f"model: {e.model_ref}\nglobal: {{}}\n")),
     CLIExit, r"unknown key 'global'; did you mean 'global_config'"),
    ("cli-quantize-output-exists", lambda e: cli(e, "quantize", e.recipe, "-o", e.user_dir), CLIExit,
     r"mine.mlpackage' already exists and was not written by quanta.*--overwrite"),
    ("cli-quantize-pickle-output-exists", lambda e: cli(e, "quantize", e.recipe, "-o", e.user_file, "--format", "pickle"),
     CLIExit, r"mine.pt' already exists and was not written by quanta.*--overwrite"),
    ("cli-quantize-output-under-file", lambda e: cli(e, "quantize", e.recipe, "-o", e.user_file / "q"), CLIExit,
     r"cannot create the folder"),
    ("cli-quantize-output-is-a-file", lambda e: cli(e, "quantize", e.recipe, "-o", e.user_file), CLIExit,
     r"mine.pt' exists and is not a directory"),
    ("cli-quantize-report-exists", lambda e: cli(e, "quantize", e.recipe, "-o", "q", "--report", e.user_file),
     CLIExit, r"mine.pt' already exists"),
    ("cli-quantize-export-dest-exists", lambda e: cli(e, "quantize", e.write(
        "r.yaml", f"model: {e.model_ref}\nexport: {{format: coreml, path: {e.user_dir}}}\n"), "-o", "q"), CLIExit,
     r"mine.mlpackage' already exists"),
    ("cli-export-shape-not-int", lambda e: cli(e, "export", e.qsaved, "-o", "q.mlpackage", "--input-shape", "1,abc"),
     CLIExit, r"--input-shape '1,abc': 'abc' is not a positive integer"),
    ("cli-export-shape-zero", lambda e: cli(e, "export", e.qsaved, "-o", "q.mlpackage", "--input-shape", "0,16"),
     CLIExit, r"'0' is not a positive integer"),
    ("cli-export-shape-rejected", lambda e: cli(e, "export", e.qsaved, "-o", "q.mlpackage", "--input-shape", "1,99",
                                                "--factory", e.model_ref),
     CLIExit, r"the example input .*\(1, 99\).*does not fit the model"),
    ("cli-export-never-quantized", lambda e: cli(e, "export", e.saved, "-o", "q.mlpackage", "--input-shape", "1,16",
                                                 "--factory", e.model_ref),
     CLIExit, r"never quantized.*--allow-float"),
    ("cli-export-onto-users-folder", lambda e: cli(e, "export", e.qsaved, "-o", e.user_dir, "--input-shape", "1,16",
                                                   "--factory", e.model_ref), CLIExit, r"--overwrite"),
    ("cli-export-model-missing", lambda e: cli(e, "export", "nope", "-o", "q.mlpackage"), CLIExit,
     r"model: 'nope' is not"),
    ("cli-export-model-pickle", lambda e: cli(e, "export", e.write("junk.pt", b"\x00" * 64), "-o", "q.mlpackage"),
     CLIExit, r"is a pickle file"),
    ("cli-export-saved-dir-damaged", lambda e: cli(e, "export", _damaged_saved(e), "-o", "q.mlpackage"), CLIExit,
     r"quanta_config.json"),
    ("cli-export-unknown-format", lambda e: cli(e, "export", e.qsaved, "-o", "q.x", "--format", "onnx",
                                                "--factory", e.model_ref),
     CLIExit, r"no exporter plugin named 'onnx'"),
    ("cli-export-bad-target", lambda e: cli(e, "export", e.qsaved, "-o", "q.mlpackage", "--target", "iOS15"),
     CLIExit, r"argument --target: invalid choice: 'iOS15' \(choose from 'iOS16'"),
    ("cli-verify-corrupt-package", lambda e: cli(e, "verify", e.damaged(truncate(SPEC, 700)), "--against",
                                                 e.qsaved, "--factory", e.model_ref),
     CLIExit, r"truncated or corrupt"),
    ("cli-verify-against-missing", lambda e: cli(e, "verify", e.pkg, "--against", "nope"), CLIExit,
     r"--against: 'nope' is not"),
    ("cli-describe-unknown", lambda e: cli(e, "describe", "scheme", "afine"), CLIExit, r"did you mean 'affine'"),
    ("cli-describe-bad-kind", lambda e: cli(e, "describe", "schem", "affine"), CLIExit, r"invalid choice: 'schem'"),
    ("cli-no-command", lambda e: cli(e), CLIExit, r"the following arguments are required: COMMAND"),
]


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _scramble_weights(path: Path) -> None:
    data = bytearray((path / WEIGHTS).read_bytes())
    data[64:128] = b"\x11" * 64  # the first blob header
    (path / WEIGHTS).write_bytes(bytes(data))


def _damaged_saved(env) -> Path:
    path = env.make(env.root / "damaged_saved")
    shutil.copytree(env.qsaved, path)
    (path / "quanta_config.json").write_text("{")
    return path


def _float_package(env) -> Path:
    path = env.make(env.root / "float.mlpackage")
    quanta.export(env.model, path, example_inputs=env.x, allow_float=True)
    return path


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(before: dict, model) -> bool:
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("case,action,exc,pattern", [pytest.param(*c, id=c[0]) for c in CASES])
def test_bad_input(case, action, exc, pattern, built, tmp_path, monkeypatch):
    if case.startswith("device-cuda") and not _NO_CUDA:
        pytest.skip("this machine has CUDA")
    env = Env(tmp_path, built)
    if isinstance(action, str):  # plugin cases need a real entry point that fails to load
        _failed_plugin(env, monkeypatch)
        action = {"failed-plugin-lookup": lambda e: registry.get("scheme", "failing"),
                  "failed-plugin-recipe": lambda e: quanta.load_recipe({"global_config": {"scheme": "failing"}}),
                  "failed-plugin-other": lambda e: registry.get("scheme", "pow3")}[action]
    model_before, qmodel_before = _tensors(env.model), _tensors(env.qmodel)
    records_before = set(quanta.records(env.qmodel))
    files_before = _files(tmp_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(exc) as info:
                action(env)
    finally:
        if case.startswith("plugin-failed"):
            registry.reset()  # loaded again, without the failing entry point, on next use
    text = str(info.value)
    assert re.search(pattern, text), f"{case}: {text!r} does not match {pattern!r}"
    if exc is CLIExit:
        assert info.value.status == 2, info.value.stderr
        lines = [ln for ln in info.value.stderr.splitlines() if "error:" in ln]
        assert len(lines) == 1 and "Traceback" not in info.value.stderr, info.value.stderr
    if case != "model-nan-weight":  # that case changed the model on purpose before the call
        assert _same(model_before, env.model), f"{case}: the model changed"
    assert _same(qmodel_before, env.qmodel) and set(quanta.records(env.qmodel)) == records_before
    files_after = _files(tmp_path)
    made = tuple(str(p.relative_to(tmp_path)) for p in env.made)
    changed = [f for f in files_before if files_after.get(f) != files_before[f]]
    added = [f for f in files_after if f not in files_before and not f.startswith(made)]
    assert not changed, f"{case}: files changed: {changed}"
    assert not added, f"{case}: files added: {added}"


def test_the_table_is_large_and_covers_every_input_kind():
    kinds = {c[0].split("-")[0] for c in CASES}
    assert len(CASES) >= 100
    assert {"data", "batch", "device", "model", "yaml", "recipe", "compat", "export", "coreml", "plugin", "cli"} <= kinds
