"""Milestones, step by step: observer state, fake-quant state, batch-norm mode."""

from __future__ import annotations

import pytest
import torch

import quanta
from quanta.fx import ActivationFakeQuantize, ConvBnQAT, WeightFakeQuantize
from quanta.fx.milestones import state_at

from _fx_helpers import DigitsCNN


def _state(gm):
    acts = [m for m in gm.modules() if isinstance(m, ActivationFakeQuantize)]
    weights = [m for m in gm.modules() if isinstance(m, WeightFakeQuantize)]
    bns = [m for m in gm.modules() if isinstance(m, ConvBnQAT)]
    obs = {m.observer_enabled for m in acts}
    fq = {m.fake_quant_enabled for m in acts} | {m.fake_quant_enabled for m in weights}
    frozen = {m.freeze_bn for m in bns}
    assert len(obs) == len(fq) == len(frozen) == 1, (obs, fq, frozen)
    return obs.pop(), fq.pop(), frozen.pop()


def test_state_table():
    ms = (1, 2, 4, 3)
    expected = {0: (False, False, False), 1: (False, False, False), 2: (True, False, False),
                3: (True, True, False), 4: (True, True, True), 5: (False, True, True), 9: (False, True, True)}
    for steps, (obs, fq, bn) in expected.items():
        s = state_at(ms, steps)
        assert (s.observers, s.fake_quant, s.bn_frozen) == (obs, fq, bn), steps
    s = state_at(None, 0)
    assert (s.observers, s.fake_quant, s.bn_frozen) == (True, True, False)
    s = state_at((0, 1000, 1000, 0), 1)  # the seed's calibration recipe after one step()
    assert (s.observers, s.fake_quant, s.bn_frozen) == (True, False, True)


def test_milestones_step_by_step_on_a_model():
    torch.manual_seed(0)
    q = quanta.Quantizer(DigitsCNN(), {"global_config": {"milestones": [1, 2, 4, 3]}})
    gm = q.prepare(example_inputs=torch.rand(2, 1, 8, 8))
    gm.train()
    x = torch.rand(16, 1, 8, 8)
    act = gm.relu1_act_fq
    bn = gm.conv1.bn
    history = []
    for k in range(6):
        before_min = float(act.observer.min_val)
        bn_mean = bn.running_mean.clone()
        out = gm(x)
        history.append((_state(gm), before_min != float(act.observer.min_val),
                        not torch.equal(bn_mean, bn.running_mean)))
        q.step()
        assert q.step_count == k + 1
        del out
    # (observers, fake quant, bn frozen), observer moved?, bn stats moved?
    assert history == [
        ((False, False, False), False, True),   # after prepare: all off, bn trains
        ((False, False, False), False, True),   # step 0 applied milestones <= 0: none
        ((True, False, False), True, True),     # step 1: observers on
        ((True, True, False), False, True),     # step 2: fake quant on (range already seen, same x)
        ((True, True, True), False, False),     # step 3: bn frozen: running stats stay
        ((False, True, True), False, False),    # step 4: observers off
    ]
    # a frozen bn stays frozen through model.train()
    gm.train()
    assert gm.conv1.freeze_bn


def test_fake_quant_changes_outputs_only_when_on():
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    q = quanta.Quantizer(model, {"global_config": {"milestones": [0, 1, 5, 0]}})
    gm = q.prepare(example_inputs=torch.rand(2, 1, 8, 8)).eval()
    x = torch.rand(8, 1, 8, 8)
    q.step()
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)  # observing only: float outputs
    q.step()
    assert not torch.allclose(gm(x), model(x), atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    ([0, 1, 2], "4 values"), ([0, -1, 2, 3], ">= 0"), ([0, 1.5, 2, 3], "integer"), ("0,1,2,3", "list"),
])
def test_bad_milestones_fail_before_the_model_is_touched(bad, match):
    model = DigitsCNN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(quanta.ConfigError, match=match) as err:
        quanta.Quantizer(model, {"global_config": {"milestones": bad}})
    assert "milestones" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_key_named():
    with pytest.raises(quanta.ConfigError, match="milestone") as err:
        quanta.Quantizer(DigitsCNN(), {"global_config": {"milestone": [0, 0, 0, 0]}})
    assert "did you mean 'milestones'" in str(err.value)
