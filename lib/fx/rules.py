"""``ActivationRules``: what a backend states about activation quantization.

The graph machinery asks a backend (``backend.activation_rules()``) instead of hard-coding
which ops are quantized: a Core ML backend and the torch backend can state different rules.
"""

from __future__ import annotations

import operator
from typing import Any

import attrs
import torch
from torch import nn

from quanta._records.spec import QuantDtype, parse_dtype

__all__ = ["ActivationRules", "default_torch_rules"]


def _dtypes(values) -> tuple[QuantDtype, ...]:
    return tuple(parse_dtype(v, "activation_dtypes") for v in values)


@attrs.frozen(kw_only=True)
class ActivationRules:
    """Which ops get quantized activations, which patterns fuse, which dtypes activations take.

    Attributes:
        weighted_modules: module types whose weight is fake-quantized and whose output is an
            int8/uint8 activation (e.g. Linear, Conv2d).
        batch_norms: module types folded into a preceding weighted conv (conv+bn(+relu)).
        foldable_convs: the weighted module types a batch norm folds into.
        fused_activations: modules / functions / method names that fuse with the op before
            them: the output observer goes after them, not between (linear+relu, add+relu).
        quantized_functions: functions (``call_function`` targets) and method names
            (``call_method``) whose tensor inputs and output are quantized activations
            (add, mul, matmul, cat).
        passthrough: modules / functions / method names that keep values on their input's
            integer grid (max-pool, flatten, reshape, dropout, relu): an input reached through
            them from a quantized output needs no new quantize/dequantize pair.
        activation_dtypes: the dtypes an activation may take (a deployment target's limit).
        fusion_patterns: the patterns above as tuples of names, for documentation and ``quanta plugins``.
    """

    weighted_modules: tuple[type, ...]
    batch_norms: tuple[type, ...] = ()
    foldable_convs: tuple[type, ...] = ()
    fused_activations: tuple[Any, ...] = ()
    quantized_functions: tuple[Any, ...] = ()
    passthrough: tuple[Any, ...] = ()
    activation_dtypes: tuple[QuantDtype, ...] = attrs.field(default=(QuantDtype(8, True), QuantDtype(8, False)),
                                                           converter=_dtypes)
    fusion_patterns: tuple[tuple[str, ...], ...] = ()

    # -- questions the graph machinery asks about one fx node --------------------------------
    def _matches(self, node, module, table) -> bool:
        if node.op == "call_module":
            return module is not None and isinstance(module, tuple(t for t in table if isinstance(t, type)))
        if node.op == "call_function":
            return any(node.target is t for t in table if callable(t) and not isinstance(t, type))
        if node.op == "call_method":
            return node.target in tuple(t for t in table if isinstance(t, str))
        return False

    def is_weighted(self, module) -> bool:
        return isinstance(module, self.weighted_modules)

    def is_fused_activation(self, node, module=None) -> bool:
        return self._matches(node, module, self.fused_activations)

    def is_quantized_function(self, node, module=None) -> bool:
        return node.op in ("call_function", "call_method") and self._matches(node, module, self.quantized_functions)

    def is_passthrough(self, node, module=None) -> bool:
        return self._matches(node, module, self.passthrough)

    def check_dtype(self, dtype: QuantDtype, key: str = "activation_dtype") -> None:
        """Raise ConfigError naming ``key`` if activations cannot take ``dtype`` under these rules."""
        from quanta.errors import ConfigError

        if dtype not in self.activation_dtypes:
            allowed = ", ".join(str(d) for d in self.activation_dtypes)
            raise ConfigError(f"activations cannot be {dtype} for this backend (allowed: {allowed})", key)


def _name(x: Any) -> str:
    if isinstance(x, str):
        return f".{x}()"
    return getattr(x, "__name__", repr(x))


def default_torch_rules() -> ActivationRules:
    """The torch backend's rules (also a sound default for Core ML's int8 quantize/dequantize ops)."""
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    bns = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    relus: tuple[Any, ...] = (nn.ReLU, nn.ReLU6, torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6,
                              "relu")
    funcs: tuple[Any, ...] = (operator.add, torch.add, operator.iadd, operator.mul, torch.mul, operator.matmul,
                              torch.matmul, torch.bmm, torch.cat, "add", "mul", "matmul", "bmm")
    passthrough: tuple[Any, ...] = (
        nn.ReLU, nn.ReLU6, torch.nn.functional.relu6, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten,
        nn.Dropout, nn.Identity,
        torch.relu, torch.nn.functional.relu, torch.flatten, torch.nn.functional.max_pool2d,
        torch.nn.functional.max_pool1d, torch.nn.functional.dropout, torch.reshape, torch.transpose, torch.permute,
        operator.getitem,
        "relu", "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
    )
    patterns = tuple((c.__name__, b.__name__, "ReLU") for c, b in zip(convs, bns)) + tuple(
        (c.__name__, b.__name__) for c, b in zip(convs, bns)) + tuple(
        (c.__name__, "ReLU") for c in convs) + (("Linear", "ReLU"), ("add", "ReLU")) + tuple(
        (c.__name__, "ReLU6") for c in (*convs, nn.Linear))
    return ActivationRules(
        weighted_modules=(nn.Linear, *convs), batch_norms=bns, foldable_convs=convs, fused_activations=relus,
        quantized_functions=funcs, passthrough=passthrough, fusion_patterns=patterns,
    )


def describe_rules(rules: ActivationRules) -> dict[str, list[str]]:
    """The rules as names (for docs and listings)."""
    return {
        "weighted_modules": [_name(t) for t in rules.weighted_modules],
        "fusion_patterns": ["+".join(p) for p in rules.fusion_patterns],
        "quantized_functions": [_name(t) for t in rules.quantized_functions],
        "passthrough": [_name(t) for t in rules.passthrough],
        "activation_dtypes": [str(d) for d in rules.activation_dtypes],
    }


__all__ += ["describe_rules"]
