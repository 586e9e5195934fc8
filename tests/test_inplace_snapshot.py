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
