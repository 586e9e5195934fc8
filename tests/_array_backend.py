"""A backend beyond torch for the tests (an ONNX-style model: named weight tensors and an
explicit graph, no ``nn.Module``), and its plugin object."""

from __future__ import annotations

import copy

import torch

import quanta
from quanta.contracts import Backend, Unit


class ArrayModel:
    """``y = relu(x @ w1.T) @ w2.T``: weights by name, records by name (what an ONNX wrapper holds)."""

    def __init__(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.weights = {"w1": torch.randn(16, 8, generator=gen), "w2": torch.randn(4, 16, generator=gen)}
        self.records: dict = {}

    def __call__(self, x):
        return torch.relu(x @ self.weights["w1"].T) @ self.weights["w2"].T


class ArrayBackend(Backend):
    name = "arrays"
    description = "named weight tensors without nn.Module (an ONNX-style test backend)"
    priority = 20
    suffixes = (".arrays",)  # a safetensors file of the weights (the CLI loads it through load())

    def load(self, path):
        from safetensors.torch import load_file

        model = ArrayModel()
        model.weights = dict(load_file(str(path)))
        return model

    def accepts(self, model):
        return isinstance(model, ArrayModel)

    def units(self, model):
        return [Unit(name, "MatMul", ("MatMul",), "weight", w.shape, 0, 1, name) for name, w in model.weights.items()]

    def copy(self, model, share=()):
        return copy.deepcopy(model)

    def read_weight(self, model, unit):
        return model.weights[unit.name]

    def write(self, model, unit, record, values=None):
        model.records[unit.name] = record
        model.weights[unit.name] = (record.dequantize() if values is None else values).reshape(unit.shape).clone()

    def snapshot(self, model, units, everything=False, share=()):
        return {k: v.clone() for k, v in model.weights.items()}, dict(model.records)

    def restore(self, model, snapshot):
        weights, records = snapshot
        model.weights = {k: v.clone() for k, v in weights.items()}
        model.records = dict(records)

    def records(self, model):
        return dict(model.records)


class ArrayPlugin:
    """The plugin object registering ``ArrayBackend`` (``backend`` may be a variant)."""

    def __init__(self, backend: Backend | None = None):
        self.backend = backend or ArrayBackend()

    @quanta.hookimpl
    def register_backends(self, register):
        register(self.backend)
