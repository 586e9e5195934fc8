"""GPTQ's large products through oneDNN on x86 (quanta.plugins.gptq.gemm): the same sums on every
path (one process, partials folded across ranks), for any thread count; torch's calls wherever
oneDNN does not apply; the switch off through QUANTA_ONEDNN=0."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from quanta.plugins.gptq import gemm
from quanta.plugins.gptq.hessian import HessianHook, accumulate_xtx, add_partial_xtx, mirror_upper

needs_onednn = pytest.mark.skipif(not gemm.onednn_available(), reason="this torch has no oneDNN (not x86-64)")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@needs_onednn
def test_product_is_onednn_above_the_threshold_and_torch_below():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 700, generator=gen), torch.randn(500, 700, generator=gen)
    got = gemm.product_nt(a, b)
    assert torch.equal(got, gemm._op()(a, b, None, "none", [], ""))
    torch.testing.assert_close(got, a @ b.t(), rtol=1e-4, atol=1e-3)
    small_a, small_b = a[:8, :16], b[:8, :16]  # 1024 multiply-adds: torch's call, bit for bit
    assert torch.equal(gemm.product_nt(small_a, small_b), torch.mm(small_a, small_b.t()))
    assert torch.equal(gemm.product_nt(a.double(), b.double()), torch.mm(a.double(), b.double().t()))


@needs_onednn
def test_product_takes_strided_operands_and_is_the_same_for_one_and_two_threads():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1000, 2048, generator=gen)  # long dot products: where oneDNN's order is its own
    threads = torch.get_num_threads()
    try:
        got = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            got[n] = gemm.product_nt(x[:, 256:512].t(), x[:, 256:].t())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(_bits(got[1]), _bits(got[2]))
    assert torch.equal(got[1], gemm.product_nt(x[:, 256:512].t().contiguous(), x[:, 256:].t().contiguous()))


@needs_onednn
@pytest.mark.parametrize("n,tokens", [(512, 128), (600, 1000), (1100, 64)])
def test_hessian_on_onednn_is_one_sum_on_every_path(n, tokens):
    # One process (add_partial_xtx), the partials a distributed run folds (accumulate_xtx into zeros,
    # then added in order) and a hook fed the same inputs: the same sum, bit for bit, signs of zero too.
    gen = torch.Generator().manual_seed(n + tokens)
    xs = [torch.randn(tokens, n, generator=gen), torch.zeros(tokens, n), torch.randn(tokens, n, generator=gen)]
    xs[2][:, 1] = -0.0
    whole, fused = torch.zeros(n, n), torch.zeros(n, n)
    hook = HessianHook(nn.Linear(n, 4), "cpu", attach=False)
    for x in xs:
        whole.add_(accumulate_xtx(torch.zeros(n, n), x))
        add_partial_xtx(fused, x)
        hook.add(x)
    hook.finish()
    mirror_upper(whole)
    mirror_upper(fused)
    assert torch.equal(_bits(whole), _bits(fused))
    assert torch.equal(_bits(whole.mul(2.0 / len(xs))), _bits(hook.hessian()))
    reference = sum(x.t().double() @ x.double() for x in xs)
    torch.testing.assert_close(whole.double(), reference, rtol=1e-5, atol=1e-2)


def test_hessian_paths_agree_with_torch_products_too(monkeypatch):
    monkeypatch.setattr(gemm, "_OP", None)
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(300, 600, generator=gen) for _ in range(2)]
    whole, fused = torch.zeros(600, 600), torch.zeros(600, 600)
    for x in xs:
        whole.add_(accumulate_xtx(torch.zeros(600, 600), x))
        add_partial_xtx(fused, x)
    assert torch.equal(_bits(mirror_upper(whole)), _bits(mirror_upper(fused)))


@needs_onednn
def test_linear_forward_of_a_plain_linear_is_its_product_plus_bias():
    torch.manual_seed(0)
    layer = nn.Linear(512, 1024)
    x = torch.randn(2, 128, 512)
    with torch.no_grad():  # as GPTQ runs (with autograd recording, torch's own call: see below)
        got = gemm.linear_forward(layer, x)
        assert got is not None and got.shape == (2, 128, 1024)
        torch.testing.assert_close(got, layer(x), rtol=1e-4, atol=1e-4)
        no_bias = nn.Linear(512, 1024, bias=False)
        torch.testing.assert_close(gemm.linear_forward(no_bias, x), no_bias(x), rtol=1e-4, atol=1e-4)


class _MyLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("case", ["subclass", "pre_hook", "forward_hook", "global_hook", "float64", "small",
                                  "wrong_width", "not_linear", "autograd"])
def test_linear_forward_declines_what_it_cannot_stand_in_for(case):
    # None: the caller runs the module itself (its own forward, its hooks, its dtype).
    torch.manual_seed(0)
    layer = nn.Linear(512, 1024)
    x = torch.randn(128, 512)
    handles = []
    if case == "subclass":
        layer = _MyLinear(512, 1024)
    elif case == "pre_hook":
        handles.append(layer.register_forward_pre_hook(lambda m, a: None))
    elif case == "forward_hook":
        handles.append(layer.register_forward_hook(lambda m, a, o: None))
    elif case == "global_hook":
        handles.append(nn.modules.module.register_module_forward_hook(lambda m, a, o: None))
    elif case == "float64":
        layer, x = layer.double(), x.double()
    elif case == "small":
        x = x[:1, :]  # 512 x 1024 multiply-adds: below the threshold
    elif case == "wrong_width":
        x = torch.randn(128, 256)
    elif case == "not_linear":
        layer = nn.Conv1d(512, 1024, 1)
    try:
        if case == "autograd":  # the weight requires grad and autograd records: no oneDNN (no backward)
            assert gemm.linear_forward(layer, x) is None
        else:
            with torch.no_grad():
                assert gemm.linear_forward(layer, x) is None
    finally:
        for handle in handles:
            handle.remove()


def test_quanta_onednn_0_turns_it_off():
    code = "from quanta.plugins.gptq import gemm; print(gemm.onednn_available())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "QUANTA_ONEDNN": "0"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    on = subprocess.run([sys.executable, "-c", code], env={k: v for k, v in os.environ.items() if k != "QUANTA_ONEDNN"},
                        capture_output=True, text=True, check=True)
    assert on.stdout.strip() == str(gemm.onednn_available())


@needs_onednn
def test_gptq_through_onednn_is_as_good_as_through_torch(monkeypatch):
    # The products round differently (long dot products), the solution is the same in quality.
    import quanta

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 256)).eval()
    data = [torch.randn(1, 128, 512) for _ in range(8)]
    held_out = torch.randn(4, 128, 512)
    recipe = {"algorithm": "gptq", "global_config": {"weight_dtype": "uint4", "granularity": "per_block",
                                                      "block_size": 128}}

    def error(m):
        with torch.no_grad():
            ref = model(held_out)
            return float((m(held_out) - ref).square().mean() / ref.square().mean())

    fast = error(quanta.quantize(model, recipe, data))
    monkeypatch.setattr(gemm, "_OP", None)
    plain = error(quanta.quantize(model, recipe, data))
    assert abs(fast - plain) <= 0.01 * plain, (fast, plain)


@pytest.mark.parametrize("m,k,r", [(600, 128, 700), (300, 128, 4096), (100, 32, 64)])
def test_trailing_update_adds_the_product_as_addmm_does(m, k, r):
    # target += leftᵀ right: through oneDNN in slices of rows (256 rows for r = 700: three, the last
    # short; 128 for the wide r = 4096, each product at most 2^19 values) or torch's addmm_ below
    # the threshold (100 x 64 x 32); close to addmm_ either way, into a strided target (a slice of
    # a wider buffer) without touching what is outside it.
    gen = torch.Generator().manual_seed(m)
    left, right = torch.randn(k, m + 10, generator=gen)[:, 5:5 + m], torch.randn(k, r, generator=gen)
    buffer = torch.randn(m + 4, r + 8, generator=gen)
    before = buffer.clone()
    target = buffer[2:2 + m, 3:3 + r]
    expected = target.clone().addmm_(left.t(), right)
    assert gemm.add_product_tn(target, left, right) is target
    torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-4)
    outside = torch.ones_like(buffer, dtype=torch.bool)
    outside[2:2 + m, 3:3 + r] = False
    assert torch.equal(buffer[outside], before[outside])
    if m * k * r < gemm._MIN_WORK or not gemm.onednn_available():
        assert torch.equal(_bits(target), _bits(expected))
    else:  # each slice's product made on its own, then added
        step = 256 if r == 700 else 128
        rows = right.t().contiguous()
        by_hand = before[2:2 + m, 3:3 + r].clone()
        for c in range(0, m, step):
            by_hand[c:c + step].add_(gemm._op()(left[:, c:c + step].t().contiguous(), rows, None, "none", [], ""))
        assert torch.equal(_bits(target), _bits(by_hand))
