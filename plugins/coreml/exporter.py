"""Exporter ``coreml``: a quantized torch model -> ``.mlpackage`` whose stored weights are quanta's codes.

Flow: copy the model, write coremltools' ``_COREML_`` metadata from each record
(:mod:`.metadata`), ``torch.jit.trace``, ``ct.convert(convert_to="mlprogram")`` for the
lowest target that fits (or the one asked for, validated first), save, then read the saved
program back and check that every record's codes are stored exactly, or raise.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

import quanta
from quanta._files.atomic import atomic_dir, check_destination
from quanta.errors import ConfigError, QuantizationError
from quanta.contracts import Exporter
from quanta.contracts.hooks import Registrar
from quanta._files.faults import fault_delay
from quanta.record import records as _records

from . import fp16_cast, metadata, targets, torch_ops
from .ct_import import import_coremltools, quiet_conversion
from .overflow import Fp32WhereOverflowing, find_fp16_overflow
from .inputs import ExampleInputs, KeywordInputs, core_ml_dtype, example_inputs as normalize_inputs

__all__ = ["CoreMLExporter", "CoreMLExportConfig", "stored_weights", "has_activation_quantization",
           "conversion_pass_pipeline", "core_ml_inputs", "max_sequence_length", "is_token_model"]

_PRECISIONS = ("auto", "float16", "float32")
#: The largest batch of a flexible batch dimension (``flexible_batch: true``): ML programs need a bound.
MAX_FLEXIBLE_BATCH = 64
#: coremltools 9.0 pass that rewrites dequantize(s1) -> reshape -> quantize(s2) into a bare
#: reshape without checking s1 == s2: wrong numbers for W8A8 models (COREML_FACTS.md).
UNSAFE_PASSES = ("common::int_op_canonicalization",)


@attrs.frozen(kw_only=True)
class CoreMLExportConfig:
    """Options of the ``coreml`` exporter (``quanta.export(..., format="coreml", **options)``)."""

    minimum_deployment_target: Any = attrs.field(
        default=None, converter=targets.parse_target,
        metadata={"doc": "ct.target or 'iOS16'/'iOS17'/'iOS18'/'macOS13'..; None = lowest that fits the model"})
    compute_precision: str = attrs.field(
        default="auto", metadata={"doc": "'auto': float16; if it overflows on the example inputs, converted again "
                                         "with the ops that would overflow in float32 (a warning names them; the whole "
                                         "program in float32 if it still overflows); 'float16' (an overflow is "
                                         "refused); 'float32' (fp32 activations and scales)"})
    verbose: bool = attrs.field(
        default=False, metadata={"doc": "show coremltools' progress bars and log lines while converting"})
    check_codes: bool = attrs.field(
        default=True, metadata={"doc": "read the saved file back and raise unless every stored code equals quanta's"})
    input_names: tuple[str, ...] | None = attrs.field(
        default=None, converter=attrs.converters.optional(tuple),
        metadata={"doc": "names of positional model inputs (default: the forward() argument names; "
                         "a dict of example inputs is named by its keys)"})
    flexible_sequence_length: bool | int | str = attrs.field(
        default="auto",
        metadata={"doc": "'auto': flexible for a token model (integer inputs, a config.max_position_embeddings), "
                         "else fixed; False: fixed input shapes; True: axis 1 of every input ranges over 1.."
                         "config.max_position_embeddings (ct.RangeDim); an int: that upper bound"})
    flexible_batch: bool | int | str = attrs.field(
        default="auto",
        metadata={"doc": "'auto': flexible for a token model (as flexible_sequence_length), else fixed; False: the "
                         "example's batch size; True: axis 0 of every input ranges over 1..64 (Core ML needs "
                         "a bound); an int: 1..that"})

    @flexible_sequence_length.validator
    @flexible_batch.validator
    def _check_flexible(self, attribute, value) -> None:
        if value != "auto" and not isinstance(value, bool) and not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"must be 'auto', true, false or a positive maximum, got {value!r}", attribute.name)

    @compute_precision.validator
    def _check_precision(self, _attr, value) -> None:
        if value not in _PRECISIONS:
            raise ConfigError(f"must be one of {', '.join(_PRECISIONS)}, got {value!r}", "compute_precision")


def conversion_pass_pipeline(compute_precision: str = "float16", op_selector=None) -> Any:
    """coremltools' default pass pipeline without the passes known to corrupt W8A8 models, with
    quanta's fp16 cast pass (:mod:`.fp16_cast`: the same casts, the overflow scan without large
    temporaries) for ``"float16"`` (``op_selector``: which ops to cast) or none for ``"float32"``.
    Convert with ``compute_precision=ct.precision.FLOAT16`` or ``FLOAT32`` to match."""
    import coremltools as ct

    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes(list(UNSAFE_PASSES))
    return fp16_cast.pass_pipeline(pipeline, compute_precision, op_selector)


def _expected_bytes(model: torch.nn.Module) -> int:
    """An upper bound of the package size: every parameter and buffer at fp16 (the codes are smaller)."""
    return sum(2 * t.numel() for t in (*model.parameters(), *model.buffers()))


def _forward_names(model) -> list[str]:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def max_sequence_length(model) -> int | None:
    """The longest sequence ``model`` takes, from a transformers-style ``config``
    (``max_position_embeddings``, ``n_positions``, ``max_seq_len``), or None."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def is_token_model(model, example: ExampleInputs) -> bool:
    """Whether ``model`` takes token ids: every example input is an integer or bool tensor of rank
    2 or more (ids, masks) and the model's config gives a maximum sequence length."""
    return (max_sequence_length(model) is not None and all(
        t.dim() >= 2 and (t.dtype == torch.bool or not (t.is_floating_point() or t.is_complex()))
        for t in example.tensors))


def core_ml_inputs(model, example: ExampleInputs, cfg: "CoreMLExportConfig") -> list:
    """``ct.TensorType`` per example input: its name, Core ML dtype (int32 for token ids) and shape,
    with a ``ct.RangeDim`` on axis 1 (the sequence) when ``flexible_sequence_length`` is set and on
    axis 0 (the batch) when ``flexible_batch`` is ('auto': both for a token model)."""
    ct = import_coremltools()

    shapes = [tuple(int(d) for d in t.shape) for t in example.tensors]
    token_model = is_token_model(model, example)
    flexible = cfg.flexible_sequence_length
    if flexible == "auto":
        flexible = token_model
    batch = token_model if cfg.flexible_batch == "auto" else cfg.flexible_batch
    if batch is not False:
        if any(len(s) < 1 for s in shapes):
            raise ConfigError("a flexible batch varies axis 0 of every input; a scalar input has none", "flexible_batch")
        max_rows = MAX_FLEXIBLE_BATCH if batch is True else int(batch)
        if any(s[0] > max_rows for s in shapes):
            raise ConfigError(f"the example batch is larger than the maximum {max_rows}", "flexible_batch")
    if flexible is not False:
        upper = flexible if not isinstance(flexible, bool) else max_sequence_length(model)
        if upper is None:
            raise ConfigError("the model has no config.max_position_embeddings: give the maximum, "
                              "e.g. flexible_sequence_length: 512", "flexible_sequence_length")
        short = [n for n, s in zip(example.names, shapes) if len(s) < 2]
        if short:
            raise ConfigError(f"a flexible sequence length varies axis 1 of every input; {short} have rank < 2",
                              "flexible_sequence_length")
        too_long = [n for n, s in zip(example.names, shapes) if s[1] > upper]  # type: ignore[operator]  # upper is an int here
        if too_long:
            raise ConfigError(f"example inputs {too_long} are longer than the maximum {upper}",
                              "flexible_sequence_length")
        seq = ct.RangeDim(lower_bound=1, upper_bound=int(upper), default=shapes[0][1])
        shapes = [(s[0], seq, *s[2:]) for s in shapes]
    if batch is not False:
        rows = ct.RangeDim(lower_bound=1, upper_bound=max_rows, default=shapes[0][0])
        shapes = [(rows, *s[1:]) for s in shapes]
    flexible_any = flexible is not False or batch is not False
    return [ct.TensorType(name=n, shape=ct.Shape(shape=s) if flexible_any else s, dtype=core_ml_dtype(t))
            for n, s, t in zip(example.names, shapes, example.tensors)]


_ACT_QUANT_KINDS = ("aten::quantize_per_tensor", "aten::quantize_per_channel",
                    "quantized_decomposed::quantize_per_tensor")


def has_activation_quantization(traced: torch.jit.ScriptModule) -> bool:
    """Whether a traced model quantizes activations (``quantize_per_tensor`` ... ``dequantize``)."""
    return any(node.kind() in _ACT_QUANT_KINDS for node in traced.inlined_graph.nodes())


def stored_weights(path: str | os.PathLike) -> dict:
    """The compressed weights of a saved ``.mlpackage``: variable name -> ``CompressedWeight``
    (``data``, ``scale``, ``zero_point``, ``dtype``... as stored; see ``mlprogram.read_compressed_weights``)."""
    from quanta.mil.program import read_compressed_weights

    return read_compressed_weights(os.fspath(path))


def _working_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules to annotate and trace, sharing every tensor but the quantized
    parameters (``metadata.annotate`` overwrites those with the records' values and adds buffers to
    the modules): the float tensors, e.g. a transformer's embeddings, are read only, and copying
    them cost a fresh-memory pass over most of a model's bytes."""
    quantized = {id(module._parameters.get(name)) for module in model.modules()
                 for name in getattr(module, "_quanta_meta", {})}  # (also where tied to a float module)
    memo: dict[int, Any] = {id(t): t for module in model.modules()
                            for t in [*module._parameters.values(), *module._buffers.values()]
                            if t is not None and id(t) not in quantized}
    return copy.deepcopy(model, memo)


def tied_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """Quantized parameter ("lm_head.weight") -> the other names of the same tensor in ``model``
    ("model.embed_tokens.weight"): tied weights are one constant in the converted program."""
    names: dict[int, list[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, value in module._parameters.items():
            if value is not None:
                full = f"{mname}.{pname}" if mname else pname
                if full not in names.setdefault(id(value), []):
                    names[id(value)].append(full)
    out: dict[str, list[str]] = {}
    for mname, module in model.named_modules():
        for pname in getattr(module, "_quanta_meta", {}):
            value = module._parameters.get(pname)
            full = f"{mname}.{pname}" if mname else pname
            others = [n for n in names.get(id(value), []) if n != full]
            if others:
                out[full] = others
    return out


def _sanitize(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


def _match_ops(record_names, stored: dict, aliases: dict | None = None) -> dict[str, str]:
    """record name ("fc.weight") -> constexpr op name ("fc_weight_cast_fp16", "op_3_weight_to_fp16",
    or "model_fc_weight_cast_fp16" when traced through :class:`~.inputs.KeywordInputs`). ``aliases``:
    record name -> the other names of its parameter (tied weights: one constant, named after either)."""
    out = {}
    for rname in record_names:
        names = [rname, *(aliases or {}).get(rname, ())]
        for key in [k for n in names for k in (_sanitize(n), _sanitize(f"model.{n}"))]:
            for op_name in stored:
                if key not in op_name:  # a match starts with the key after the prefix: skip the regexes
                    continue
                base = re.sub(r"^(op|var)_", "", op_name) if not op_name.startswith(key) else op_name
                if base == key or re.fullmatch(re.escape(key) + r"(_(cast|to)_fp(16|32))*(_quantized)?", base):
                    out[rname] = op_name
                    break
            if rname in out:
                break
    return out


def _overflow(mlmodel, written, model, example_inputs) -> Any:
    """:func:`.overflow.find_fp16_overflow` of a converted model: the program ``ct.convert`` built
    (the one saved, whose codes were read back) is run in memory rather than parsed again."""
    program = getattr(mlmodel, "_mil_program", None)
    if program is None:
        from quanta.mil.program import load_program

        program = load_program(str(written) if written is not None else mlmodel)
    return find_fp16_overflow(program, model, example_inputs)


def check_stored_codes(path, recs: dict, aliases: dict | None = None) -> dict[str, str]:
    """Raise QuantizationError unless every record's codes are stored exactly in ``path``.

    Codes and zero points must be equal; scales must be quanta's float32 scales rounded to the
    stored type (fp16, or fp32 with ``compute_precision="float32"``). ``aliases``: record name ->
    other names of its parameter (:func:`tied_names`). Returns record name -> variable name.
    """
    from quanta.mil.blobs import read_constexpr_weights

    # The spec and the quantization ops' blobs only: proportional to the quantized weights, not a
    # second full parse of the program.
    stored = read_constexpr_weights(os.fspath(path))
    matched = _match_ops(recs, stored, aliases)
    for name, rec in recs.items():
        op_name = matched.get(name)
        if op_name is None:
            raise QuantizationError(f"no compressed weight found in {os.fspath(path)!r}: the converter stored it "
                                    "as float (this exporter never ships silent fp16 weights)", name)
        entry = stored[op_name]
        codes = rec.codes.detach().cpu().numpy()
        data = np.asarray(entry.data)
        if data.shape != codes.shape or not np.array_equal(data.astype(np.int16), codes.astype(np.int16)):
            n_diff = int((data.astype(np.int16) != codes.astype(np.int16)).sum()) if data.shape == codes.shape else -1
            raise QuantizationError(f"stored codes of {op_name!r} differ from quanta's ({n_diff} elements); "
                                    "refusing to ship a file that is not the quantized model", name)
        stored_bits = int(re.sub(r"\D", "", str(entry.dtype)) or 0)
        if stored_bits != rec.spec.dtype.bits:
            raise QuantizationError(f"{op_name!r} stores {entry.dtype} codes for a {rec.spec.dtype} record", name)
        zp = None if rec.zero_point is None else rec.zero_point.detach().cpu().numpy().reshape(-1).astype(np.int16)
        offset = entry.zero_point
        off = None if offset is None else np.asarray(offset).reshape(-1).astype(np.int16)
        if zp is not None and not np.all(zp == 0):
            if off is None or not np.array_equal(np.broadcast_to(off, zp.shape), zp):
                raise QuantizationError(f"stored zero point of {op_name!r} differs from quanta's", name)
        elif off is not None and np.any(off != 0):
            raise QuantizationError(f"{op_name!r} stores a non-zero offset for a record without zero point", name)
        stored_scale = np.asarray(entry.scale)
        scale = stored_scale.reshape(-1).astype(np.float64)
        want = rec.scale.detach().cpu().numpy().reshape(-1).astype(stored_scale.dtype)
        if np.broadcast_to(scale, want.shape).tolist() != want.astype(np.float64).tolist():
            raise QuantizationError(f"stored scales of {op_name!r} are not quanta's scales rounded to "
                                    f"{stored_scale.dtype}", name)
    return matched


class CoreMLExporter(Exporter):
    """Writes ``.mlpackage`` files whose compressed weights are exactly quanta's codes and scales."""

    name = "coreml"
    description = ("Core ML .mlpackage: constexpr-compressed weights equal to quanta's codes, "
                   "quantize/dequantize activations; iOS16/17/18 validated up front")
    suffix = ".mlpackage"
    writes_directory = True
    can_verify = True
    config_class = CoreMLExportConfig

    def annotate(self, model: torch.nn.Module) -> torch.nn.Module:
        """Add the ``_COREML_`` metadata of every quanta record to ``model`` (in place) so that a plain
        ``ct.convert(torch.jit.trace(model, x), minimum_deployment_target=ct.target.iOS17)`` keeps the
        compressed weights. Returns ``model``."""
        return metadata.annotate(model)

    def plan_target(self, model: torch.nn.Module, minimum_deployment_target=None, has_activation_quant: bool = False) -> Any:
        """The ``ct.target`` an export would use (ConfigError if the requested one is too low)."""
        return targets.choose_target(minimum_deployment_target, _records(model), has_activation_quant)

    def export(self, model: torch.nn.Module, path, *, example_inputs=None, overwrite: bool = False) -> str:
        """Convert ``model`` and save it at ``path`` (``.mlpackage`` added when missing); returns the path.

        ``example_inputs``: a tensor or tuple of tensors (positional inputs) or a dict name ->
        tensor (keyword inputs: the model is called ``model(**inputs)``), used for tracing; each
        becomes a Core ML input of its name, its dtype (int32 for integer tensors such as token
        ids, float32 otherwise) and its shape (axis 1 flexible with ``flexible_sequence_length``).
        Options: ``self.config``, a :class:`CoreMLExportConfig`. Written through
        ``quanta._files.atomic.atomic_dir``: an existing ``path`` not written by quanta needs
        ``overwrite=True``. Raises ConfigError for a target below what the model needs, and
        QuantizationError if the saved codes were not quanta's (``path`` is left as it was then).
        """
        ct = import_coremltools()

        cfg: CoreMLExportConfig = self.config
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"the coreml exporter writes torch models, got {type(model).__name__}", "model")
        targets.check_environment()
        example = normalize_inputs(example_inputs, None if cfg.input_names else _forward_names(model))
        if cfg.input_names is not None:
            if len(cfg.input_names) != len(example.names):
                raise ConfigError(f"{len(cfg.input_names)} names for {len(example.names)} inputs", "input_names")
            example = ExampleInputs(tuple(cfg.input_names), example.tensors, example.keywords)
        path = os.fspath(path)
        if not path.rstrip("/").endswith(self.suffix):
            path = path.rstrip("/") + self.suffix
        # Before converting: a destination that cannot be written fails now, not after minutes of work.
        check_destination(path, overwrite=overwrite, directory=True, expected_bytes=_expected_bytes(model))
        recs = _records(model)
        work = _working_copy(model).eval()
        wrapper = KeywordInputs(work, example.names if example.keywords else None, example.bool_positions()).eval()
        metadata.annotate(wrapper)  # the model-level metadata buffer belongs on the traced root
        torch_ops.register()
        with warnings.catch_warnings(), torch_ops.gqa_expanded():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(wrapper, example.traced_tensors(), check_trace=False)
        act_quant = has_activation_quantization(traced)
        target = targets.choose_target(cfg.minimum_deployment_target, recs, act_quant)
        ct_inputs = core_ml_inputs(model, example, cfg)
        taken = set(example.names)
        ct_outputs = None
        if len(set(wrapper.output_names)) == len(wrapper.output_names) and not taken & set(wrapper.output_names):
            ct_outputs = [ct.TensorType(name=n) for n in wrapper.output_names]  # "logits", "last_hidden_state"

        selector = None

        def convert(precision: str) -> Any:
            nonlocal selector
            if precision == "auto":  # fp16, except the ops that would overflow on the example inputs
                selector = Fp32WhereOverflowing({n: t.detach().cpu().numpy()
                                                 for n, t in zip(example.names, example.tensors)})
            fp32 = precision == "float32"
            with quiet_conversion(cfg.verbose):
                mlmodel = ct.convert(traced, inputs=ct_inputs, outputs=ct_outputs, convert_to="mlprogram",
                                     minimum_deployment_target=target,
                                     compute_precision=ct.precision.FLOAT32 if fp32 else ct.precision.FLOAT16,
                                     pass_pipeline=conversion_pass_pipeline(
                                         "float32" if fp32 else "float16",
                                         selector if precision == "auto" else None))
            mlmodel.user_defined_metadata["quanta.version"] = quanta.__version__
            mlmodel.user_defined_metadata["quanta.minimum_deployment_target"] = targets.target_name(target)
            if precision == "auto" and selector is not None and selector.fp32_ops:
                mlmodel.user_defined_metadata["quanta.float32_ops"] = ",".join(name for _, name in selector.fp32_ops)
            return mlmodel

        # auto converts in fp16 first: most models never come near fp16's range, and the check below
        # (one run of the reference runner) is all they pay. Only an overflow costs a second conversion.
        precision = "float16" if cfg.compute_precision == "auto" else cfg.compute_precision
        mlmodel = convert(precision)
        # Saved into a staging folder and swapped in: the old package (or the user's folder) survives
        # any failure or Ctrl-C, and a package failing the code check is never put in place.
        with atomic_dir(path, overwrite=overwrite, expected_bytes=_expected_bytes(model)) as staging:
            written = staging / "model.mlpackage"
            mlmodel.save(str(written))
            if cfg.check_codes and recs:
                check_stored_codes(str(written), recs, tied_names(model))
            overflow = None if precision == "float32" else _overflow(mlmodel, written, model, example_inputs)
            if overflow is not None and cfg.compute_precision == "float16":
                raise ConfigError(f"{overflow.describe()}; nothing was written. Export with "
                                  "compute_precision: auto (the default: the overflowing ops in float32) "
                                  "or float32", "compute_precision")
            if overflow is not None:  # auto: again, the ops that would overflow in float32
                mixed = convert("auto")
                fp32_ops = list(selector.fp32_ops) if selector is not None else []
                still = _overflow(mixed, None, model, example_inputs) if fp32_ops else overflow
                shutil.rmtree(written)
                if still is None:
                    mixed.save(str(written))
                    ops = ", ".join(f"{kind} {name!r}" for kind, name in fp32_ops[:8])
                    more = f" and {len(fp32_ops) - 8} more" if len(fp32_ops) > 8 else ""
                    warnings.warn(f"{overflow.describe()}: these {len(fp32_ops)} ops compute in float32 ({ops}{more}), "
                                  "every other op in float16 (set compute_precision to silence this)", stacklevel=2)
                else:
                    warnings.warn(f"{still.describe()}: exported with compute_precision float32 instead "
                                  "(fp32 activations; set compute_precision to silence this)", stacklevel=2)
                    convert("float32").save(str(written))
                if cfg.check_codes and recs:
                    check_stored_codes(str(written), recs, tied_names(model))
            for child in list(written.iterdir()):
                child.rename(staging / child.name)
            written.rmdir()
            fault_delay("package-staged")
        return path

    def stored_size(self, path) -> Any:
        """The package's size on disk (the sum of its files), with the blobs of compressed-weight ops
        (codes, scales, offsets) as ``quantized`` and the other constants as ``float`` (from the spec
        and the blob headers, :func:`quanta.mil.blobs.weight_bytes`)."""
        from quanta._files.stored_size import StoredSize, files_size
        from quanta.mil.blobs import weight_bytes

        import_coremltools()
        quantized, floats = weight_bytes(os.fspath(path))
        return StoredSize(path=os.fspath(path), total=files_size(path), quantized=quantized, float=floats)

    def verify(self, path, against, example_inputs=None) -> dict:
        """Run ``path`` with the numpy reference runner and ``against`` (a torch model) on the same inputs.

        ``example_inputs``: tensor, tuple of tensors, or dict name -> array; None draws seeded
        normal inputs of the package's input shapes. Returns ``compare()``'s figures
        (``max_abs``, ``max_rel``, ``cosine``) plus ``outputs`` (names compared).
        """
        from .verify import verify_package

        return verify_package(path, against, example_inputs)


@quanta.hookimpl
def register_exporters(register: Registrar) -> None:
    register(CoreMLExporter())


def _flexible(text: str) -> bool | int | str:
    """A ``--flexible-*`` value: ``auto``, ``on``/``true``, ``off``/``false`` or a positive maximum."""
    word = text.strip().lower()
    if word == "auto":
        return "auto"
    if word in ("on", "true", "yes"):
        return True
    if word in ("off", "false", "no"):
        return False
    if word.isdigit() and int(word) >= 1:
        return int(word)
    raise argparse.ArgumentTypeError(f"{text!r}: use auto, on, off or a positive maximum")


@quanta.hookimpl
def add_cli_options(command: str, group: argparse._ArgumentGroup) -> None:
    """``quanta export --target``, ``--flexible-batch``, ``--flexible-sequence-length``: the
    exporter's ``minimum_deployment_target``, ``flexible_batch`` and ``flexible_sequence_length``."""
    if command == "export":
        names = sorted(n for pair in targets.TARGETS.values() for n in pair)
        group.add_argument("--target", dest="minimum_deployment_target", choices=names, metavar="TARGET",
                           help=f"coreml: minimum deployment target: {', '.join(names)} (default: the lowest "
                                "that stores the model's weights exactly)")
        group.add_argument("--flexible-batch", dest="flexible_batch", type=_flexible, metavar="auto|on|off|N",
                           help="coreml: a batch dimension of any size up to N (on: 64); default auto: flexible "
                                "for a token model, else the example's batch")
        group.add_argument("--flexible-sequence-length", dest="flexible_sequence_length", type=_flexible,
                           metavar="auto|on|off|N",
                           help="coreml: a sequence axis of any length up to N (on: the model config's "
                                "max_position_embeddings); default auto: flexible for a token model")
