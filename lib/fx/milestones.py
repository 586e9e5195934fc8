"""Milestones: when observers, fake quantization and batch-norm freezing switch, in ``step()`` calls.

``milestones = [observers_on, fake_quant_on, observers_off, bn_frozen]``, coremltools'
``ModuleLinearQuantizerConfig.milestones``. The k-th call of ``step()`` (k = 0, 1, ...) applies
every milestone ≤ k: observers are on when ``observers_on ≤ k < observers_off``; fake
quantization is on from ``fake_quant_on``; batch norms run in inference mode (running
statistics, no updates) from ``bn_frozen``. Before the first ``step()`` everything is off and
batch norms train normally. Without milestones (None) observers and fake quantization are on
from ``prepare`` and batch norms are never frozen.
"""

from __future__ import annotations

from typing import Any, Sequence

import attrs
import numpy as np
from torch import fx, nn

from quanta.errors import ConfigError

from .fake_quant import ActivationFakeQuantize, ConvBnQAT, WeightFakeQuantize

__all__ = ["MilestoneState", "state_at", "apply_state", "check_milestones", "freeze_batch_norms"]

_NAMES = ("observers_on", "fake_quant_on", "observers_off", "bn_frozen")


def check_milestones(value: Any, key: str = "milestones") -> tuple[int, int, int, int] | None:
    """Validate milestones: None or four non-negative integers. Raises ConfigError naming ``key``."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"expected a list of 4 non-negative integers {list(_NAMES)}, got {value!r}", key)
    if len(value) != 4:
        raise ConfigError(f"expected 4 values {list(_NAMES)}, got {len(value)}: {list(value)!r}", key)
    out = []
    for name, v in zip(_NAMES, value):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ConfigError(f"{name} must be an integer step count, got {v!r}", key)
        if v < 0:
            raise ConfigError(f"{name} must be >= 0, got {v}", key)
        out.append(int(v))
    return tuple(out)  # type: ignore[return-value]


@attrs.frozen
class MilestoneState:
    """Switches at one point of training."""

    observers: bool
    fake_quant: bool
    bn_frozen: bool


def state_at(milestones: tuple[int, int, int, int] | None, steps: int) -> MilestoneState:
    """The state after ``steps`` calls of ``step()`` (0: right after ``prepare``).

    The call with index k (``steps = k + 1``) applies every milestone ≤ k.
    """
    if milestones is None:
        return MilestoneState(observers=True, fake_quant=True, bn_frozen=False)
    if steps == 0:
        return MilestoneState(observers=False, fake_quant=False, bn_frozen=False)
    k = steps - 1
    obs_on, fq_on, obs_off, bn = milestones
    return MilestoneState(observers=obs_on <= k < obs_off, fake_quant=fq_on <= k, bn_frozen=bn <= k)


def _frozen_bn_pre_hook(module, _args):
    # A frozen standalone bn stays in inference mode even after model.train().
    module.training = False


def freeze_batch_norms(gm: nn.Module, frozen: bool) -> None:
    """Put every batch norm (inside ConvBnQAT or standalone) in or out of inference mode."""
    for m in gm.modules():
        if isinstance(m, ConvBnQAT):
            m.freeze_bn = frozen
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and not _inside_convbn(gm, m):
            handle = getattr(m, "_quanta_freeze_handle", None)
            if frozen and handle is None:
                m._quanta_freeze_handle = m.register_forward_pre_hook(_frozen_bn_pre_hook)
                m.training = False
            elif not frozen and handle is not None:
                handle.remove()
                del m._quanta_freeze_handle
                m.training = gm.training


def _inside_convbn(gm: nn.Module, bn: nn.Module) -> bool:
    return any(isinstance(m, ConvBnQAT) and m.bn is bn for m in gm.modules())


def apply_state(gm: fx.GraphModule, state: MilestoneState) -> None:
    """Set every quantizer's switches and the batch norms' mode to ``state``."""
    for m in gm.modules():
        if isinstance(m, ActivationFakeQuantize):
            m.observer_enabled = state.observers
            m.fake_quant_enabled = state.fake_quant
        elif isinstance(m, WeightFakeQuantize):
            m.fake_quant_enabled = state.fake_quant
            if getattr(m, "learnable", False):  # learnable qparams follow the observers until learning starts
                m.observer_enabled = state.observers
    freeze_batch_norms(gm, state.bn_frozen)
