"""The plugin registry: a pluggy PluginManager plus lookup of contributions by kind and name."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import re
import threading
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import attrs
import pluggy

from quanta import hookspecs
from quanta.errors import (
    DuplicatePluginError,
    did_you_mean,
    PluginContractError,
    PluginLoadError,
    PluginNotFoundError,
)
from quanta.plugin import REQUIRED

__all__ = ["KINDS", "PluginEntry", "FieldInfo", "PluginFailure", "PluginLoadWarning", "Registry",
           "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "quanta"
KINDS = ("scheme", "observer", "algorithm", "backend", "exporter")
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*$")


@attrs.frozen(kw_only=True)
class PluginEntry:
    """One registered implementation: ``kind``, ``name``, ``description``, ``config_class``,
    the implementation object ``obj``, and the plugin/distribution/version it came from."""

    kind: str
    name: str
    description: str
    config_class: type | None
    obj: Any = attrs.field(repr=False)
    plugin: str
    distribution: str
    version: str

    def to_dict(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "description": self.description,
            "plugin": self.plugin, "distribution": self.distribution, "version": self.version,
            "config_class": None if self.config_class is None else self.config_class.__name__,
        }


@attrs.frozen(kw_only=True)
class FieldInfo:
    """One config field of a plugin: name, type (as text), default (as text) and doc."""

    name: str
    type: str
    default: str
    doc: str


class PluginLoadWarning(UserWarning):
    """A plugin named for loading (``QUANTA_PLUGINS``) is not installed; it is also listed in ``failures()``."""


@attrs.frozen(kw_only=True)
class PluginFailure:
    """A plugin that failed to import or register, kept for ``quanta plugins``."""

    plugin: str
    distribution: str | None
    version: str | None
    error: str

    def to_dict(self) -> dict:
        return {"plugin": self.plugin, "distribution": self.distribution, "version": self.version, "error": self.error}


def _quanta_version() -> str:
    try:
        return md.version("quanta")
    except md.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


class Registry:
    """Holds the PluginManager and every contribution, keyed by kind then name.

    Loading is lazy and happens once, on first lookup: the built-ins of
    ``quanta.plugins.BUILTIN_PLUGINS``, then the entry-point group ``quanta`` unless
    ``QUANTA_DISABLE_PLUGIN_AUTOLOAD=1``; ``QUANTA_PLUGINS=a,b`` loads only those entry points.
    """

    def __init__(self, autoload: bool | None = None):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._autoload = autoload
        self._entries: dict[str, dict[str, PluginEntry]] = {k: {} for k in KINDS}
        self._failures: list[PluginFailure] = []
        self._loaded = False
        self._lock = threading.RLock()

    # -- loading -----------------------------------------------------------------------
    def ensure_loaded(self) -> None:
        """Load built-ins and entry points once. Safe to call repeatedly."""
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            from quanta.plugins import BUILTIN_PLUGINS

            version = _quanta_version()
            for modname in BUILTIN_PLUGINS:
                module = importlib.import_module(modname)
                # A broken built-in is a bug in quanta itself: let it raise.
                self.add_plugin(module, name=modname, distribution="quanta", version=version)
            if self._should_autoload():
                self._load_entry_points()

    def _should_autoload(self) -> bool:
        if self._autoload is not None:
            return self._autoload
        return os.environ.get("QUANTA_DISABLE_PLUGIN_AUTOLOAD", "").strip().lower() not in ("1", "true", "yes")

    def _load_entry_points(self) -> None:
        only = {n.strip() for n in os.environ.get("QUANTA_PLUGINS", "").split(",") if n.strip()}
        seen: set[str] = set()
        installed = list(md.entry_points(group=ENTRY_POINT_GROUP))
        for missing in sorted(only - {ep.name for ep in installed}):
            # A name in QUANTA_PLUGINS that no installed distribution provides: say so, never skip silently.
            names = sorted({ep.name for ep in installed})
            error = (f"QUANTA_PLUGINS names entry point {missing!r}, but no installed distribution provides it"
                     f"{did_you_mean(missing, names)} (installed '{ENTRY_POINT_GROUP}' entry points: "
                     f"{', '.join(names) or 'none'})")
            self._failures.append(PluginFailure(plugin=missing, distribution=None, version=None, error=error))
            warnings.warn(error, PluginLoadWarning, stacklevel=2)
        for ep in installed:
            if only and ep.name not in only:
                continue
            if ep.name in seen:  # the same distribution found twice on sys.path
                continue
            seen.add(ep.name)
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            dist_version = dist.version if dist is not None else None
            try:
                obj = ep.load()
            except Exception as exc:  # isolate: a broken plugin never breaks the built-ins
                err = PluginLoadError(ep.name, dist_name, f"{type(exc).__name__}: {exc}")
                err.__cause__ = exc
                self._failures.append(PluginFailure(plugin=ep.name, distribution=dist_name,
                                                    version=dist_version, error=str(err)))
                continue
            try:
                self.add_plugin(obj, name=ep.name, distribution=dist_name or ep.name, version=dist_version or "")
            except Exception as exc:
                self._failures.append(PluginFailure(plugin=ep.name, distribution=dist_name,
                                                    version=dist_version, error=f"{type(exc).__name__}: {exc}"))

    # -- registering ----------------------------------------------------------------------
    def add_plugin(self, obj: Any, name: str | None = None, distribution: str = "<in-process>",
                   version: str = "") -> str:
        """Register a plugin object (module or instance with ``@hookimpl`` functions).

        Its registration hooks are called at once; if any contribution breaks a contract or
        duplicates a name, nothing of this plugin stays registered and the error is raised.
        Returns the plugin name.
        """
        self.ensure_loaded()  # built-ins first, so duplicates are caught (no-op while loading)
        with self._lock:
            plugin_name = self.pm.register(obj, name=name)
            if plugin_name is None:
                raise PluginContractError(f"plugin {name or obj!r} is already registered or blocked")
            added: list[PluginEntry] = []
            try:
                for hook_name, kind in hookspecs.REGISTRATION_HOOKS.items():
                    for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                        if impl.plugin is not obj:
                            continue

                        def register(contribution, _kind=kind):
                            entry = self._check(_kind, contribution, plugin_name, distribution, version)
                            self._entries[_kind][entry.name] = entry
                            added.append(entry)

                        impl.function(register=register)
            except BaseException:
                for entry in added:
                    self._entries[entry.kind].pop(entry.name, None)
                self.pm.unregister(obj)
                raise
            return plugin_name

    def remove_plugin(self, obj_or_name: Any) -> None:
        """Unregister a plugin and every contribution it made."""
        with self._lock:
            obj = self.pm.get_plugin(obj_or_name) if isinstance(obj_or_name, str) else obj_or_name
            if obj is None or not self.pm.is_registered(obj):
                return
            name = self.pm.get_name(obj)
            for kind in KINDS:
                for key in [k for k, e in self._entries[kind].items() if e.plugin == name]:
                    del self._entries[kind][key]
            self.pm.unregister(obj)

    @contextmanager
    def plugin(self, obj: Any, name: str | None = None) -> Iterator[str]:
        """Context manager: register ``obj`` for the block, unregister it in ``finally``."""
        plugin_name = self.add_plugin(obj, name=name)
        try:
            yield plugin_name
        finally:
            self.remove_plugin(obj)

    def _check(self, kind, contribution, plugin, distribution, version) -> PluginEntry:
        where = f"plugin {plugin!r} (distribution {distribution})"
        name = getattr(contribution, "name", None)
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise PluginContractError(f"{where} registered a {kind} without a valid 'name' (got {name!r})")
        desc = getattr(contribution, "description", None)
        if not isinstance(desc, str) or not desc.strip():
            raise PluginContractError(f"{where}: {kind} {name!r} needs a one-line 'description'")
        missing = [m for m in REQUIRED[kind] if not callable(getattr(contribution, m, None))]
        if missing:
            raise PluginContractError(f"{where}: {kind} {name!r} lacks required method(s) {', '.join(missing)}")
        config_class = getattr(contribution, "config_class", None)
        if config_class is not None and not attrs.has(config_class):
            raise PluginContractError(f"{where}: {kind} {name!r} config_class must be an attrs class")
        existing = self._entries[kind].get(name)
        if existing is not None:
            raise DuplicatePluginError(
                f"{kind} {name!r} from {where} duplicates the one from plugin {existing.plugin!r} "
                f"(distribution {existing.distribution}); rename one of them"
            )
        return PluginEntry(kind=kind, name=name, description=desc.strip().splitlines()[0], config_class=config_class,
                           obj=contribution, plugin=plugin, distribution=distribution, version=version or "")

    # -- lookup ---------------------------------------------------------------------------
    def _kind(self, kind: str) -> dict[str, PluginEntry]:
        if kind not in self._entries:
            raise PluginNotFoundError("plugin kind", kind, KINDS)
        self.ensure_loaded()
        return self._entries[kind]

    def names(self, kind: str) -> list[str]:
        """Sorted names registered for ``kind`` (one of ``KINDS``)."""
        return sorted(self._kind(kind))

    def get(self, kind: str, name: str) -> PluginEntry:
        """The entry for ``(kind, name)``; raises PluginNotFoundError (a KeyError) with near names."""
        entries = self._kind(kind)
        try:
            return entries[name]
        except (KeyError, TypeError):
            raise PluginNotFoundError(kind, str(name), entries, failures=self._failure_note(str(name))) from None

    def _failure_note(self, name: str) -> str:
        """Text saying which plugins failed to load (the one likely to provide ``name`` first)."""
        if not self._failures:
            return ""
        lowered = name.lower().replace("-", "_")

        def related(f: PluginFailure) -> bool:
            words = {f.plugin.lower().replace("-", "_"), (f.distribution or "").lower().replace("-", "_")}
            return any(lowered and (lowered in w or (w and w in lowered)) for w in words)

        likely = [f for f in self._failures if related(f)]
        if likely:
            f = likely[0]
            return (f"; plugin {f.plugin!r} ({f.distribution or 'unknown distribution'}) which may provide it "
                    f"failed to load: {f.error}")
        names = ", ".join(repr(f.plugin) for f in self._failures)
        return f"; note: {len(self._failures)} plugin(s) failed to load ({names}): run `quanta plugins` for why"

    def entries(self, kind: str | None = None) -> list[PluginEntry]:
        """All entries (of one kind, or of every kind), sorted by kind then name."""
        kinds = KINDS if kind is None else (kind,)
        return [e for k in kinds for _, e in sorted(self._kind(k).items())]

    def failures(self) -> list[PluginFailure]:
        """Plugins that failed to load or register."""
        self.ensure_loaded()
        return list(self._failures)

    def describe(self, kind: str, name: str) -> list[FieldInfo]:
        """The config fields of a plugin: name, type, default and doc (from field metadata)."""
        entry = self.get(kind, name)
        if entry.config_class is None:
            return []
        out = []
        for f in attrs.fields(entry.config_class):
            if not f.init:
                continue
            if f.default is attrs.NOTHING:
                default = "required"
            elif isinstance(f.default, attrs.Factory):  # type: ignore[arg-type]
                default = repr(f.default.factory())
            else:
                default = repr(f.default)
            ftype = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", repr(f.type))
            out.append(FieldInfo(name=f.name, type=str(ftype), default=default, doc=f.metadata.get("doc", "")))
        return out

    @property
    def hook(self):
        """The pluggy hook relay, for firing event hooks: ``registry.hook.layer_quantized(...)``."""
        self.ensure_loaded()
        return self.pm.hook
