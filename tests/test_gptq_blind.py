"""No layer is quantized blind by ``gptq``: nn.MultiheadAttention's functional weights are
captured, unreached layers are refused before anything changes (or quantized data-free on
request), and dead input channels are reported."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quanta
from quanta.errors import QuantizationError

RECIPE = {"algorithm": "gptq", "global_config": {"dtype": "int4", "granularity": "per_block", "block_size": 32}}


def _tokens(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 12, 64, generator=g) for _ in range(n)]


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


def test_multihead_attention_out_proj_is_calibrated():
    qmodel = quanta.quantize(_encoder(), RECIPE, data=_tokens())
    rows = {r.name: r for r in qmodel.quanta_report.layers}
    out_proj = rows["layers.0.self_attn.out_proj"]
    assert out_proj.extra["method"] == "gptq" and out_proj.extra["gptq_loss"] > 0
    others = [r.rel_error for n, r in rows.items() if "out_proj" not in n]
    assert all(r.rel_error < 2 * max(others) for r in rows.values())  # comparable: not zeroed (was 100%)


def test_multihead_attention_in_proj_weight_is_calibrated():
    recipe = {**RECIPE, "module_type_configs": {"MultiheadAttention": {"dtype": "int4", "granularity": "per_block",
                                                                       "block_size": 32}}}
    qmodel = quanta.quantize(_encoder(), recipe, data=_tokens())
    row = next(r for r in qmodel.quanta_report.layers if r.name == "layers.1.self_attn.in_proj_weight")
    assert row.extra["method"] == "gptq" and row.rel_error < 0.2


class _DeadBranch(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, 64)
        self.unused = nn.Linear(64, 64)  # forward() never takes this branch

    def forward(self, x, extra=False):
        return self.unused(self.fc(x)) if extra else self.fc(x)


def test_unreached_layer_is_refused_before_anything_changes():
    model = _DeadBranch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantizationError) as err:
        quanta.quantize(model, RECIPE, data=_tokens(), inplace=True)
    message = str(err.value)
    assert "'unused'" in message and "module_name_configs" in message and "uncalibrated: rtn" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unreached_layer_options():
    left_float = quanta.quantize(_DeadBranch(), {**RECIPE, "module_name_configs": {"unused": None}}, data=_tokens())
    assert [r.name for r in left_float.quanta_report.layers] == ["fc"]
    rtn = quanta.quantize(_DeadBranch(), {**RECIPE, "uncalibrated": "rtn"}, data=_tokens())
    row = next(r for r in rtn.quanta_report.layers if r.name == "unused")
    assert row.extra["method"].startswith("rtn (no calibration inputs") and row.rel_error < 0.2


class _DeadChannels(nn.Module):
    """``fc2``'s inputs 0..2 never fire: their ReLU inputs are always negative."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 64)
        with torch.no_grad():
            self.fc1.weight[:3] = 0
            self.fc1.bias[:3] = -1

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_dead_input_channels_are_reported_and_can_be_kept():
    with pytest.warns(UserWarning, match=r"never fire.*weights zeroed.*dead_inputs: rtn.*fc2: 3"):
        zeroed = quanta.quantize(_DeadChannels(), RECIPE, data=_tokens())
    row = next(r for r in zeroed.quanta_report.layers if r.name == "fc2")
    assert row.extra["dead_inputs"] == "3: weights zeroed"
    assert torch.count_nonzero(zeroed.fc2.weight[:, :3]) == 0
    kept = quanta.quantize(_DeadChannels(), {**RECIPE, "dead_inputs": "rtn"}, data=_tokens())
    kept_row = next(r for r in kept.quanta_report.layers if r.name == "fc2")
    assert kept_row.extra["dead_inputs"] == "3 kept (rtn)"
    assert kept_row.rel_error < row.rel_error and torch.count_nonzero(kept.fc2.weight[:, :3]) > 0


def test_own_model_recipe_has_no_blind_layer():
    from quanta.examples.own_model import batches, build

    qmodel = quanta.quantize(build(), {**RECIPE, "module_type_configs": {"Embedding": None}}, data=batches(count=4))
    errors = {r.name: r.rel_error for r in qmodel.quanta_report.layers}
    assert "blocks.layers.0.self_attn.out_proj" in errors and max(errors.values()) < 0.2, errors


class _CrossAttention(nn.Module):
    """Attention of a query over a different memory: key and value widths ``kdim`` (None: packed
    ``in_proj_weight``; 32: separate ``q/k/v_proj_weight``)."""

    def __init__(self, kdim=None):
        super().__init__()
        torch.manual_seed(0)
        self.q_in, self.mem = nn.Linear(64, 64), nn.Linear(64, kdim or 64)
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True, kdim=kdim, vdim=kdim)

    def forward(self, x):
        memory = self.mem(x.flip(1) * 2 + 1)
        return self.attn(self.q_in(x), memory, memory, need_weights=False)[0]


@pytest.mark.parametrize("kdim,names", [(None, ["attn.in_proj_weight"]),
                                        (32, ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight"])])
def test_cross_attention_weights_are_gptq_solved_from_their_own_inputs(kdim, names):
    """Packed in_proj_weight in cross-attention: three Hessians (q from the query, k/v from the key
    and value); separate q/k/v weights: one each. GPTQ's attention output error on the calibration
    data is well below round-to-nearest's (it was round-to-nearest before)."""
    model, data = _CrossAttention(kdim).eval(), _tokens()
    recipe = {"module_type_configs": {"MultiheadAttention": RECIPE["global_config"]}}
    with torch.no_grad():
        ref = torch.cat([model(x) for x in data])
        gptq = quanta.quantize(model, {**recipe, "algorithm": "gptq"}, data=data)
        rtn = quanta.quantize(model, {**recipe, "algorithm": "rtn"})
        err = {name: float((torch.cat([q(x) for x in data]) - ref).norm() / ref.norm())
               for name, q in (("gptq", gptq), ("rtn", rtn))}
    rows = {r.name: r for r in gptq.quanta_report.layers}
    assert sorted(rows) == sorted(names)
    assert all(r.extra["method"] == "gptq" and r.extra["gptq_loss"] > 0 for r in rows.values())
    if kdim is None:
        assert rows["attn.in_proj_weight"].extra["hessians"] == "q, k, v"
    assert err["gptq"] < 0.7 * err["rtn"], err


def test_a_layer_at_100_percent_error_is_never_silent():
    """Every input of fc2 is dead: the reference GPTQ zeroes the whole weight (error 100%): a warning
    names the layer, whatever the algorithm (core's write_layer)."""
    model = _DeadChannels()
    with torch.no_grad():
        model.fc1.weight.zero_()
        model.fc1.bias.fill_(-1)
    with pytest.warns(UserWarning, match=r"layer 'fc2': relative error 100% after quantization \(gptq\)"):
        q = quanta.quantize(model, RECIPE, data=_tokens())
    assert q.quanta_report["fc2"].rel_error > 0.9999


def test_reach_is_checked_by_core_dry_forward_not_a_pass_of_its_own():
    # Whole-model calls: core's dry forward of batch 0 (it also tells gptq which layers the data
    # reaches; before, gptq ran a second whole pass for that), then one per batch to cache the
    # first block's inputs (stopped there).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    data = _tokens()
    quanta.quantize(model, RECIPE, data=data, inplace=True)
    assert len(calls) == 1 + len(data)
    assert [len(m._forward_pre_hooks) for m in model.modules()] == [1, 0, 0, 0]  # only ours is left
