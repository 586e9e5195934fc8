"""The sweep's work buffers kept between layers (``WorkBuffers``, quanta's own GPTQ runs).

A layer of the same size takes the previous layer's three ``[in, out]`` buffers instead of fresh
memory; the results must be those of a solve with fresh buffers, bit for bit, whatever the
quantizer returns (a third-party ``quantize`` may hand back its input).
"""

from __future__ import annotations

import pytest
import torch

from quanta.plugins.gptq.solver import WorkBuffers, gptq_quantize

from test_gptq_solver import MinMaxQuantizer, correlated_layer


def _bits(t):
    return None if t is None else t.contiguous().view(torch.uint8)


def _same(a, b) -> bool:
    return all((x is None and y is None) or torch.equal(_bits(x), _bits(y))
               for x, y in ((a.codes, b.codes), (a.scale, b.scale), (a.zero_point, b.zero_point), (a.weight, b.weight))
               ) and a.loss == b.loss


class AliasingQuantizer(MinMaxQuantizer):
    """A third-party quantizer whose quantize rounds in place and returns its input (no quantize_into)."""

    def quantize(self, w, scale, zero_point):
        return super().quantize(w.clone(), scale, zero_point) if not w.is_contiguous() else \
            w.copy_(super().quantize(w, scale, zero_point))


@pytest.mark.parametrize("quantizer", [MinMaxQuantizer(4, True), MinMaxQuantizer(4, False), AliasingQuantizer(4, True)])
@pytest.mark.parametrize("act_order", [False, True])
def test_layers_sharing_work_buffers_give_the_fresh_buffer_results(quantizer, act_order):
    pool = WorkBuffers()
    layers = [correlated_layer(96, 64, seed=1), correlated_layer(64, 96, seed=2), correlated_layer(48, 64, seed=3)]
    kw = dict(block_size=32, act_order=act_order)
    for w, h, _ in layers:  # [96x64] and [64x96] share buffers; [48x64] takes new ones
        fresh = gptq_quantize(w, h.clone(), quantizer, _overwrite_hessian=True, **kw)
        kept = [t.data_ptr() for t in pool.free]
        pooled = gptq_quantize(w, h.clone(), quantizer, _overwrite_hessian=True, _workspace=pool, **kw)
        assert _same(fresh, pooled)
        assert len(pool.free) == 3 and all(t.numel() == w.numel() for t in pool.free)
        if kept and w.numel() == 96 * 64:
            assert sorted(t.data_ptr() for t in pool.free) == sorted(kept)  # the same memory again
    pool.clear()
    assert not pool.free


def test_gptq_run_reuses_buffers_across_layers_and_drops_them_after():
    import quanta
    from quanta import registry
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
    data = [torch.randn(4, 32) for _ in range(4)]
    recipe = {"algorithm": "gptq", "global_config": {"dtype": "int4", "granularity": "per_block", "block_size": 32}}
    seen = []
    take = WorkBuffers.take

    def spy(self, n, rows, device):
        buffer = take(self, n, rows, device)
        seen.append(buffer.data_ptr())
        return buffer

    WorkBuffers.take = spy
    try:
        out = quanta.quantize(model, recipe, data)
    finally:
        WorkBuffers.take = take
    assert len(seen) == 6 and sorted(seen[:3]) == sorted(seen[3:])  # layer 2 took layer 1's buffers
    assert [r.extra["method"] for r in out.quanta_report.layers] == ["gptq", "gptq"]
    assert not registry.get("algorithm", "gptq").obj._workspace.free  # dropped at the end of the run
