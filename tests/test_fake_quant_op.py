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


@pytest.mark.parametrize("qmin,qmax,zero_point", [(0, 255, 127), (0, 255, 0), (-128, 127, -128), (-128, 127, 5),
                                                  (-127, 127, 0)])
def test_per_tensor_is_bit_identical_with_nan_inf_and_signed_zero(qmin, qmax, zero_point):
    # Activations: the zero point folded into the clamp bounds gives the old arithmetic's values
    # (a code of -0.0 dequantizes to 0.0 as (q + zp) - zp did) and its gradient.
    torch.manual_seed(2)
    x = torch.randn(6, 40) * 4
    x[0, :4] = torch.tensor([-1e-9, -0.0, 0.0, 1e-9])
    x[1, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    x[2, :2] = torch.tensor([1e30, -1e30])
    grad = torch.randn(6, 40)
    grad[0, 0] = -0.0
    leaf = x.clone().requires_grad_(True)
    out = fake_quantize_per_tensor(leaf, 0.05, zero_point, qmin, qmax)
    out.backward(grad)
    ref, mask = _reference_fake_quant(x, 0.05, zero_point or None, qmin, qmax)
    assert torch.equal(out.detach().view(torch.int32), ref.view(torch.int32))
    assert torch.equal(leaf.grad.view(torch.int32), (grad * mask).view(torch.int32))


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
