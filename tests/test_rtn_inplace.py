"""``inplace=True`` RTN writes the dequantized values over the float weights' own storage, once the
run can no longer fail: no second float buffer, bit for bit the values of copy mode, and a failed
run still leaves the model as it was."""

from __future__ import annotations

import os
import signal
import warnings

import pytest
import torch

import quanta
from quanta._run.guard import signals_deferred


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16, bias=False),
                                torch.nn.Conv2d(8, 8, 3), torch.nn.ConvTranspose2d(8, 8, 3))
    with torch.no_grad():
        model[0].weight[:, :4] = -1e-7  # rounds to code 0 from the negative side: 0.0, never -0.0
        model[2].weight[3] = 0.0  # an all-zero group
    return model


GLOBS = [{"dtype": "int8"}, {"dtype": "int4"}, {"dtype": "uint8"},
         {"dtype": "int4", "granularity": "per_block", "block_size": 8},
         {"dtype": "int8", "scheme": "affine", "granularity": "per_tensor"},
         {"dtype": "uint4", "scheme": "affine", "granularity": "per_block", "block_size": 4}]


@pytest.mark.parametrize("glob", GLOBS, ids=lambda g: "-".join(str(v) for v in g.values()))
def test_inplace_values_are_copy_modes_bit_for_bit_in_the_same_storage(glob):
    model = _model()
    copied = quanta.quantize(model, {"global_config": glob})
    ptrs = {name: p.data_ptr() for name, p in model.named_parameters()}
    same = quanta.quantize(model, {"global_config": glob}, inplace=True)
    assert same is model
    for (name, a), b in zip(copied.named_parameters(), model.parameters()):
        assert torch.equal(_bits(a), _bits(b)), name
    records, copied_records = quanta.records(model), quanta.records(copied)
    assert records.keys() == copied_records.keys()
    for key, rec in records.items():
        assert torch.equal(rec.codes, copied_records[key].codes) and torch.equal(rec.scale, copied_records[key].scale)
        assert torch.equal(_bits(rec.dequantize()), _bits(quanta.record.read_record(
            model.get_submodule(key.rsplit(".", 1)[0])).dequantize()))
    # Linear and Conv weights keep their storage (no new float buffer); ConvTranspose's output
    # axis is 1, its groups (unless one per tensor) are not a view of the weight, so it gets new
    # storage as in copy mode.
    for name in ("0.weight", "2.weight", "3.weight"):
        assert model.get_parameter(name).data_ptr() == ptrs[name], name
    if glob.get("granularity") != "per_tensor":
        assert model.get_parameter("4.weight").data_ptr() != ptrs["4.weight"]
    assert [r.rel_error for r in same.quanta_report.layers] == [r.rel_error for r in copied.quanta_report.layers]


def test_failure_after_records_were_stored_restores_every_float_weight():
    model = _model()
    with torch.no_grad():
        model[3].weight[0, 0, 0, 0] = float("nan")  # layers 0 and 2 are stored before 3 fails
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(quanta.QuantizationError, match="layer '3'.*NaN"):
        quanta.quantize(model, {"global_config": {"dtype": "int4"}}, inplace=True)
    after = model.state_dict()
    assert before.keys() == after.keys() and not quanta.records(model)
    assert all(torch.equal(_bits(before[k]), _bits(after[k])) for k in before)


def test_a_listener_that_fails_the_run_leaves_the_float_weights():
    """A listener of layer_quantized that raises (warnings turned into errors): the run fails
    before any float weight was written over, and the model is restored."""

    class Broken:
        @quanta.hookimpl
        def layer_quantized(self, name, record, stats):
            raise RuntimeError("listener fails")

    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with quanta.registry.plugin(Broken(), name="broken-rtn-listener"), warnings.catch_warnings():
        warnings.simplefilter("error", quanta.PluginWarning)
        with pytest.raises(quanta.PluginError, match="listener fails"):
            quanta.quantize(model, {"global_config": {"dtype": "int8"}}, inplace=True)
    assert not quanta.records(model)
    assert all(torch.equal(_bits(before[k]), _bits(v)) for k, v in model.state_dict().items())


def test_signals_deferred_holds_ctrl_c_until_the_block_ends():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the Python handler runs between bytecodes
                pass
            done.append(True)
    assert done == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_backend_overriding_write_sees_every_layer():
    """A torch backend subclass that overrides ``write`` alone gets every layer through it (no
    ``write_later`` behind its back), so its failure still restores an inplace model."""
    from quanta.testing.algorithms import failing_backend

    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plugin = failing_backend(1)
    assert not plugin.backend.writes_later and quanta.registry.get("backend", "torch").obj.writes_later
    with quanta.registry.plugin(plugin), pytest.raises(Exception, match="injected failure"):
        quanta.quantize(model, {"global_config": {"dtype": "int8"}}, inplace=True, backend=plugin.backend.name)
    assert plugin.backend.writes == 1 and not quanta.records(model)
    assert all(torch.equal(_bits(before[k]), _bits(v)) for k, v in model.state_dict().items())
