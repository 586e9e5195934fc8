"""The plugin registry: a pluggy PluginManager plus lookup of contributions by kind and name.

Every hook goes through pluggy. The registration hooks are historic (pytest's ``call_historic``
pattern): the registry calls each once, with a :class:`~quanta.contracts.hooks.Registrar`, and
pluggy replays that call for each plugin as it is registered. ``check_pending`` refuses a hook
implementation whose name no spec has, naming the nearest hook. Event-hook implementations are
isolated as pluggy registers them, so a failing listener becomes a ``PluginWarning``.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import threading
import warnings
from contextlib import contextmanager
from functools import wraps
from typing import Any, Callable, Iterator

import attrs
import pluggy

from quanta.contracts import hooks as hookspecs
from quanta.contracts import KINDS as _KIND_TABLE
from quanta.contracts.hooks import Registrar
from quanta.errors import (
    DuplicatePluginError,
    PluginContractError,
    PluginLoadError,
    PluginNotFoundError,
    PluginWarning,
    did_you_mean,
)

from .checks import abstract_contributions, check_contract, incomplete
from .tracing import trace_hook_calls, tracing_requested

__all__ = ["KINDS", "PluginEntry", "FieldInfo", "PluginFailure", "Registry", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "quanta"
#: The plugin kind names, from the one table of kinds (``quanta.contracts.KINDS``).
KINDS = tuple(_KIND_TABLE)


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

    def to_dict(self) -> dict[str, Any]:
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

    def to_dict(self) -> dict[str, Any]:
        return {"plugin": self.plugin, "distribution": self.distribution, "version": self.version, "error": self.error}


def _quanta_version() -> str:
    try:
        return md.version("quanta")
    except md.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def _isolated(function: Callable[..., Any], hook_name: str, plugin_name: str) -> Callable[..., Any]:
    """``function`` (an event-hook implementation) with its exceptions turned into a PluginWarning."""
    @wraps(function)
    def isolated(*args: Any, **kwargs: Any) -> None:
        try:
            function(*args, **kwargs)
        except Exception as exc:  # isolate: an event listener never stops the run
            warnings.warn(f"plugin {plugin_name!r} failed in its {hook_name} hook and was skipped: "
                          f"{type(exc).__name__}: {exc}", PluginWarning, stacklevel=2)
    return isolated


class _PluginManager(pluggy.PluginManager):
    """pluggy's PluginManager whose event-hook implementations are isolated as they register:
    pluggy calls each through a guard, so one failing listener cannot stop the others or the run."""

    def register(self, plugin: object, name: str | None = None) -> str | None:
        plugin_name = super().register(plugin, name)
        if plugin_name is not None:
            for hook_name in hookspecs.EVENT_HOOKS:
                for impl in getattr(self.hook, hook_name).get_hookimpls():
                    if impl.plugin is plugin and not (impl.wrapper or impl.hookwrapper):
                        impl.function = _isolated(impl.function, hook_name, plugin_name)
        return plugin_name


@attrs.define
class _Adding:
    """The plugin being registered: where its contributions come from, and what it added so far."""

    plugin: str
    distribution: str
    version: str
    added: list[PluginEntry] = attrs.Factory(list)


class Registry:
    """Holds the PluginManager and every contribution, keyed by kind then name.

    Loading is lazy: ``get(kind, name)`` of a built-in imports only the built-in module that
    registers it (``quanta.plugins.BUILTIN_CONTRIBUTIONS``), ``names(kind)`` the built-ins of that
    kind, firing an event hook (:meth:`event_hooks`) the built-ins implementing one; each of
    them also loads the entry-point group ``quanta`` once, unless
    ``QUANTA_DISABLE_PLUGIN_AUTOLOAD=1`` (``QUANTA_PLUGINS=a,b`` loads only those entry points).
    :meth:`ensure_loaded`, ``hook``, ``entries()`` and ``failures()`` load everything. A
    plugin that registers a built-in's name is refused whether or not that built-in's module was
    imported yet. ``QUANTA_TRACE_PLUGINS=1`` prints every hook call to stderr.
    """

    def __init__(self, autoload: bool | None = None) -> None:
        self.pm = _PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        if tracing_requested():
            trace_hook_calls(self.pm)
        self._autoload = autoload
        self._entries: dict[str, dict[str, PluginEntry]] = {k: {} for k in KINDS}
        self._failures: list[PluginFailure] = []
        self._loaded = False
        self._entry_points_loaded = False
        self._builtins_done: set[str] = set()  # built-in modules registered (or removed) so far
        self._lock = threading.RLock()
        self._adding: _Adding | None = None
        for hook_name, kind in hookspecs.REGISTRATION_HOOKS.items():
            # Historic: pluggy replays this call for every plugin registered from now on.
            getattr(self.pm.hook, hook_name).call_historic(kwargs={"register": Registrar(kind, self._contribute)})

    # -- loading -----------------------------------------------------------------------
    def ensure_loaded(self) -> None:
        """Load every built-in and the entry points, once. Safe to call repeatedly."""
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            from quanta.plugins import BUILTIN_PLUGINS

            for modname in BUILTIN_PLUGINS:
                self._load_builtin(modname)
            self._load_entry_points_once()

    def _load_builtin(self, modname: str) -> None:
        """Import and register one built-in module (``quanta.plugins.BUILTIN_PLUGINS``), once."""
        if modname in self._builtins_done:
            return
        with self._lock:
            if modname in self._builtins_done:
                return
            self._builtins_done.add(modname)
            module = importlib.import_module(modname)
            # A broken built-in is a bug in quanta itself: let it raise.
            self._register(module, modname, "quanta", _quanta_version())

    def _load_builtins(self, kind: str | None = None, hooks: tuple[str, ...] = ()) -> None:
        """The built-ins registering a ``kind`` or implementing one of ``hooks``, then the entry points."""
        from quanta.plugins import BUILTIN_CONTRIBUTIONS, BUILTIN_HOOKS, BUILTIN_PLUGINS

        for modname in BUILTIN_PLUGINS:
            if kind in BUILTIN_CONTRIBUTIONS.get(modname, {}) or set(hooks) & set(BUILTIN_HOOKS.get(modname, ())):
                self._load_builtin(modname)
        self._load_entry_points_once()

    def _load_entry_points_once(self) -> None:
        if self._entry_points_loaded:
            return
        with self._lock:
            if self._entry_points_loaded:
                return
            self._entry_points_loaded = True
            if self._should_autoload():
                self._load_entry_points()

    @staticmethod
    def _builtin_module_of(kind: str, name: Any) -> str | None:
        """The built-in module that registers ``(kind, name)``, if one does."""
        from quanta.plugins import BUILTIN_CONTRIBUTIONS

        for modname, kinds in BUILTIN_CONTRIBUTIONS.items():
            if name in kinds.get(kind, ()):
                return modname
        return None

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
                self._register(obj, ep.name, dist_name or ep.name, dist_version or "")
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

        pluggy calls its registration hooks at once (they are historic); if any contribution
        breaks a contract or duplicates a name, or the plugin implements a hook that does not
        exist, nothing of this plugin stays registered and the error is raised. Returns the
        plugin name.
        """
        self._load_entry_points_once()  # entry points first, as if everything were loaded (built-in
        return self._register(obj, name, distribution, version)  # names are refused in _contribute)

    def _register(self, obj: Any, name: str | None, distribution: str, version: str) -> str:
        with self._lock:
            plugin_name = name or self.pm.get_canonical_name(obj)
            if self.pm.is_registered(obj) or self.pm.has_plugin(plugin_name) or self.pm.is_blocked(plugin_name):
                raise PluginContractError(f"plugin {plugin_name!r} is already registered or blocked")
            adding = self._adding = _Adding(plugin_name, distribution, version)
            try:
                self.pm.register(obj, name=plugin_name)
                self.pm.check_pending()
            except BaseException as exc:
                for entry in adding.added:
                    self._entries[entry.kind].pop(entry.name, None)
                problem = self._registration_problem(obj, plugin_name, distribution, exc)
                if self.pm.is_registered(obj):
                    self.pm.unregister(obj)
                if problem is not None:
                    raise problem from (None if isinstance(exc, pluggy.PluginValidationError) else exc)
                raise
            finally:
                self._adding = None
            return plugin_name

    def _contribute(self, kind: str, contribution: Any) -> None:
        """What a :class:`Registrar` calls: check ``contribution`` and add it for the plugin being registered."""
        adding = self._adding
        if adding is None:
            raise PluginContractError(f"register() for a {kind} was called outside a registration hook; "
                                      "call it inside register_schemes(register) and the like")
        where = f"plugin {adding.plugin!r} (distribution {adding.distribution})"
        description = check_contract(kind, contribution, where)
        existing = self._entries[kind].get(contribution.name)
        builtin = self._builtin_module_of(kind, contribution.name)
        if existing is None and builtin is not None and builtin != adding.plugin and builtin not in self._builtins_done:
            existing = PluginEntry(kind=kind, name=contribution.name, description="", config_class=None, obj=None,
                                   plugin=builtin, distribution="quanta", version="")  # not imported yet
        if existing is not None:
            raise DuplicatePluginError(
                f"{kind} {contribution.name!r} from {where} duplicates the one from plugin {existing.plugin!r} "
                f"(distribution {existing.distribution}); rename one of them")
        entry = PluginEntry(kind=kind, name=contribution.name, description=description,
                            config_class=contribution.config_class, obj=contribution, plugin=adding.plugin,
                            distribution=adding.distribution, version=adding.version or "")
        self._entries[kind][entry.name] = entry
        adding.added.append(entry)

    def _registration_problem(self, obj: Any, plugin_name: str, distribution: str,
                              exc: BaseException) -> PluginContractError | None:
        """The PluginContractError that explains why registering ``obj`` failed, or None to re-raise ``exc``."""
        where = f"plugin {plugin_name!r} (distribution {distribution})"
        if isinstance(exc, pluggy.PluginValidationError):
            known = sorted(name for name in dir(self.pm.hook) if not name.startswith("_")
                           and getattr(self.pm.hook, name).has_spec())
            unknown = sorted(caller.name for caller in (self.pm.get_hookcallers(obj) or [])
                             if not caller.has_spec())
            if unknown:
                return PluginContractError(
                    f"{where} implements the hook {unknown[0]!r}, which quanta does not have"
                    f"{did_you_mean(unknown[0], known)} (hooks: {', '.join(known)}; docs/plugins.md)")
            return PluginContractError(f"{where}: {' '.join(str(exc).split())}")
        if isinstance(exc, TypeError):
            candidates = abstract_contributions(exc.__traceback__)
            if candidates:
                kind, classes = next(iter(candidates.items()))
                return incomplete(where, kind, classes)
        return None

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

    # -- lookup ---------------------------------------------------------------------------
    def _kind(self, kind: str) -> dict[str, PluginEntry]:
        if kind not in self._entries:
            raise PluginNotFoundError("plugin kind", kind, KINDS)
        if not self._loaded:
            self._load_builtins(kind)
        return self._entries[kind]

    def names(self, kind: str) -> list[str]:
        """Sorted names registered for ``kind`` (one of ``KINDS``)."""
        return sorted(self._kind(kind))

    def get(self, kind: str, name: str) -> PluginEntry:
        """The entry for ``(kind, name)``; raises PluginNotFoundError (a KeyError) with near names,
        and the load error of any plugin that failed to load (it may have been the one meant)."""
        if kind in self._entries and not self._loaded:
            builtin = self._builtin_module_of(kind, name)
            if builtin is not None:
                self._load_builtin(builtin)
                if name in self._entries[kind]:
                    return self._entries[kind][name]
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
        if kind is None:
            self.ensure_loaded()
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
    def hook(self) -> pluggy.HookRelay:
        """The pluggy hook relay, every plugin loaded: ``registry.hook.example_models()``."""
        self.ensure_loaded()
        return self.pm.hook

    @property
    def event_hooks(self) -> pluggy.HookRelay:
        """The pluggy hook relay for firing event hooks (``registry.event_hooks.layer_quantized(...)``):
        loads the entry points and the built-ins that implement an event hook, not every built-in."""
        if not self._loaded:
            self._load_builtins(hooks=hookspecs.EVENT_HOOKS)
        return self.pm.hook

