"""Exporter ``compressed-tensors``: an HF directory in compressed-tensors' ``pack-quantized`` format.

The format transformers (``CompressedTensorsHfQuantizer``) and vLLM load directly, as
llm-compressor writes it. For every quantized ``Linear`` ``L``:

- ``L.weight_packed``: int32 ``[out, ceil(in * bits / 32)]``, each row one dense little-endian bit
  stream of ``code + 2**(bits-1)`` (compressed-tensors' ``pack_to_int32``);
- ``L.weight_scale``: ``[out, in // group_size]`` (group), ``[out, 1]`` (channel) or ``[1]`` (tensor),
  in the weight's dtype (as compressed-tensors initialises it) unless ``scale_dtype`` is set;
- ``L.weight_shape``: int64 ``[2]``;
- ``L.weight_zero_point`` (asymmetric only): int32 packed along the output axis (group/channel),
  int8 ``[1]`` (tensor).

``config.json`` gains ``quantization_config`` (``quant_method: compressed-tensors``,
``format: pack-quantized``, ``quantization_status: compressed``, one config group per distinct
weight scheme, and an ``ignore`` list of the Linear layers left float). The values
compressed-tensors decompresses, ``(q - zp).to(scale_dtype) * scale``, equal quanta's
``(codes - zero_point) * scale`` computed in that dtype: bit for bit in float32.

What the format cannot hold is refused before anything is written, naming the layer: weights of
modules other than ``nn.Linear``, lookup-table grids, codes of 3, 5, 6 or 7 bits (older
compressed-tensors and vLLM read only 2, 4 and 8 bits packed densely), blocks along another axis,
and activation quantization (quanta's fake-quantize modules; this exporter writes weights only).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import attrs
import torch

import quanta
from quanta._files.atomic import atomic_dir
from quanta.errors import ConfigError, QuantizationError
from quanta._records.packing import pack_codes
from quanta.contracts import Exporter
from quanta.record import QuantizedWeight, records
from quanta._files.saving import (DEFAULT_MAX_SHARD_BYTES, activation_quantization_sites, copy_tokenizer_files, tied_tensors, tokenizer_dir_of,
                           transformers_config_of, write_shards)

__all__ = ["CompressedTensorsExporter", "CompressedTensorsExportConfig", "pack_rows_int32", "SUPPORTED_BITS"]

#: Bit widths whose dense packing is the same in every compressed-tensors version (32 % bits == 0).
SUPPORTED_BITS = (2, 4, 8)
_SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@attrs.frozen(kw_only=True)
class CompressedTensorsExportConfig:
    """Options of the ``compressed-tensors`` exporter."""

    scale_dtype: str | None = attrs.field(
        default=None, metadata={"doc": "'float32', 'float16' or 'bfloat16'; None = each weight's dtype "
                                       "(what compressed-tensors writes)"})
    max_shard_bytes: int = attrs.field(
        default=DEFAULT_MAX_SHARD_BYTES, metadata={"doc": "bytes per safetensors shard (an index file above it)"})

    @scale_dtype.validator
    def _check_scale_dtype(self, _attr, value) -> None:
        if value is not None and value not in _SCALE_DTYPES:
            raise ConfigError(f"must be one of {', '.join(_SCALE_DTYPES)} or null, got {value!r}", "scale_dtype")

    @max_shard_bytes.validator
    def _check_shard(self, _attr, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"must be a positive integer, got {value!r}", "max_shard_bytes")


def pack_rows_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' ``pack_to_int32`` of signed ``codes [rows, cols]`` (int8 in
    ``[-2**(bits-1), 2**(bits-1))``): int32 ``[rows, ceil(cols * bits / 32)]``, each row one
    little-endian bit stream of ``code + 2**(bits-1)``."""
    rows, cols = codes.shape
    offset = 1 << (bits - 1)
    padded = math.ceil(cols / 32) * 32  # a row of 32 codes is exactly `bits` int32 words
    unsigned = torch.zeros(rows, padded, dtype=torch.uint8)
    unsigned[:, :cols] = (codes.to(torch.int16) + offset).to(torch.uint8)
    packed = pack_codes(unsigned, bits, signed=False).reshape(rows, padded * bits // 8)
    if sys.byteorder != "little":
        raise QuantizationError("the compressed-tensors exporter needs a little-endian host (its int32 words)")
    words = packed.contiguous().view(torch.int32)
    return words[:, : math.ceil(cols * bits / 32)].contiguous()


def _weights_args(name: str, rec: QuantizedWeight) -> tuple[dict, int]:
    """The compressed-tensors ``weights`` args of a record, and the offset subtracted from its codes."""
    bits = rec.spec.dtype.bits
    if rec.lut is not None or rec.grid != "affine":
        raise QuantizationError("compressed-tensors pack-quantized stores integer grids only, not a lookup table", name)
    if bits not in SUPPORTED_BITS:
        raise QuantizationError(f"compressed-tensors pack-quantized is written for {', '.join(map(str, SUPPORTED_BITS))}"
                                f" bits here; {rec.spec.dtype} codes are not", name)
    if len(rec.shape) != 2 or (rec.channel_axis, rec.input_axis) != (0, 1):
        raise QuantizationError(f"compressed-tensors stores [out, in] Linear weights; this one has shape {rec.shape} "
                                f"with output axis {rec.channel_axis}", name)
    out_b, in_b = rec.block_sizes
    if out_b == 0 and in_b == 0:
        strategy, group = "tensor", None
    elif out_b == 1 and in_b == 0:
        strategy, group = "channel", None
    elif out_b == 1 and in_b > 0:
        strategy, group = "group", int(in_b)
    else:
        raise QuantizationError(f"block sizes {tuple(rec.block_sizes)} have no compressed-tensors strategy "
                                "(tensor, channel or group along the input axis)", name)
    offset = 0 if rec.spec.dtype.signed else 1 << (bits - 1)
    zp = rec.zero_point
    symmetric = zp is None or bool((zp.to(torch.int16) == offset).all())
    args = {"num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": group, "strategy": strategy,
            "dynamic": False}
    if not symmetric:
        args["zp_dtype"] = "torch.int8"
    return args, offset


class CompressedTensorsExporter(Exporter):
    """Writes an HF directory in compressed-tensors ``pack-quantized`` format (transformers, vLLM)."""

    name = "compressed-tensors"
    description = ("HF directory in compressed-tensors pack-quantized format (int2/4/8 Linear weights: "
                   "transformers and vLLM load it)")
    suffix = None
    writes_directory = True
    grids = frozenset({"affine"})
    config_class = CompressedTensorsExportConfig

    def check(self, model: torch.nn.Module, example_inputs: Any = None) -> None:
        """Refuse, before anything is written, a model the format cannot hold (QuantizationError or
        ConfigError naming the layer)."""
        self._plan(model)

    def _plan(self, model: torch.nn.Module) -> dict[str, tuple[dict, int]]:
        """Record name -> (weights args, code offset), or raise naming the first layer the format
        cannot hold."""
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"the compressed-tensors exporter takes a torch model, got {type(model).__name__}", "model")
        if transformers_config_of(model) is None:
            raise ConfigError("compressed-tensors directories are transformers models; this is a "
                              f"{type(model).__name__} without a transformers config", "model")
        sites = activation_quantization_sites(model)
        if sites:
            raise QuantizationError("the model quantizes activations, which this exporter does not write "
                                    "(it writes weight-only pack-quantized layers); export the weight-only "
                                    "model, or use the coreml exporter", sites[0])
        recs = records(model)
        if not recs:
            raise QuantizationError("the model has no quantized weights (run quanta.quantize first)")
        out = {}
        for name, rec in recs.items():
            module_name, _, param = name.rpartition(".")
            module = model.get_submodule(module_name)
            if not isinstance(module, torch.nn.Linear) or param != "weight":
                raise QuantizationError(f"compressed-tensors pack-quantized holds Linear weights only, not "
                                        f"{type(module).__name__}.{param} (leave it float in the recipe, e.g. "
                                        f"module_type_configs: {{{type(module).__name__}: null}})", name)
            out[name] = _weights_args(name, rec)
        return out

    def export(self, model: torch.nn.Module, path, *, example_inputs: Any = None, overwrite: bool = False) -> str:
        """Write ``model`` to the directory ``path``; returns it. Options in ``self.config``
        (:class:`CompressedTensorsExportConfig`). ``example_inputs`` is unused (nothing is traced)."""
        config = self.config
        plan = self._plan(model)
        hf_config = transformers_config_of(model)
        recs = records(model)
        state = model.state_dict()
        skip = set(recs) | {k for k in state if "_quanta_" in k}
        aliases = tied_tensors(state)
        tensors: list = []
        groups: dict[str, dict] = {}
        for name, rec in recs.items():
            args, offset = plan[name]
            key = json.dumps(args, sort_keys=True)
            groups.setdefault(key, {"args": args, "targets": []})["targets"].append(name.rpartition(".")[0])
            weight = model.get_parameter(name)
            scale_dtype = _SCALE_DTYPES[config.scale_dtype] if config.scale_dtype else weight.dtype
            tensors += _layer_tensors(name.rpartition(".")[0], rec, args, offset, scale_dtype)
        for key, t in state.items():
            if key in skip or key in aliases:
                continue
            tensors.append((key, t.numel() * t.element_size(), lambda t=t: t.detach().cpu().contiguous()))
        linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        quantized = {n.rpartition(".")[0] for n in recs}
        ignore = [n for n in linear_names if n not in quantized]
        config_groups = {}
        for i, group in enumerate(groups.values()):
            targets = ["Linear"] if len(groups) == 1 else sorted(group["targets"])
            config_groups[f"group_{i}"] = {"targets": targets, "weights": group["args"], "input_activations": None,
                                           "output_activations": None, "format": "pack-quantized"}
        quant_config = {
            "config_groups": config_groups, "quant_method": "compressed-tensors", "kv_cache_scheme": None,
            "format": "pack-quantized", "quantization_status": "compressed",
            "global_compression_ratio": None, "ignore": ignore,
        }
        with atomic_dir(path, overwrite=overwrite) as staging:
            write_shards(tensors, staging, config.max_shard_bytes, metadata={"format": "pt"})
            cfg = hf_config.to_dict()
            cfg["quantization_config"] = quant_config
            (staging / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
            generation = getattr(model, "generation_config", None)
            if generation is not None and getattr(model, "can_generate")():
                generation.save_pretrained(str(staging))
            tok = tokenizer_dir_of(model)
            if tok is not None:
                copy_tokenizer_files(tok, staging)
        return os.fspath(Path(path))


def _layer_tensors(module: str, rec: QuantizedWeight, args: dict, offset: int, scale_dtype: torch.dtype) -> list:
    bits = args["num_bits"]
    out_features, in_features = rec.shape
    n_words = math.ceil(in_features * bits / 32)
    scale_shape = (1,) if args["strategy"] == "tensor" else tuple(rec.scale.shape)
    items = [
        (f"{module}.weight_packed", out_features * n_words * 4,
         lambda: pack_rows_int32(rec.codes.to(torch.int16) - offset, bits)),
        (f"{module}.weight_scale", math.prod(scale_shape) * torch.finfo(scale_dtype).bits // 8,
         lambda: rec.scale.detach().reshape(scale_shape).to(scale_dtype).cpu().contiguous()),
        (f"{module}.weight_shape", 16, lambda: torch.tensor(rec.shape, dtype=torch.int64)),
    ]
    if not args["symmetric"]:
        zero_point = rec.zero_point
        if zero_point is None:
            raise QuantizationError(f"{module}: an asymmetric record has no zero point", module)
        zp = lambda: zero_point.detach().to(torch.int16).cpu() - offset  # noqa: E731
        if args["strategy"] == "tensor":
            items.append((f"{module}.weight_zero_point", 1, lambda: zp().reshape(1).to(torch.int8)))
        else:
            rows, groups = rec.scale.shape
            items.append((f"{module}.weight_zero_point", math.ceil(rows * bits / 32) * groups * 4,
                          lambda: pack_rows_int32(zp().reshape(rows, groups).t().contiguous(), bits).t().contiguous()))
    return items


@quanta.hookimpl
def register_exporters(register) -> None:
    register(CompressedTensorsExporter())
