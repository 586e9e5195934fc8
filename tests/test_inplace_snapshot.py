"""``inplace=True`` snapshots by reference what an algorithm only ever replaces (no clone)."""

from __future__ import annotations

import torch

import quanta
from quanta import registry


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))


def test_shared_snapshot_keeps_references_and_restores():
    backend = registry.get("backend", "torch").obj
    model = _model()
    units = backend.units(model)
    before = [backend.read_weight(model, u).clone() for u in units]
    ptrs = [backend.read_weight(model, u).data_ptr() for u in units]
    snap = backend.snapshot(model, units, share=tuple(units))
    assert [w.data_ptr() for _, _, w, _, _ in snap[1]] == ptrs  # references, no copies
    plain = backend.snapshot(model, units)
    assert all(w.data_ptr() not in ptrs for _, _, w, _, _ in plain[1])  # without share: clones
    for u in units:
        backend.write(model, u, quanta.quantize_weight(backend.read_weight(model, u), quanta.QuantSpec(dtype="int4")))
    assert not torch.equal(backend.read_weight(model, units[0]), before[0])
    backend.restore(model, snap)
    assert all(torch.equal(backend.read_weight(model, u), w) for u, w in zip(units, before))
    assert not quanta.record.records(model)


def test_inplace_rtn_equals_copy_mode():
    model = _model()
    copied = quanta.quantize(model, {"global_config": {"dtype": "int4"}})
    same = quanta.quantize(model, {"global_config": {"dtype": "int4"}}, inplace=True)
    assert same is model
    for a, b in zip(copied.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_gptq_shares_float_weights_and_leaves_the_model_untouched():
    """gptq's working copy shares the float weights (no copy); dead inputs (a zero column of
    the calibration data) must not be zeroed in the user's weights."""
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [torch.randn(8, 64) for _ in range(2)]
    for x in data:
        x[:, :4] = 0  # four inputs never fire
    out = quanta.quantize(model, {"algorithm": "gptq", "global_config": {"dtype": "int4", "block_size": 32,
                                                                          "granularity": "per_block"}}, data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(out[0].weight, model[0].weight)
    same = quanta.quantize(model, {"algorithm": "gptq", "global_config": {"dtype": "int4", "block_size": 32,
                                                                           "granularity": "per_block"}}, data,
                           inplace=True)
    assert same is model and torch.equal(same[0].weight, out[0].weight)
