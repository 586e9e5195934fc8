"""The size of a model as stored equals the files on disk, with quantized and float weights apart."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import quanta
from quanta._files.stored_size import safetensors_parts, stored_size


def _files_sum(path) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for folder, _, files in os.walk(path) for f in files)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(100, 32), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()


@pytest.fixture(scope="module")
def qmodel():
    return quanta.quantize(_model(), {"global_config": {"dtype": "int4", "granularity": "per_block", "block_size": 16},
                                      "module_type_configs": {"Embedding": None}})


def test_saved_folder_size_is_the_sum_of_its_files(qmodel, tmp_path):
    folder = quanta.save(qmodel, tmp_path / "saved", example_inputs=(torch.tensor([[1, 2, 3]]),))
    size = stored_size(folder)
    assert size.total == _files_sum(folder)
    parts = safetensors_parts(os.path.join(folder, "model.safetensors"))
    assert size.quantized == sum(n for k, n in parts.items() if "_quanta_" in k)
    # the float part: the embedding (100 x 32 fp32) and the two biases, stored as they are
    assert size.float == (100 * 32 + 64 + 8) * 4
    assert 0 < size.other < 64 * 1024 and size.quantized + size.float + size.other == size.total
    assert size.describe().startswith(f"{size.total / 2**10:.1f} KiB on disk: quantized weights")
    # the report's figure is the quantized layers only, and says so
    assert "these layers" in str(qmodel.quanta_report)


def test_a_file_or_unknown_folder_has_its_total_only(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 1000)
    size = stored_size(tmp_path / "a")
    assert (size.total, size.quantized, size.float) == (1000, 0, 0) and size.describe() == "1.0 KiB on disk"


@pytest.mark.slow
def test_mlpackage_size_is_the_sum_of_its_files(tmp_path):
    pytest.importorskip("coremltools")
    from quanta import registry

    q = quanta.quantize(_model()[1:], {"global_config": {"dtype": "int8"}})
    path = quanta.export(q, tmp_path / "m.mlpackage", format="coreml", example_inputs=(torch.randn(2, 32),))
    size = registry.get("exporter", "coreml").obj.stored_size(path)
    assert size.total == _files_sum(path)
    # int8 codes (32*64 + 64*8 bytes) and their fp16 scales; the float part is the 64-element fp16 bias
    # (the 8-element one is small enough to live inside the spec, with the other bytes)
    assert size.quantized >= 32 * 64 + 64 * 8 and size.float == 64 * 2, size
    assert size.other > 0
