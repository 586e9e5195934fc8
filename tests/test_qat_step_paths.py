"""The QAT step's lean paths give the general arithmetic's values and gradients, bit for bit.

``WeightFakeQuantize.forward`` works out once per weight shape what depends only on the shape and
its plugins (the group view, the clamp check); ``ActivationFakeQuantize.forward`` reads its
observer, buffers and switches from the module's dicts and runs ``_FakeQuantizeActivation``.
Each is compared here with the step-by-step general path on the same inputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import quanta
from quanta._records.qmath import from_groups, to_groups
from quanta.fx.fake_quant import (
    ActivationFakeQuantize,
    WeightFakeQuantize,
    _declares,
    _FakeQuantize,
    fake_quantize_per_group,
    fake_quantize_per_tensor,
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _general_weight_fake_quant(wfq: WeightFakeQuantize, weight: torch.Tensor) -> torch.Tensor:
    # The path before the per-shape plans: qparams from the float32 groups under no_grad, the group
    # view, fake_quantize_per_group with the exact ranges' clamp check where the observer declares it.
    sizes = wfq.block_sizes(weight.shape)
    scale, zp, lo, hi = wfq._scheme_qparams(weight, ranges=True)
    exact = weight.numel() >= 16384 and _declares(wfq.observer, "exact_ranges", "observe")
    ranges = (lo, hi) if exact else None
    fq = fake_quantize_per_group(to_groups(weight, sizes), scale, zp, wfq.quant_min, wfq.quant_max, None, ranges)
    return from_groups(fq, tuple(weight.shape), sizes)


_WEIGHT_CASES = {
    "linear per-channel int8": ((256, 96), quanta.QuantSpec(dtype="int8")),
    "linear per-channel int4 (full grid clamps)": ((128, 160), quanta.QuantSpec(dtype="int4")),
    "conv per-channel": ((32, 16, 3, 3), quanta.QuantSpec(dtype="int8")),
    "per-block (a permuted group view)": ((64, 256), quanta.QuantSpec(dtype="int4", granularity="per_block",
                                                                       block_size=32)),
    "per-tensor": ((48, 40), quanta.QuantSpec(granularity="per_tensor")),
    "affine uint8 (zero points)": ((96, 64), quanta.QuantSpec(dtype="uint8", scheme="affine")),
    "large affine int8 (exact-range check with zero points)": ((256, 128), quanta.QuantSpec(dtype="int8",
                                                                                           scheme="affine")),
}


@pytest.mark.parametrize("case", sorted(_WEIGHT_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weight_plan_path_is_bit_identical_to_the_general_path(case, dtype):
    shape, spec = _WEIGHT_CASES[case]
    torch.manual_seed(3)
    w = (torch.randn(shape) * 0.2).to(dtype)
    w.view(-1)[5] = -1e-9  # a code of -0.0
    w[1] = 0.0  # an all-zero channel
    wfq = WeightFakeQuantize(spec)
    grad = torch.randn(shape).to(dtype)
    for step in range(2):  # the plan is made on the first call and used on the second
        leaf = w.clone().requires_grad_(True)
        out = wfq(leaf)
        out.backward(grad)
        ref_leaf = w.clone().requires_grad_(True)
        ref = _general_weight_fake_quant(wfq, ref_leaf)
        ref.backward(grad)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert torch.equal(_bits(out), _bits(ref)), (case, step)
        assert torch.equal(_bits(leaf.grad), _bits(ref_leaf.grad)), (case, step)
        w = w * 1.5


def test_weight_plan_follows_a_replaced_observer_or_scheme_and_new_shapes():
    from quanta.plugins.observers import MinMaxObserver
    from quanta.plugins.schemes import SymmetricScheme

    class Shrinking(MinMaxObserver):  # narrower ranges: codes clamp; no exact_ranges declared
        def observe(self, values, spec, scheme):
            lo, hi = super().observe(values, spec, scheme)
            return lo * 0.5, hi * 0.5

    class Coarse(SymmetricScheme):  # a subclass with its own qparams arithmetic
        def qparams(self, min_val, max_val, dtype):
            scale, zp = super().qparams(min_val, max_val, dtype)
            return scale * 4.0, zp

    torch.manual_seed(4)
    wfq = WeightFakeQuantize(quanta.QuantSpec(dtype="int8"))
    w = torch.randn(256, 128, requires_grad=True)
    first = wfq(w).detach()
    wfq.observer = Shrinking()
    shrunk = wfq(w)
    assert torch.equal(_bits(shrunk), _bits(_general_weight_fake_quant(wfq, w)))
    assert not torch.equal(shrunk.detach(), first)  # the new observer's ranges, not the cached plan's
    wfq.scheme = Coarse()
    coarse = wfq(w)
    assert torch.equal(_bits(coarse), _bits(_general_weight_fake_quant(wfq, w)))
    other = torch.randn(64, 32)
    assert torch.equal(_bits(wfq(other)), _bits(_general_weight_fake_quant(wfq, other)))


def test_weight_already_in_group_shape_gets_no_view_nodes():
    # A Linear's per-channel weight is its own [G, K] view: the output is the fake quant's node.
    wfq = WeightFakeQuantize(quanta.QuantSpec(dtype="int8"))
    out = wfq(torch.randn(32, 64, requires_grad=True))
    assert type(out.grad_fn).__name__ == "_FakeQuantizeBackward"
    conv_out = wfq(torch.randn(8, 4, 3, 3, requires_grad=True))  # [8, 36] groups, reshaped back
    assert conv_out.shape == (8, 4, 3, 3)


class _ThirdPartyStreaming(nn.Module):
    """A streaming observer from a plugin: plain attributes, its own update rule."""

    def __init__(self):
        super().__init__()
        self.min_val = torch.tensor(float("inf"))
        self.max_val = torch.tensor(float("-inf"))

    def forward(self, x):
        self.min_val = torch.minimum(self.min_val, x.detach().min() * 1.25)
        self.max_val = torch.maximum(self.max_val, x.detach().max() * 0.75)


def _general_activation_step(afq: ActivationFakeQuantize, x: torch.Tensor) -> torch.Tensor:
    # The path before: observe through the module call, qparams from the scheme's tensor qparams,
    # the per-tensor fake quant without a workspace.
    afq.observer(x)
    scale, zp = afq.scheme.qparams(torch.as_tensor(afq.observer.min_val).reshape(1),
                                   torch.as_tensor(afq.observer.max_val).reshape(1), afq.dtype)
    zp = 0 if zp is None else int(zp)
    return fake_quantize_per_tensor(x, float(scale), zp, afq.quant_min, afq.quant_max)


@pytest.mark.parametrize("observer", ["minmax", "moving_average_minmax", "third-party"])
@pytest.mark.parametrize("scheme,dtype", [("symmetric", "uint8"), ("symmetric", "int8"), ("affine", "uint8"),
                                          ("affine", "int8")])
def test_activation_step_is_bit_identical_to_the_general_path(observer, scheme, dtype):
    from quanta.fx.observers import streaming_observer

    qdtype = quanta.QuantSpec(dtype=dtype).dtype
    obs = _ThirdPartyStreaming() if observer == "third-party" else streaming_observer(observer)
    afq = ActivationFakeQuantize(obs, scheme, qdtype, site="test")
    ref = copy.deepcopy(afq)
    torch.manual_seed(5)
    for step in range(4):
        x = torch.randn(16, 40) * (1 + step) + 0.3 * step
        x[0, 0] = -1e-9  # a code of -0.0
        grad = torch.randn(16, 40)
        leaf = x.clone().requires_grad_(True)
        out = afq(leaf)
        out.backward(grad)
        ref_leaf = x.clone().requires_grad_(True)
        want = _general_activation_step(ref, ref_leaf)
        want.backward(grad)
        assert torch.equal(_bits(out), _bits(want)), step
        assert torch.equal(_bits(leaf.grad), _bits(ref_leaf.grad)), step
        assert float(afq.scale) == float(afq.qparams()[0]) and int(afq.zero_point) == afq.qparams()[1]


def test_activation_switches_and_half_precision_take_the_general_paths():
    from quanta.fx.observers import streaming_observer

    afq = ActivationFakeQuantize(streaming_observer("minmax"), "affine", quanta.QuantSpec(dtype="uint8").dtype)
    x = torch.randn(8, 8)
    afq.fake_quant_enabled = False
    assert afq(x) is x and float(afq.observer.max_val) == float(x.max())
    afq.fake_quant_enabled, afq.observer_enabled = True, False
    y = afq(x * 10)  # qparams of the range observed above; the larger values clamp
    scale, zp = afq.qparams()
    assert torch.equal(y, fake_quantize_per_tensor(x * 10, scale, zp, afq.quant_min, afq.quant_max))
    half = x.half().requires_grad_(True)
    got = afq(half)
    got.sum().backward()
    want = fake_quantize_per_tensor(x.half(), scale, zp, afq.quant_min, afq.quant_max)
    assert got.dtype == torch.float16 and torch.equal(_bits(got), _bits(want))


def test_observers_keep_float32_ranges_from_half_precision_batches():
    from quanta.fx.observers import streaming_observer

    for name in ("minmax", "moving_average_minmax"):
        obs = streaming_observer(name)
        obs(torch.tensor([[-1.5, 2.25]], dtype=torch.float16))
        assert obs.min_val.dtype == torch.float32 and float(obs.min_val) == -1.5 and float(obs.max_val) == 2.25


def test_per_tensor_without_workspace_still_has_its_general_function():
    x = torch.randn(4, 6, requires_grad=True)
    y = fake_quantize_per_tensor(x, 0.05, 3, 0, 15)
    assert type(y.grad_fn).__name__ == "_FakeQuantizeBackward"
    assert _FakeQuantize is not None


def test_fast_apply_matches_function_apply_and_falls_back(monkeypatch):
    # fast_apply calls torch's C++ apply where Function.apply would (same outputs and gradients),
    # and Function.apply itself where torch lacks the C++ entry or a functorch transform is active.
    from quanta.fx import _functions
    from quanta.fx._functions import _FakeQuantize, fast_apply

    x = torch.randn(6, 5)
    scale = torch.full((6, 1), 0.02)
    grads = []
    for patched in (False, True):
        if patched:
            monkeypatch.setattr(_functions, "_C_APPLY", {})
        leaf = x.clone().requires_grad_(True)
        out = fast_apply(_FakeQuantize, leaf, scale, None, -8, 7, True)
        out.sum().backward()
        grads.append((out.detach(), leaf.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    monkeypatch.undo()

    def through_transform(t):
        return fast_apply(_FakeQuantize, t, scale, None, -8, 7, True).sum()

    with pytest.raises(RuntimeError, match="setup_context"):  # Function.apply's own message
        torch.func.grad(through_transform)(x)
