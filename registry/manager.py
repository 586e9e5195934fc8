"""The plugin registry: a pluggy PluginManager plus lookup of contributions by kind and name."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import re
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import attrs
import pluggy

from quanta.contracts import hooks as hookspecs
from quanta.contracts import GRIDS, KINDS as _KIND_TABLE, Algorithm
from quanta.errors import (
    DuplicatePluginError,
    PluginContractError,
    PluginLoadError,
    PluginNotFoundError,
)

__all__ = ["KINDS", "PluginEntry", "FieldInfo", "PluginFailure", "Registry", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "quanta"
#: The plugin kind names, from the one table of kinds (``quanta.contracts.KINDS``).
KINDS = tuple(_KIND_TABLE)
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
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
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
        for missing in sorted(only - seen):
            self._failures.append(PluginFailure(
                plugin=missing, distribution=None, version=None,
                error=f"QUANTA_PLUGINS names {missing!r}, but no installed distribution has an entry point of that "
                      f"name in the group {ENTRY_POINT_GROUP!r}"))

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

                        try:
                            impl.function(register=register)
                        except TypeError as exc:
                            if "abstract" not in str(exc):
                                raise
                            raise PluginContractError(
                                f"plugin {plugin_name!r} (distribution {distribution}) registered an incomplete "
                                f"{kind}: {exc}; implement every abstract method of quanta.contracts."
                                f"{_KIND_TABLE[kind].base.__name__} (docs/plugins.md)") from None
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
        base = _KIND_TABLE[kind].base
        if not isinstance(contribution, base):
            raise PluginContractError(
                f"{where} registered {contribution!r} as a {kind}, but it is not an instance of a subclass of "
                f"quanta.contracts.{base.__name__}. Since quanta 0.2 every contribution subclasses its kind's "
                f"class, which declares the required and optional methods: write "
                f"`class MyPlugin(quanta.contracts.{base.__name__})` (docs/plugins.md, 'Updating a plugin')")
        name = contribution.name
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise PluginContractError(f"{where} registered a {kind} without a valid 'name' (got {name!r})")
        desc = contribution.description
        if not isinstance(desc, str) or not desc.strip():
            raise PluginContractError(f"{where}: {kind} {name!r} needs a one-line 'description'")
        config_class = contribution.config_class
        if config_class is not None and not (isinstance(config_class, type) and attrs.has(config_class)):
            raise PluginContractError(f"{where}: {kind} {name!r} config_class must be an attrs class")
        problem = _declared_problem(kind, contribution)
        if problem:
            raise PluginContractError(f"{where}: {kind} {name!r} {problem}")
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
        """The entry for ``(kind, name)``; raises PluginNotFoundError (a KeyError) with near names,
        and the load error of any plugin that failed to load (it may have been the one meant)."""
        entries = self._kind(kind)
        try:
            return entries[name]
        except (KeyError, TypeError):
            raise PluginNotFoundError(kind, str(name), entries,
                                      failed=[f.error for f in self._failures]) from None

    def backends(self) -> list[PluginEntry]:
        """Backend entries in the order they are asked ``accepts``: highest ``priority`` first, then by name."""
        return sorted(self._kind("backend").values(), key=lambda e: (-e.obj.priority, e.name))

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

    def capabilities(self, kind: str, name: str) -> dict[str, Any]:
        """The capabilities a plugin declares through its kind's class attributes
        (``quanta.contracts.KINDS[kind].declared``: e.g. a scheme's ``grid``, a backend's ``priority``)."""
        entry = self.get(kind, name)
        return {attr: getattr(entry.obj, attr) for attr in _KIND_TABLE[kind].declared}

    @property
    def hook(self):
        """The pluggy hook relay, for firing event hooks: ``registry.hook.layer_quantized(...)``."""
        self.ensure_loaded()
        return self.pm.hook


def _declared_problem(kind: str, c: Any) -> str | None:
    """What is wrong with the declared capabilities of contribution ``c`` of ``kind``, or None."""
    def bad_grids(grids):
        return not isinstance(grids, frozenset) or not grids or not grids <= set(GRIDS)

    if kind == "scheme" and c.grid not in GRIDS:
        return f"declares grid {c.grid!r}; allowed: {', '.join(GRIDS)}"
    if kind == "backend":
        if isinstance(c.priority, bool) or not isinstance(c.priority, int):
            return f"priority must be an int, got {c.priority!r}"
        if bad_grids(c.grids):
            return f"grids must be a non-empty frozenset of {', '.join(GRIDS)}, got {c.grids!r}"
    if kind == "exporter":
        if c.suffix is not None and not (isinstance(c.suffix, str) and c.suffix.startswith(".")):
            return f"suffix must be None or a string starting with '.', got {c.suffix!r}"
        if bad_grids(c.grids):
            return f"grids must be a non-empty frozenset of {', '.join(GRIDS)}, got {c.grids!r}"
    if kind == "algorithm":
        if c.changes not in ("weights", "model"):
            return f"declares changes={c.changes!r}; allowed: 'weights', 'model'"
        if c.training_loop and type(c).session is Algorithm.session:
            return "declares training_loop = True but does not implement session()"
        def type_names(value) -> bool:
            return isinstance(value, tuple) and all(isinstance(t, str) for t in value)

        types = c.global_types
        if types is not None and not (type_names(types) or (
                isinstance(types, Mapping) and all(isinstance(k, str) and type_names(v) for k, v in types.items()))):
            return (f"global_types must be None, a tuple of type names or a mapping of backend name -> tuple, "
                    f"got {types!r}")
    return None
