"""The checks around bad inputs that are not errors: warnings, lazy checks of streamed data, and
the accepted forms (own output replaced, overwrite=True, DataLoaders, dict batches)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import quanta
from quanta import registry
from quanta._run.data_checks import CalibrationWarning, CheckedBatches, check_calibration_data
from quanta.errors import DataError


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


GPTQ = {"algorithm": "gptq", "global_config": {"dtype": "int8"}}


def test_fewer_samples_than_nsamples_warns_with_both_numbers():
    data = [torch.randn(4, 16) for _ in range(3)]  # 12 samples (rows) in 3 batches
    with pytest.warns(CalibrationWarning, match=r"calibration data has 12 sample\(s\) in 3 batch\(es\) but "
                                                r"calibration_nsamples is 16"):
        quanta.quantize(_net(), {**GPTQ, "calibration_nsamples": 16}, data=data)
    with pytest.warns(CalibrationWarning, match=r"has 12 sample\(s\) in 3 batch\(es\) but calibration_nsamples is 16"):
        quanta.quantize(_net(), {**GPTQ, "calibration_nsamples": 16}, data=iter(data))  # streamed
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        quanta.quantize(_net(), {**GPTQ, "calibration_nsamples": 12}, data=data)  # enough: no warning


def test_samples_are_rows_for_data_and_gptq():
    from quanta._run.calibration import count_samples, take_samples

    data = [torch.randn(4, 16) for _ in range(3)]
    assert [count_samples(b) for b in ({"input_ids": data[0]}, (data[0], data[0]), data[0])] == [4, 4, 4]
    assert len(take_samples(data, 5)) == 2 and len(take_samples(iter(data), None)) == 3
    q = quanta.quantize(_net(), {**GPTQ, "calibration_nsamples": 8}, data=data)  # reads 2 batches: 8 samples
    assert q.quanta_report.layers[0].extra["method"] == "gptq"


def test_compat_warns_too():
    from quanta.compat import LayerwiseCompressor

    compressor = LayerwiseCompressor(_net(), {"global_config": {"weight_dtype": "uint8"}, "calibration_nsamples": 16})
    with pytest.warns(CalibrationWarning, match=r"2 batch\(es\) but calibration_nsamples is 16"):
        compressor.compress([torch.randn(4, 16), torch.randn(4, 16)])


@pytest.mark.parametrize("inplace", [False, True])
def test_a_bad_batch_late_in_a_dataloader_is_named_and_the_model_is_untouched(inplace):
    values = torch.randn(16, 16)
    values[13, 2] = float("nan")  # in batch 3 of a loader of 4-row batches
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(values), batch_size=4,
                                         collate_fn=lambda rows: torch.stack([r[0] for r in rows]))
    model = _net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(DataError, match=r"calibration batch 3 holds 1 NaN"):
        quanta.quantize(model, GPTQ, data=loader, inplace=inplace)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not quanta.records(model)


def test_sequences_are_checked_whole_before_work_and_streams_lazily():
    model = _net()
    data = [torch.randn(4, 16), torch.randn(4, 16), torch.full((4, 16), float("inf"))]
    with pytest.raises(DataError, match="batch 2"):
        check_calibration_data(model, data)
    assert check_calibration_data(model, data, nsamples=2) is data  # batch 2 is never read
    stream = check_calibration_data(model, iter(data))
    assert isinstance(stream, CheckedBatches)
    it = iter(stream)
    next(it), next(it)
    with pytest.raises(DataError, match="batch 2"):
        next(it)


def test_dict_and_tuple_batches_are_accepted():
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 4), torch.nn.Linear(8, 4)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    pairs = [(torch.randn(2, 16), torch.randn(2, 8)) for _ in range(2)]
    assert quanta.records(quanta.quantize(TwoInputs(), GPTQ, data=pairs))
    dicts = [{"x": x, "y": y} for x, y in pairs]
    assert quanta.records(quanta.quantize(TwoInputs(), GPTQ, data=dicts))


def test_dry_forward_leaves_batchnorm_statistics_and_training_mode_alone():
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8)).train()
    before = copy.deepcopy(model.state_dict())
    check_calibration_data(model, [torch.randn(4, 16) * 50])
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_export_replaces_its_own_package_and_overwrites_a_users_folder_only_when_asked(tmp_path):
    from quanta.errors import DestinationExistsError

    q = quanta.quantize(_net(), {"global_config": {"dtype": "int8"}})
    x = torch.randn(1, 16)
    path = quanta.export(q, tmp_path / "a.mlpackage", example_inputs=x)
    assert quanta.export(q, path, example_inputs=x) == path  # quanta's own: replaced, no overwrite needed
    user = tmp_path / "user.mlpackage"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(DestinationExistsError):
        quanta.export(q, user, example_inputs=x)
    assert (user / "notes.txt").read_text() == "mine"
    quanta.export(q, user, example_inputs=x, overwrite=True)
    assert not (user / "notes.txt").exists() and (user / ".quanta").is_file()
    assert quanta.verify(user, q, example_inputs=x)["cosine"] > 0.999


def test_float_export_needs_allow_float(tmp_path):
    model = _net()
    path = quanta.export(model, tmp_path / "f.mlpackage", example_inputs=torch.randn(1, 16), allow_float=True)
    assert quanta.verify(path, model)["cosine"] > 0.999


def test_quanta_plugins_naming_a_missing_entry_point_is_listed_and_named_on_lookup(monkeypatch):
    monkeypatch.setenv("QUANTA_PLUGINS", "quanta-nonexistent-plugin")
    registry.reset()
    try:
        failures = registry.failures()
        assert [f.plugin for f in failures] == ["quanta-nonexistent-plugin"]
        assert "QUANTA_PLUGINS names 'quanta-nonexistent-plugin'" in failures[0].error
        assert "rtn" in registry.names("algorithm")  # the built-ins are unaffected
        with pytest.raises(quanta.PluginNotFoundError, match="QUANTA_PLUGINS names 'quanta-nonexistent-plugin'"):
            registry.get("scheme", "nf4")
    finally:
        monkeypatch.delenv("QUANTA_PLUGINS")
        registry.reset()
