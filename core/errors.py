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
    "PluginError",
    "PluginWarning",
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
    """A recipe or layer config is invalid. ``key`` is the dotted path of the offending key;
    ``detail`` is the message without it (so a caller can name a longer path); ``others`` lists
    further problems found in the same recipe as ``(key, detail)``."""

    def __init__(self, message: str, key: str | None = None) -> None:
        self.key, self.detail = key, message
        self.others: list[tuple[str | None, str]] = []
        super().__init__(f"{key}: {message}" if key else message)


class PluginNotFoundError(QuantaError, KeyError):
    """No plugin of the given kind has that name. The message lists the nearest names."""

    def __init__(self, kind: str, name: str, available: Iterable[str], failed: Iterable[str] = ()) -> None:
        self.kind, self.name = kind, name
        self.available = sorted(available)
        self.failed = list(failed)
        self.message = (
            f"no {kind} plugin named {name!r}{did_you_mean(name, self.available)} "
            f"(available: {', '.join(self.available) or 'none'})"
        )
        if self.failed:
            self.message += "; plugins that failed to load (one may provide it): " + "; ".join(self.failed)
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.message


class PluginLoadError(QuantaError):
    """A plugin failed to import or to register. Names the entry point and distribution."""

    def __init__(self, plugin: str, distribution: str | None, error: BaseException | str) -> None:
        self.plugin, self.distribution, self.error = plugin, distribution, error
        where = f" (distribution {distribution})" if distribution else ""
        super().__init__(f"plugin {plugin!r}{where} failed to load: {error}")


class PluginContractError(QuantaError, TypeError):
    """A plugin's contribution breaks its kind's contract (missing name, method, ...)."""


class DuplicatePluginError(PluginContractError):
    """Two plugins registered the same (kind, name); names both distributions."""


class QuantizationError(QuantaError, ValueError):
    """A weight or layer cannot be quantized as asked (NaN weights, bad block size, ...).
    ``layer`` names the layer; ``detail`` is the message without it."""

    def __init__(self, message: str, layer: str | None = None) -> None:
        self.layer, self.detail = layer, message
        super().__init__(f"layer {layer!r}: {message}" if layer else message)


class DestinationError(QuantaError, OSError):
    """A file or directory cannot be written where asked (not writable, no room, wrong kind)."""


class DestinationExistsError(DestinationError, FileExistsError):
    """The destination exists and quanta did not write it: pass ``overwrite=True`` to replace it."""


class DataError(QuantaError, ValueError):
    """Calibration data is unusable: wrong type, shape or dtype for the model, NaN/inf, empty.

    ``batch`` is the index of the offending batch (None when the problem is the whole data).
    """

    def __init__(self, message: str, batch: int | None = None) -> None:
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

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)


class PluginError(QuantaError):
    """An unexpected exception inside a plugin's code, attributed to the plugin.

    Attributes: ``kind``, ``name``, ``distribution``, ``layer`` (or None), ``during`` (the
    plugins whose run was interrupted, e.g. ``["algorithm 'gptq'"]``). The original exception
    is chained as ``__cause__``. A ``QuantaError`` a plugin raises on purpose is never wrapped.
    """

    def __init__(self, kind: str, name: str, distribution: str | None, error: BaseException,
                 layer: str | None = None) -> None:
        self.kind, self.name, self.distribution, self.layer = kind, name, distribution, layer
        self.error = error
        self.during: list[str] = []
        super().__init__(self._message())

    def _message(self) -> str:
        dist = f" (distribution {self.distribution})" if self.distribution else ""
        where = f" on layer {self.layer!r}" if self.layer else ""
        during = "".join(f" during {d}" for d in self.during)
        return (f"{self.kind} plugin {self.name!r}{dist} failed{where}{during}: "
                f"{type(self.error).__name__}: {self.error}")

    def add_context(self, during: str) -> None:
        """Name another plugin whose run this failure interrupted (e.g. the algorithm that
        called a failing backend)."""
        if during not in self.during:
            self.during.append(during)
            self.args = (self._message(),)

    def __str__(self) -> str:
        return self._message()


class PluginWarning(UserWarning):
    """A plugin's event-hook implementation raised; the run went on without it."""
