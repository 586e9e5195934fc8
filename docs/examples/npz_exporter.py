"""An exporter with options: every record's codes, scales and zero points in one ``.npz`` file."""

from __future__ import annotations

import attrs
import numpy as np

import quanta
from quanta.contracts import Exporter
from quanta.errors import ConfigError


@attrs.frozen(kw_only=True)
class NpzConfig:
    """Options of the ``npz`` exporter (recipe ``export: {format: npz, compressed: false}``)."""

    compressed: bool = attrs.field(default=True, metadata={"doc": "zip-compress the arrays (np.savez_compressed)"})
    scale_dtype: str = attrs.field(default="float32", metadata={"doc": "'float32' or 'float16' scales"})

    @scale_dtype.validator
    def _check_scale_dtype(self, _attribute, value):
        if value not in ("float32", "float16"):
            raise ConfigError(f"must be 'float32' or 'float16', got {value!r}", "scale_dtype")


class NpzExporter(Exporter):
    """Writes ``<layer>.codes``, ``<layer>.scale`` and ``<layer>.zero_point`` arrays to an ``.npz``."""

    name = "npz"
    description = "NumPy .npz archive of every record's codes, scales and zero points"
    config_class = NpzConfig
    suffix = ".npz"
    grids = frozenset({"affine"})  # the archive stores no lookup table: refuse "lut" records
    staged = True  # core hands export() a staging path and owns the rename and the ownership marker

    def export(self, model, path, *, example_inputs=None, overwrite=False):
        records = quanta.records(model)
        if not records:
            raise ConfigError("the model holds no quanta records: quantize it first", "model")
        arrays = {}
        for name, record in records.items():
            arrays[f"{name}.codes"] = record.codes.cpu().numpy()
            arrays[f"{name}.scale"] = record.scale.cpu().numpy().astype(self.config.scale_dtype)
            if record.zero_point is not None:
                arrays[f"{name}.zero_point"] = record.zero_point.cpu().numpy()
        save = np.savez_compressed if self.config.compressed else np.savez
        # `path` is core's staging path: write it plainly. Core renames it onto the user's path
        # when export() returns, marks it as quanta's (so a re-export replaces it) and removes it
        # if anything raises (nothing half-written is ever left at the user's path).
        save(path, **arrays)
        return str(path)


def read_npz(path) -> dict:
    """``{"<module>.<param>": codes}`` from a file this exporter wrote (for the round-trip check)."""
    with np.load(path) as archive:
        return {key[: -len(".codes")]: archive[key] for key in archive.files if key.endswith(".codes")}


@quanta.hookimpl
def register_exporters(register):
    register(NpzExporter())


@quanta.hookimpl
def add_cli_options(command, group):
    if command == "export":
        group.add_argument("--no-compress", dest="compressed", action="store_const", const=False,
                           help="npz: store the arrays uncompressed")
