"""Exceptions raised by quanta. Every message names the key, layer or plugin at fault."""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = [
    "QuantaError",
    "ConfigError",
    "PluginNotFoundError",
    "PluginLoadError",
    "PluginContractError",
    "DuplicatePluginError",
    "QuantizationError",
    "DestinationError",
    "DestinationExistsError",
    "DataError",
    "DeviceError",
    "ModelError",
    "ExampleInputError",
    "NotQuantizedError",
    "CoreMLPackageError",
    "nearest",
    "did_you_mean",
]


def nearest(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Return up to ``n`` candidates closest to ``word`` (difflib ratio, best first)."""
    cands = [str(c) for c in candidates]
    lowered = {c.lower(): c for c in cands}
    hits = difflib.get_close_matches(str(word).lower(), list(lowered), n=n, cutoff=0.5)
    return [lowered[h] for h in hits]


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """A sentence suffix such as ``"; did you mean 'gptq'?"`` or ``""`` when nothing is close."""
    hits = nearest(word, candidates, n=1)
    return f"; did you mean {hits[0]!r}?" if hits else ""


class QuantaError(Exception):
    """Base class of every error quanta raises on purpose."""


class ConfigError(QuantaError, ValueError):
    """A recipe or layer config is invalid. ``key`` is the dotted path of the offending key."""

    def __init__(self, message: str, key: str | None = None):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class PluginNotFoundError(QuantaError, KeyError):
    """No plugin of the given kind has that name. The message lists the nearest names and, when
    plugins failed to load, says so (``failures``: the plugin likely to provide the name, and why)."""

    def __init__(self, kind: str, name: str, available: Iterable[str], failures: str = ""):
        self.kind, self.name = kind, name
        self.available = sorted(available)
        self.message = (
            f"no {kind} plugin named {name!r}{did_you_mean(name, self.available)} "
            f"(available: {', '.join(self.available) or 'none'}){failures}"
        )
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.message


class PluginLoadError(QuantaError):
    """A plugin failed to import or to register. Names the entry point and distribution."""

    def __init__(self, plugin: str, distribution: str | None, error: BaseException | str):
        self.plugin, self.distribution, self.error = plugin, distribution, error
        where = f" (distribution {distribution})" if distribution else ""
        super().__init__(f"plugin {plugin!r}{where} failed to load: {error}")


class PluginContractError(QuantaError, TypeError):
    """A plugin's contribution breaks its kind's contract (missing name, method, ...)."""


class DuplicatePluginError(PluginContractError):
    """Two plugins registered the same (kind, name); names both distributions."""


class QuantizationError(QuantaError, ValueError):
    """A weight or layer cannot be quantized as asked (NaN weights, bad block size, ...)."""

    def __init__(self, message: str, layer: str | None = None):
        self.layer = layer
        super().__init__(f"layer {layer!r}: {message}" if layer else message)


class DestinationError(QuantaError, OSError):
    """A file or directory cannot be written where asked (not writable, no room, wrong kind)."""


class DestinationExistsError(DestinationError, FileExistsError):
    """The destination exists and quanta did not write it: pass ``overwrite=True`` to replace it."""


class DataError(QuantaError, ValueError):
    """Calibration data is unusable: wrong type, shape or dtype for the model, NaN/inf, empty.

    ``batch`` is the index of the offending batch (None when the problem is the whole data).
    """

    def __init__(self, message: str, batch: int | None = None):
        self.batch = batch
        super().__init__(message)


class DeviceError(QuantaError, ValueError):
    """A device was asked for that this machine or torch build does not have (``device='cuda'``
    without CUDA, a GPU index past the last one, an unknown device string)."""


class ModelError(QuantaError, ValueError):
    """The model cannot be quantized as given: weights on the ``meta`` device, nothing a backend
    can quantize, a path no backend reads."""


class ExampleInputError(QuantaError, ValueError):
    """An exporter's example input does not fit the model (wrong shape, dtype or type)."""


class NotQuantizedError(QuantaError, ValueError):
    """Exporting a model that holds no quanta records; pass ``allow_float=True`` to export float weights."""


class CoreMLPackageError(QuantaError, ValueError):
    """A path is not a readable Core ML package: no manifest, a corrupt or truncated spec or weight
    file, an empty folder. ``path`` is the package path."""

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        super().__init__(message)
