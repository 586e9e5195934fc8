"""Backend ``coreml``: quantize the weights of an existing Core ML model (``.mlpackage`` or MLModel).

Units are the ``const`` weights that coremltools' ``linear_quantize_weights`` would consider
(weight-file sized, rank >= 2, floating point, feeding non-constexpr ops), named by the
const op and typed by the op that consumes them (``linear``, ``conv``, ``matmul``...), with
coremltools' own choice of output/input axes per op type. Writing a record replaces the
const by ``constexpr_affine_dequantize`` (iOS16/17) or ``constexpr_blockwise_shift_scale``
(iOS18) holding the record's codes, scale and zero point, built by coremltools' own
constructor and converted back through the same path as ``linear_quantize_weights``.

The user's model is never modified: ``copy`` gives a :class:`CoreMLWorkModel` that collects
records and builds a new MLModel on ``to_mlmodel()``/``save()``.
"""

from __future__ import annotations

from typing import Any

import os
import sys

import numpy as np
import torch

import quanta
from quanta.errors import ConfigError, QuantizationError
from quanta.contracts import Backend, Unit
from quanta.record import QuantizedWeight
from quanta._records.spec import Granularity
from quanta._run.weights import quantize_weight

from . import targets
from .ct_import import import_coremltools

__all__ = ["CoreMLBackend", "CoreMLWorkModel", "quantize_in_weight_dtype", "load_mlmodel"]

_IOS16 = 7
_IOS18 = 9


def load_mlmodel(model) -> Any:
    """An ``MLModel`` for a path or an MLModel (skipping the macOS-only compile on load)."""
    ct = import_coremltools()

    if isinstance(model, ct.models.MLModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        # (imported here: every run asks this backend whether it accepts the model, and the check
        # pulls in quanta.mil; a torch run never needs it)
        from .package_check import check_package

        check_package(model)  # a clear CoreMLPackageError instead of coremltools' raw errors
        return ct.models.MLModel(os.fspath(model), skip_model_load=True)
    raise ConfigError(f"expected an .mlpackage path or a coremltools MLModel, got {type(model).__name__}", "model")


def _load_program(mlmodel) -> Any:
    from coremltools.converters.mil.frontend.milproto import load as milproto_load
    from coremltools.models import utils as model_utils

    version = max(mlmodel.get_spec().specificationVersion, _IOS16)
    return model_utils._convert_model_spec_to_pymil_prog(mlmodel, version, milproto_load.load), version


class CoreMLWorkModel:
    """A Core ML model being quantized: the source MLModel plus the records written so far.

    ``program`` is the loaded MIL program the units point into (read-only); ``records`` maps
    const op names to QuantizedWeight. ``to_mlmodel()`` builds the quantized MLModel (cached
    until another record is written); ``save(path)`` writes it.
    """

    def __init__(self, mlmodel) -> None:
        self.source = mlmodel
        self.program, self.specification_version = _load_program(mlmodel)
        self.records: dict[str, QuantizedWeight] = {}
        self._built = None
        self.quanta_report = None

    def to_mlmodel(self) -> Any:
        """The quantized ``ct.models.MLModel`` (a new model; the source is untouched)."""
        if self._built is None:
            from coremltools.models import utils as model_utils

            self._built = model_utils._apply_graph_pass(self.source, _write_records_pass(dict(self.records)),
                                                        skip_model_load=True)
        return self._built

    def save(self, path, overwrite: bool = False) -> str:
        """Save the quantized model as an ``.mlpackage``; returns the path.

        Written through ``quanta._files.atomic.atomic_dir``: an existing package quanta wrote is replaced,
        any other existing path needs ``overwrite=True``, and a failure leaves ``path`` as it was.
        """
        from quanta._files.atomic import atomic_dir

        path = os.fspath(path)
        with atomic_dir(path, overwrite=overwrite) as staging:
            written = staging / "model.mlpackage"
            self.to_mlmodel().save(str(written))
            for child in list(written.iterdir()):
                child.rename(staging / child.name)
            written.rmdir()
        return path

    def get_spec(self) -> Any:
        return self.to_mlmodel().get_spec()


def _weight_ops(program) -> Any:
    for func in program.functions.values():
        yield from func.operations


def _eligible(op) -> bool:
    """coremltools' ``linear_quantize_weights`` eligibility, less the threshold (quanta plans that)."""
    from coremltools.converters.mil.backend.mil.load import should_use_weight_file

    if op.op_type != "const":
        return False
    val = op.outputs[0].val
    if not isinstance(val, np.ndarray) or not np.issubdtype(val.dtype, np.floating):
        return False
    if not should_use_weight_file(val) or val.ndim <= 1:
        return False
    children = op.outputs[0].child_ops
    if len(children) == 0 or any(c.op_type.startswith("constexpr_") for c in children):
        return False
    return not np.any(np.isinf(val))


def _axes(op, rank: int) -> tuple[int, int]:
    from coremltools.optimize._utils import select_input_output_channel_axis

    input_axis, output_axis = select_input_output_channel_axis(op)
    if input_axis is None or output_axis is None:
        return 0, 1
    return output_axis % rank, input_axis % rank


def quantize_in_weight_dtype(weight: torch.Tensor, spec, *, channel_axis: int = 0, input_axis: int = 1,
                             layer: str | None = None) -> QuantizedWeight:
    """``quanta.quantize_weight`` computing in ``weight``'s own dtype (fp16 for Core ML consts).

    coremltools' ``linear_quantize_weights`` computes in the const's dtype; running the same
    scheme and observer plugins in that dtype gives its codes, scales and zero points bit for bit.
    Returns a record with float32 scales holding the fp16 values.
    """
    return quantize_weight(weight, spec, channel_axis=channel_axis, input_axis=input_axis, layer=layer,
                           compute_dtype=weight.dtype)


def _write_records_pass(records: dict[str, QuantizedWeight]) -> Any:
    """A MIL graph pass replacing the named consts by constexpr ops carrying ``records``."""
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass

    class WriteRecords(_WriteRecords, AbstractGraphPass):
        pass

    graph_pass = WriteRecords()
    graph_pass.records = records
    return graph_pass


class _WriteRecords:
    records: dict[str, QuantizedWeight]

    def _make(self, op, record: QuantizedWeight) -> Any:
        from coremltools.converters.mil.mil import types
        from coremltools.optimize import _utils as optimize_utils
        from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights

        np_dtype = types.nptype_from_builtin(types.string_to_builtin(str(record.spec.dtype)))
        weight_dtype = op.outputs[0].val.dtype
        offset = None
        if record.zero_point is not None:
            offset = record.zero_point.numpy().astype(np_dtype)
        params = optimize_utils.QuantParams(data=record.codes.numpy().astype(np_dtype),
                                            scale=record.scale.numpy().astype(weight_dtype),
                                            offset=offset, nbits=np.uint8(record.spec.dtype.bits))
        return linear_quantize_weights._create_constexpr_var(op, params)

    def apply(self, prog) -> None:
        from coremltools.converters.mil.mil.passes.helper import block_context_manager

        @block_context_manager
        def apply_block(block) -> None:
            for op in list(block.operations):
                for b in op.blocks:
                    apply_block(b)
                record = self.records.get(op.name)
                if record is None or op.op_type != "const":
                    continue
                new_var = self._make(op, record)
                block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new_var,
                                                   no_check_var_types=True)
                block.remove_ops([op])

        for func in prog.functions.values():
            apply_block(func)


class CoreMLBackend(Backend):
    """Enumerates and rewrites the const weights of a Core ML ML program."""

    name = "coreml"
    description = "Core ML model (.mlpackage path or MLModel): const weights -> constexpr-compressed weights"

    def accepts(self, model) -> bool:
        if isinstance(model, CoreMLWorkModel):
            return True
        if isinstance(model, (str, os.PathLike)):
            # A folder is offered to this backend so that a broken package gets check_package's error.
            path = os.fspath(model).rstrip("/")
            return path.endswith((".mlpackage", ".mlmodel")) or os.path.isdir(path)
        ct = sys.modules.get("coremltools")  # an MLModel exists only once coremltools is imported
        return ct is not None and isinstance(model, ct.models.MLModel)

    def _work(self, model) -> CoreMLWorkModel:
        return model if isinstance(model, CoreMLWorkModel) else CoreMLWorkModel(load_mlmodel(model))

    def units(self, model) -> list[Unit]:
        work = self._work(model)
        out = []
        for op in _weight_ops(work.program):
            if not _eligible(op):
                continue
            children = op.outputs[0].child_ops
            consumer_types = list(dict.fromkeys(c.op_type for c in children))
            shape = tuple(op.outputs[0].val.shape)
            channel_axis, input_axis = _axes(op, len(shape))
            unit = Unit(op.name, consumer_types[0], consumer_types + ["const"], "val", shape, channel_axis,
                        input_axis, handle=op)
            out.append(unit)
        return out

    def consumer_names(self, model) -> dict[str, list[str]]:
        """Consuming op name -> names of the weight consts it reads (for coremltools' op_name_configs)."""
        out: dict[str, list[str]] = {}
        for unit in self.units(model):
            for child in unit.handle.outputs[0].child_ops:
                out.setdefault(child.name, []).append(unit.name)
        return out

    def module_names(self, model) -> list[str]:
        work = self._work(model)
        return [op.name for op in _weight_ops(work.program)]

    def type_names(self, model) -> set[str]:
        work = self._work(model)
        return {op.op_type for op in _weight_ops(work.program)}

    def copy(self, model, share: tuple = ()) -> CoreMLWorkModel:
        if isinstance(model, CoreMLWorkModel):
            new = CoreMLWorkModel(model.source)
            new.records = dict(model.records)
            return new
        return CoreMLWorkModel(load_mlmodel(model))

    def read_weight(self, model, unit: Unit) -> torch.Tensor:
        """The const's values, or once a record is written for it, the record's dequantized values
        in the const's dtype (what the model computes with)."""
        const = torch.from_numpy(np.array(unit.handle.outputs[0].val, copy=True))
        record = model.records.get(unit.name) if isinstance(model, CoreMLWorkModel) else None
        return const if record is None else record.dequantize().to(const.dtype).reshape(const.shape)

    def compute_dtype(self, model, unit: Unit) -> torch.dtype:
        """The dtype coremltools quantizes this weight in (the const's own, usually fp16)."""
        return self.read_weight(model, unit).dtype

    def quantize_unit(self, model, unit: Unit, spec) -> QuantizedWeight:
        """A record for ``unit`` computed as coremltools does (in the weight's own dtype)."""
        return quantize_in_weight_dtype(self.read_weight(model, unit), spec, channel_axis=unit.channel_axis,
                                        input_axis=unit.input_axis, layer=unit.name)

    def write(self, model, unit: Unit, record: QuantizedWeight, values=None) -> None:
        if not isinstance(model, CoreMLWorkModel):
            raise ConfigError("Core ML models are quantized into a new model; inplace=True is not supported",
                              "inplace")
        if record.spec.dtype.bits not in targets.STORABLE_BITS:
            raise QuantizationError(f"Core ML stores 4- or 8-bit codes, not {record.spec.dtype}", unit.name)
        need = targets.weight_target(record)
        if model.specification_version < need:
            # The second sentence is coremltools' own (its tests and users match on it).
            what = "per_block" if record.spec.granularity is Granularity.per_block else f"{record.spec.dtype.bits}-bit"
            raise ConfigError(f"{record.spec.describe()} needs {targets.target_name(need)} but the model's "
                              f"deployment target is {targets.target_name(model.specification_version)}. "
                              f"The {what} quantization is supported since iOS18. Please re-convert your model "
                              "with minimum_deployment_target set to at least ct.target.iOS18.", f"layer {unit.name!r}")
        model.records[unit.name] = record
        model._built = None

    def snapshot(self, model, units, everything: bool = False, share: tuple = ()) -> Any:
        if not isinstance(model, CoreMLWorkModel):
            raise ConfigError("Core ML models are quantized into a new model; inplace=True is not supported",
                              "inplace")
        return dict(model.records)

    def restore(self, model, snapshot) -> None:
        model.records = dict(snapshot)
        model._built = None


@quanta.hookimpl
def register_backends(register) -> None:
    register(CoreMLBackend())
