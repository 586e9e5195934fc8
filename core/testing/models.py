"""Small reference models and calibration data for testing plugins (no extras, no downloads).

Three models cover what quantizing plugins meet in practice: an MLP (Linear + LayerNorm), a
small CNN (Conv2d + BatchNorm2d), and a token-id model (Embedding + Linear, keyword inputs).
Each comes with calibration batches in every form ``quanta.quantize(..., data=...)`` accepts:
a list of tensors, a list of tuples (positional inputs), a list of dicts (keyword inputs) and
a generator.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import attrs
import torch
from torch import nn

__all__ = ["MLP", "SmallCNN", "TokenModel", "ReferenceModel", "REFERENCE_MODELS", "reference_model",
           "calibration_data", "DATA_FORMS"]

#: The forms calibration data can take: ``"list"`` (tensors), ``"tuple"`` (tuples of positional
#: inputs), ``"dict"`` (keyword inputs) and ``"generator"`` (a generator of tensors, read once).
DATA_FORMS = ("list", "tuple", "dict", "generator")


class MLP(nn.Sequential):
    """``Linear(64, 32) -> LayerNorm(32) -> ReLU -> Linear(32, 16)``; input ``[B, 64]``, output ``[B, 16]``."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(64, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 16))


class SmallCNN(nn.Module):
    """``Conv2d(3, 8, 3) -> BatchNorm2d -> ReLU -> Conv2d(8, 16, 3) -> pool -> Linear(16, 10)``;
    input ``[B, 3, 12, 12]``, output ``[B, 10]``. The batch norm carries running statistics
    (buffers), so ``inplace`` restore is tested on buffers too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


class TokenModel(nn.Module):
    """``Embedding(100, 32) -> Linear(32, 32) -> ReLU -> Linear(32, 100)`` over token ids; input
    ``input_ids [B, T]`` (int64) and an optional ``attention_mask [B, T]``; output ``[B, T, 100]``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, 100)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.relu(self.proj(self.embed(input_ids)))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head(h)


@attrs.frozen
class ReferenceModel:
    """A reference model: ``name``, a ``factory`` making it (seeded: equal weights every call),
    ``example(batch_size)`` making one input batch (a tensor, or for ``token`` a dict of
    keyword inputs), and ``keyword`` (the name of the first input when fed as a dict)."""

    name: str
    factory: Callable[[], nn.Module]
    example: Callable[[torch.Generator, int], Any]
    keyword: str

    def make(self, seed: int = 0) -> nn.Module:
        """A fresh model with weights drawn from ``seed`` (eval mode)."""
        torch.manual_seed(seed)
        return self.factory().eval()


def _mlp_input(gen: torch.Generator, batch: int) -> torch.Tensor:
    return torch.randn(batch, 64, generator=gen)


def _cnn_input(gen: torch.Generator, batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 12, 12, generator=gen)


def _token_input(gen: torch.Generator, batch: int) -> torch.Tensor:
    return torch.randint(0, 100, (batch, 8), generator=gen)


#: The reference models by name: ``mlp``, ``cnn`` and ``token``.
REFERENCE_MODELS: dict[str, ReferenceModel] = {m.name: m for m in (
    ReferenceModel("mlp", MLP, _mlp_input, "input"),
    ReferenceModel("cnn", SmallCNN, _cnn_input, "x"),
    ReferenceModel("token", TokenModel, _token_input, "input_ids"),
)}


def reference_model(name: str = "mlp", seed: int = 0) -> nn.Module:
    """A fresh reference model (``"mlp"``, ``"cnn"`` or ``"token"``), weights drawn from ``seed``."""
    try:
        return REFERENCE_MODELS[name].make(seed)
    except KeyError:
        raise ValueError(f"unknown reference model {name!r} (allowed: {', '.join(REFERENCE_MODELS)})") from None


def calibration_data(name: str = "mlp", form: str = "list", n: int = 4, batch_size: int = 2,
                     seed: int = 0) -> list | Iterator:
    """``n`` calibration batches for reference model ``name`` in ``form`` (see ``DATA_FORMS``).

    ``"list"``: tensors; ``"tuple"``: 1-tuples of positional inputs; ``"dict"``: keyword inputs
    (``{"input_ids": ..., "attention_mask": ...}`` for ``token``; for models whose forward takes
    one tensor, ``{<its argument name>: tensor}``); ``"generator"``: a generator of tensors
    (consumed once). The same ``seed`` gives the same batches in every form.
    """
    if form not in DATA_FORMS:
        raise ValueError(f"unknown data form {form!r} (allowed: {', '.join(DATA_FORMS)})")
    ref = REFERENCE_MODELS[name] if name in REFERENCE_MODELS else None
    if ref is None:
        raise ValueError(f"unknown reference model {name!r} (allowed: {', '.join(REFERENCE_MODELS)})")
    gen = torch.Generator().manual_seed(seed)
    tensors = [ref.example(gen, batch_size) for _ in range(n)]
    if form == "list":
        return tensors
    if form == "tuple":
        return [(t,) for t in tensors]
    if form == "dict":
        if name == "token":
            return [{"input_ids": t, "attention_mask": torch.ones_like(t)} for t in tensors]
        return [{ref.keyword: t} for t in tensors]
    return (t for t in tensors)
