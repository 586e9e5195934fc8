"""The per-tensor fake-quant op: the scheme's values forward, straight-through gradient backward."""

from __future__ import annotations

import pytest
import torch

import quanta
from quanta.fx.fake_quant import fake_quantize_per_tensor


@pytest.mark.parametrize("scheme,dtype", [("symmetric", "int8"), ("affine", "uint8"), ("affine", "int8")])
def test_forward_is_the_schemes_quantize_dequantize(scheme, dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5) * 3
    impl = quanta.registry.get("scheme", scheme).obj
    qdtype = quanta.QuantSpec(dtype=dtype).dtype
    lo, hi = x.min().reshape(1) * 0.5, x.max().reshape(1) * 0.5  # a clipped range: some codes clamp
    scale, zp = impl.qparams(lo, hi, qdtype)
    qmin, qmax = impl.quant_range(qdtype)
    zp_val = 0 if zp is None else int(zp)
    expected = impl.dequantize(impl.quantize(x.reshape(1, -1), scale[:, None], None if zp is None else zp[:, None],
                                             qdtype), scale[:, None], None if zp is None else zp[:, None])
    got = fake_quantize_per_tensor(x, float(scale), zp_val, qmin, qmax)
    assert torch.equal(got.reshape(1, -1), expected)


def test_gradient_passes_only_where_codes_are_in_range():
    x = torch.tensor([-10.0, -0.3, 0.0, 0.26, 10.0], requires_grad=True)
    y = fake_quantize_per_tensor(x, 0.1, 0, -8, 7)
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
    assert torch.allclose(y, torch.tensor([-0.8, -0.3, 0.0, 0.3, 0.7]))


def _reference_fake_quant(x, scale, zero_point, qmin, qmax):
    # The arithmetic before the fast paths: add the zero point, a bool mask, clamp, subtract.
    q = torch.div(x, scale).round_()
    if zero_point is not None:
        q.add_(zero_point)
    mask = (q >= qmin).logical_and_(q <= qmax)
    q.clamp_(qmin, qmax)
    if zero_point is not None:
        q.sub_(zero_point)
    return q.mul_(scale), mask


@pytest.mark.parametrize("clip", [1.0, 0.6])
@pytest.mark.parametrize("with_zero_point", [False, True])
def test_per_group_fast_paths_are_bit_identical_with_nan_and_signed_zero(clip, with_zero_point):
    from quanta.fx.fake_quant import fake_quantize_per_group

    torch.manual_seed(1)
    x = torch.randn(8, 32)
    x[0, 1], x[3, :] = -1e-9, 0.0  # a code of -0.0, an all-zero group
    if clip < 1:
        x[5, 7] = float("nan")
    span = torch.maximum(x.nan_to_num().amin(1).abs(), x.nan_to_num().amax(1).abs()) * clip
    scale = torch.where(span > 0, span / 127.0, torch.ones_like(span))
    zp = torch.tensor([0, 1, -2, 0, 3, 0, -1, 2], dtype=torch.int32) if with_zero_point else None
    grad = torch.randn(8, 32)
    grad[0, 0] = -0.0
    leaf = x.clone().requires_grad_(True)
    fake_quantize_per_group(leaf, scale, zp, -128, 127).backward(grad)
    out = fake_quantize_per_group(x, scale, zp, -128, 127)
    ref, mask = _reference_fake_quant(x, scale[:, None], None if zp is None or not zp.any() else zp[:, None].float(),
                                      -128, 127)
    if not with_zero_point:
        assert bool(mask.all()) == (clip == 1.0)  # no clamp: the path without a mask
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))
    assert torch.equal(leaf.grad.view(torch.int32), (grad * mask).view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_workspace", [False, True])
@pytest.mark.parametrize("qmin,qmax,zero_point", [(0, 255, 127), (0, 255, 0), (-128, 127, -128), (-128, 127, 5),
                                                  (-127, 127, 0)])
def test_per_tensor_is_bit_identical_with_nan_inf_and_signed_zero(qmin, qmax, zero_point, with_workspace, dtype):
    # Activations: the zero point folded into the clamp bounds gives the old arithmetic's values
    # (a code of -0.0 dequantizes to 0.0 as (q + zp) - zp did) and its gradient; with a workspace
    # (buffers reused, 0 + scale * codes in one pass) too, in float32, float16 and bfloat16.
    from quanta.fx.fake_quant import _MaskWorkspace

    torch.manual_seed(2)
    x = torch.randn(6, 40) * 4
    x[0, :4] = torch.tensor([-1e-9, -0.0, 0.0, 1e-9])
    x[1, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    x[2, :2] = torch.tensor([1e30, -1e30])
    x = x.to(dtype)
    grad = torch.randn(6, 40).to(dtype)
    grad[0, 0] = -0.0
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    ws = _MaskWorkspace() if with_workspace else None
    for scale in (0.05, 3.3e-3):
        for _ in range(2):  # the second call reuses the first's buffers
            leaf = x.clone().requires_grad_(True)
            out = fake_quantize_per_tensor(leaf, scale, zero_point, qmin, qmax, ws)
            out.backward(grad)
            ref, mask = _reference_fake_quant(x, scale, zero_point or None, qmin, qmax)
            assert out.dtype == dtype and torch.equal(out.detach().view(bits), ref.view(bits))
            assert torch.equal(leaf.grad.view(bits), (grad * mask).view(bits))


def test_activation_mask_buffer_is_reused_only_when_no_graph_holds_it():
    import copy

    from quanta.fx.fake_quant import _MaskWorkspace

    torch.manual_seed(3)
    ws = _MaskWorkspace()
    xs = [torch.randn(4, 16) * 3 for _ in range(3)]
    grads = [torch.randn(4, 16) for _ in range(3)]

    def step(x, g, workspace):
        leaf = x.clone().requires_grad_(True)
        out = fake_quantize_per_tensor(leaf, 0.05, 7, 0, 63, workspace)
        out.backward(g)
        return out.detach(), leaf.grad

    for x, g in zip(xs, grads):  # each step's graph is freed before the next: one buffer for all
        got, grad = step(x, g, ws)
        ref, mask = _reference_fake_quant(x, 0.05, 7, 0, 63)
        assert torch.equal(got.view(torch.int32), ref.view(torch.int32))
        assert torch.equal(grad.view(torch.int32), (g * mask).view(torch.int32))
    first = ws.mask
    step(xs[0], grads[0], ws)
    assert ws.mask is first
    # A graph still alive (its output referenced, backward not run yet): the next call gets a fresh
    # buffer, and the pending backward still sees its own mask.
    a = xs[1].clone().requires_grad_(True)
    out_a = fake_quantize_per_tensor(a, 0.05, 7, 0, 63, ws)
    out_b = fake_quantize_per_tensor(xs[2], 0.05, 7, 0, 63, ws)
    assert ws.mask is not first
    out_a.backward(grads[1])
    _, mask_a = _reference_fake_quant(xs[1], 0.05, 7, 0, 63)
    assert torch.equal(a.grad, grads[1] * mask_a) and out_b.shape == xs[2].shape
    assert copy.deepcopy(ws).mask is None
    import pickle

    assert pickle.loads(pickle.dumps(ws)).mask is None  # (its weakref to a live node is not pickled)


def test_prepared_model_pickles_after_a_training_step(tmp_path):
    # The mask workspace holds a weakref to the last backward node: saved as an empty workspace.
    from torch import nn

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    quantizer = quanta.Quantizer(model, {"global_config": {"milestones": [0, 0, 10, 10]}})
    qat = quantizer.prepare(example_inputs=torch.randn(1, 8))
    x = torch.randn(4, 8)
    qat(x).sum().backward()
    quantizer.step()
    path = tmp_path / "qat.pt"
    torch.save(qat, path)
    loaded = torch.load(path, weights_only=False)
    assert torch.equal(loaded(x), qat(x))


def test_activation_output_and_gradient_buffers_are_reused_only_when_nothing_holds_them():
    # The forward's output and the backward's gradient go into last step's buffers when nothing but
    # the workspace references their memory: a kept output (or a detached alias of it), a gradient
    # stored as a leaf's .grad, a live graph or a held storage object get fresh memory.
    from quanta.fx.fake_quant import _MaskWorkspace

    torch.manual_seed(4)
    ws = _MaskWorkspace()
    x, g = torch.randn(4, 16) * 3, torch.randn(4, 16)
    ref, mask = _reference_fake_quant(x, 0.05, 7, 0, 63)

    def step(leaf, keep=None):
        out = fake_quantize_per_tensor(leaf, 0.05, 7, 0, 63, ws)
        ptr = out.data_ptr()
        if keep is not None:
            keep.append(out.detach())
        h = out * 1.0  # an op between: the fake quant's gradient is not the caller's
        h.backward(g)
        return ptr

    a = x.clone().requires_grad_(True)
    first = step(a)
    grad_a = a.grad  # the leaf's gradient is the backward's buffer (autograd stole it)
    b = x.clone().requires_grad_(True)
    assert step(b) == first  # the output buffer was free: reused
    assert grad_a.data_ptr() != b.grad.data_ptr()  # a.grad still holds its memory: not reused
    assert torch.equal(grad_a, g * mask) and torch.equal(b.grad, g * mask)
    kept: list = []
    assert step(x.clone().requires_grad_(True), kept) == first
    second = step(x.clone().requires_grad_(True))
    assert second != first  # the last step's output is still referenced (a detached alias)
    assert torch.equal(kept[0].view(torch.int32), ref.view(torch.int32))
    kept.clear()
    held = ws.output.buf.untyped_storage()
    assert step(x.clone().requires_grad_(True)) != second  # its storage object is held elsewhere
    del held
    # A graph still alive: its output is not overwritten by the next call.
    out_1 = fake_quantize_per_tensor(x, 0.05, 7, 0, 63, ws)
    out_2 = fake_quantize_per_tensor(x * 2, 0.05, 7, 0, 63, ws)
    assert out_1.data_ptr() != out_2.data_ptr()
    assert torch.equal(out_1.view(torch.int32), ref.view(torch.int32))
    # Double backward (create_graph) and non-contiguous inputs take the allocating path.
    c = x.clone().requires_grad_(True)
    (gc,) = torch.autograd.grad(fake_quantize_per_tensor(c, 0.05, 7, 0, 63, ws), c, g, create_graph=True)
    assert torch.equal(gc, g * mask)
    xt = x.t()
    assert torch.equal(fake_quantize_per_tensor(xt, 0.05, 7, 0, 63, ws), ref.t())


def test_workspace_buffers_from_inference_mode_are_not_reused_in_training():
    # Validation under torch.inference_mode() between training steps: its buffers are inference
    # tensors, which a training step may not write or save (it raised RuntimeError).
    from quanta.fx.fake_quant import _MaskWorkspace

    ws = _MaskWorkspace()
    x, g = torch.randn(4, 8) * 3, torch.randn(4, 8)
    with torch.inference_mode():
        evaluated = fake_quantize_per_tensor(x, 0.05, 7, 0, 63, ws)
    leaf = x.clone().requires_grad_(True)
    out = fake_quantize_per_tensor(leaf, 0.05, 7, 0, 63, ws)
    out.backward(g)
    ref, mask = _reference_fake_quant(x, 0.05, 7, 0, 63)
    assert torch.equal(out.detach(), ref) and torch.equal(evaluated, ref) and torch.equal(leaf.grad, g * mask)
    with torch.inference_mode():
        assert torch.equal(fake_quantize_per_tensor(x, 0.05, 7, 0, 63, ws), ref)


def _old_symmetric_qparams(min_val, max_val, qmin, qmax):
    max_abs = torch.maximum(min_val.abs(), max_val.abs())
    scale = (max_abs - (-max_abs)) / (qmax - qmin)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_symmetric_qparams_in_place_arithmetic_is_bit_identical(dtype):
    impl = quanta.registry.get("scheme", "symmetric").obj
    big = 3e38 if dtype == torch.float32 else 60000.0
    lo = torch.tensor([-1.0, 0.0, -0.0, -0.0, float("nan"), -2.5, -big, 1e-30, -float("inf"), 0.3, -1e-7], dtype=dtype)
    hi = torch.tensor([2.0, 0.0, 0.0, -0.0, 1.0, float("nan"), big, 3e-30, 1.0, 0.2, 1e-7], dtype=dtype)
    lo = torch.cat([lo, torch.randn(200, dtype=dtype) * 3])
    hi = torch.cat([hi, lo[11:].abs() + torch.rand(200, dtype=dtype)])
    for bits in ("int8", "int4", "uint8", "uint4"):
        qdtype = quanta.QuantSpec(dtype=bits).dtype
        qmin, qmax = impl.quant_range(qdtype)
        scale, _ = impl.qparams(lo, hi, qdtype)
        want = _old_symmetric_qparams(lo, hi, qmin, qmax)
        assert scale.dtype == dtype and torch.equal(scale.view(torch.int16 if dtype == torch.float16 else torch.int32),
                                                    want.view(torch.int16 if dtype == torch.float16 else torch.int32))


@pytest.mark.parametrize("dtype,case", [("int8", "plain"), ("int4", "plain"), ("uint4", "plain"),
                                        ("int8", "nan"), ("int8", "inf"), ("int4", "shrinking")])
def test_weight_clamp_check_from_exact_ranges_is_bit_identical(dtype, case):
    # The built-in minmax observer declares exact ranges: whether any code clamps comes from the
    # [G] ranges, not a pass over the codes. Values and gradients equal the pass-over-the-codes
    # path, clamping (int4's full grid clamps the top code) or not, with NaN and inf weights; an
    # observer subclass that overrides observe without declaring exact_ranges takes the old path.
    from quanta.fx.fake_quant import WeightFakeQuantize, _declares, fake_quantize_per_group
    from quanta.plugins.observers import MinMaxObserver

    torch.manual_seed(6)
    w = torch.randn(64, 512)
    w[3] = 0.0
    w[5, 7] = -1e-9
    if case == "nan":
        w[9, 11] = float("nan")
    if case == "inf":
        w[10, 12] = float("inf")
    spec = quanta.QuantSpec(dtype=dtype, granularity="per_channel")
    wfq = WeightFakeQuantize(spec)
    if case == "shrinking":
        class Shrinking(MinMaxObserver):
            def observe(self, values, spec, scheme):
                lo, hi = super().observe(values, spec, scheme)
                return lo * 0.5, hi * 0.5

        wfq.observer = Shrinking()
    assert _declares(wfq.observer, "exact_ranges", "observe") == (case != "shrinking")
    grad = torch.randn(64, 512)
    leaf = w.clone().requires_grad_(True)
    out = wfq(leaf)
    out.backward(grad)
    scale, zp = wfq._scheme_qparams(w)
    ref_leaf = w.clone().requires_grad_(True)
    ref = fake_quantize_per_group(ref_leaf, scale, zp, wfq.quant_min, wfq.quant_max)  # codes pass
    ref.backward(grad)
    assert torch.equal(out.detach().view(torch.int32), ref.detach().view(torch.int32))
    assert torch.equal(leaf.grad.view(torch.int32), ref_leaf.grad.view(torch.int32))


def test_conv_bn_training_rescale_gradient_is_bit_identical_and_reuses_its_buffer():
    # ConvBnQAT's training forward divides the conv output by the folding factor in place; its
    # backward (grad / factor, as autograd's div_) writes into last step's buffer when free.
    import copy

    from torch import nn

    from quanta.fx.fake_quant import ConvBnQAT

    torch.manual_seed(7)
    conv, bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.running_var.uniform_(0.5, 2.0)
    module = ConvBnQAT(conv, bn, quanta.QuantSpec(dtype="int8", granularity="per_channel"))
    reference = copy.deepcopy(module)

    def old_forward(m, x):  # the arithmetic before: autograd's own div_
        factor = m._scale_factor().detach()
        weight = m.weight_fake_quant(m.conv.weight * factor.reshape(-1, 1, 1, 1))
        return m.bn(m.conv._conv_forward(x, weight, None).div_(factor.reshape(1, -1, 1, 1)))

    pointers = []
    for step in range(3):
        x = torch.randn(4, 3, 10, 10)
        grad = torch.randn(4, 8, 10, 10)
        grad[0, 0, 0, 0] = -0.0
        got_x, ref_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out = module(got_x)
        out.backward(grad)
        ref = old_forward(reference, ref_x)
        ref.backward(grad)
        assert torch.equal(out.detach().view(torch.int32), ref.detach().view(torch.int32))
        assert torch.equal(got_x.grad.view(torch.int32), ref_x.grad.view(torch.int32))
        for a, b in zip(module.parameters(), reference.parameters()):
            assert torch.equal(a.grad.view(torch.int32), b.grad.view(torch.int32))
            a.grad = b.grad = None
        pointers.append(module._grad_buffer.buf.data_ptr())
    assert pointers[1] == pointers[2]  # freed after each step: one buffer
    copied = copy.deepcopy(module)
    assert copied._grad_buffer.buf is None


def test_channels_last_activation_keeps_its_layout_and_values():
    from quanta.fx.fake_quant import _MaskWorkspace

    ws = _MaskWorkspace()
    x = (torch.randn(2, 8, 5, 5) * 3).to(memory_format=torch.channels_last)
    ref, mask = _reference_fake_quant(x.contiguous(), 0.05, 7, 0, 63)
    for _ in range(2):
        leaf = x.detach().clone(memory_format=torch.channels_last).requires_grad_(True)
        out = fake_quantize_per_tensor(leaf, 0.05, 7, 0, 63, ws)
        assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, ref)
        g = torch.randn_like(x)
        out.backward(g)
        assert torch.equal(leaf.grad, g * mask)


def test_buffers_are_never_reused_where_torch_cannot_count_their_holders(monkeypatch):
    from quanta.fx import _reuse

    like = torch.zeros(64, 64)
    buffers = _reuse._Reusable()
    first = buffers.take(like).data_ptr()
    assert buffers.take(like).data_ptr() == first  # torch 2.13 counts the holders: reused
    # A torch release without the private storage use count: every take is fresh memory.
    monkeypatch.setattr(_reuse, "_USE_COUNT", None)
    monkeypatch.setattr(_reuse, "_ALONE", None)
    buffers = _reuse._Reusable()
    first = buffers.take(like).data_ptr()
    assert buffers.take(like).data_ptr() != first
