"""The backend registry: pluggy over the ``lmspec`` entry-point group.

Plugins come from installed distributions (entry-point group ``lmspec``), from
``LMSPEC_PLUGINS=mod1,mod2``, from ``lmspec run --plugin MOD`` and, in tests, from
plugin objects. Each plugin's hook is called on its own, so a plugin that fails to
import, fails to register, or registers a malformed backend is recorded with its
error and every other backend still runs (CONTRACT §3).
"""

from __future__ import annotations

import importlib
import os
import re
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from lmspec._plugin import PROJECT
from lmspec._precision import DTYPES
from lmspec.backends import hookspecs

ENTRY_POINT_GROUP = "lmspec"
BUILTIN_PLUGIN = "lmspec.backends.builtin"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
BUILTIN_NAMES = ("torch-cpu", "torch-cuda", "torch-cuda-tf32", "jax-cpu", "jax-cuda",
                 "onnxruntime-cpu", "onnxruntime-cuda", "transformers-cpu")
"""Names reserved for the built-in plugin (CONTRACT §3): any other plugin registering one
is refused, whatever the order in which plugins load."""


@dataclass
class Plugin:
    """Where backends came from: a module, an entry point or an object."""

    name: str
    source: str  # "entry point", "LMSPEC_PLUGINS", "--plugin", "object"
    module: str = ""
    distribution: str = ""
    version: str = ""
    error: str = ""

    @property
    def label(self) -> str:
        dist = f"{self.distribution} {self.version}".strip()
        return f"{self.name} ({dist})" if dist else self.name


@dataclass
class Entry:
    """One backend (or one plugin that failed before it could register any)."""

    name: str
    plugin: Plugin
    backend: Any = None
    status: str = "ok"
    _checked: bool = field(default=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def device(self) -> str:
        return str(getattr(self.backend, "device", ""))

    @property
    def dtypes(self) -> tuple[str, ...]:
        return tuple(getattr(self.backend, "dtypes", ()))


def plugin_of(ep: metadata.EntryPoint) -> Plugin:
    """The :class:`Plugin` record of an entry point (nothing is imported)."""
    dist = getattr(ep, "dist", None)
    return Plugin(ep.name, "entry point", ep.value, getattr(dist, "name", "") or "",
                  getattr(dist, "version", "") or "")


def _error(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" ({last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


class Registry:
    """Loads plugins and holds every backend with its status."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs.BackendSpec)
        self.plugins: list[Plugin] = []
        self.entries: list[Entry] = []

    # -- loading -----------------------------------------------------------------
    @classmethod
    def default(cls, extra_modules: Iterable[str] = (), *, entry_points: bool = True) -> Registry:
        """Entry points, then ``LMSPEC_PLUGINS``, then ``extra_modules`` (``--plugin``)."""
        reg = cls()
        if entry_points:
            reg.load_entry_points()
        if not any(p.module == BUILTIN_PLUGIN for p in reg.plugins):
            reg.load_module(BUILTIN_PLUGIN, "built-in")  # running from a source tree
        env = [m.strip() for m in os.environ.get("LMSPEC_PLUGINS", "").split(",") if m.strip()]
        for mod in env:
            reg.load_module(mod, "LMSPEC_PLUGINS")
        for mod in extra_modules:
            reg.load_module(mod, "--plugin")
        return reg

    def load_entry_points(self) -> None:
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            self.load_entry_point(ep)

    def load_entry_point(self, ep: metadata.EntryPoint) -> None:
        plugin = plugin_of(ep)
        if any(p.module == ep.value and p.error == "" for p in self.plugins):
            return  # the same module installed twice (e.g. editable + site)
        try:
            obj = ep.load()
        except BaseException as exc:  # noqa: BLE001 - a broken plugin must not crash us
            self._failed(plugin, exc)
            return
        self.add(obj, plugin)

    def load_module(self, module: str, source: str) -> None:
        plugin = Plugin(module, source, module)
        if any(p.module == module and not p.error for p in self.plugins):
            return
        try:
            obj = importlib.import_module(module)
        except BaseException as exc:  # noqa: BLE001
            self._failed(plugin, exc)
            return
        plugin.version = str(getattr(obj, "__version__", ""))
        self.add(obj, plugin)

    def add(self, obj: Any, plugin: Plugin | None = None) -> None:
        """Register a plugin object (a module or any object with the hook) and call it."""
        plugin = plugin or Plugin(getattr(obj, "__name__", type(obj).__name__), "object")
        try:
            self.pm.register(obj, name=f"{plugin.source}:{plugin.name}:{id(obj)}")
            impls = [i for i in self.pm.hook.register_backends.get_hookimpls() if i.plugin is obj]
            if not impls:
                raise TypeError("no register_backends hook implementation "
                                "(decorate it with @lmspec.hookimpl)")
            self.pm.check_pending()
        except BaseException as exc:  # noqa: BLE001
            if self.pm.is_registered(obj):
                self.pm.unregister(obj)
            self._failed(plugin, exc)
            return
        self.plugins.append(plugin)
        before = len(self.entries)
        try:
            for impl in impls:
                impl.function(register=lambda b, _p=plugin: self._register(b, _p))
        except BaseException as exc:  # noqa: BLE001
            plugin.error = _error(exc)
            del self.entries[before:]
            self.entries.append(Entry(plugin.name, plugin, None, f"failed to load: {plugin.error}"))

    def _failed(self, plugin: Plugin, exc: BaseException) -> None:
        plugin.error = _error(exc)
        self.plugins.append(plugin)
        self.entries.append(Entry(plugin.name, plugin, None, f"failed to load: {plugin.error}"))

    def _register(self, backend: Any, plugin: Plugin) -> None:
        name = getattr(backend, "name", None)
        problem = ""
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            problem = f"backend name {name!r} must match [a-z0-9][a-z0-9._-]{{0,63}}"
        elif name in BUILTIN_NAMES and plugin.module.split(":")[0] != BUILTIN_PLUGIN:
            problem = f"name {name!r} is taken by lmspec (built-in)"
        elif any(e.name == name and e.backend is not None for e in self.entries):
            problem = f"backend name {name!r} is already registered"
        elif not isinstance(getattr(backend, "device", None), str):
            problem = "backend.device must be a str"
        else:
            dtypes = getattr(backend, "dtypes", None)
            if not isinstance(dtypes, (tuple, list)) or not set(dtypes) <= set(DTYPES):
                problem = f"backend.dtypes must be a tuple of {sorted(DTYPES)}, got {dtypes!r}"
        label = name if isinstance(name, str) and NAME_RE.fullmatch(name) else (
            repr(name) if isinstance(name, str) else f"<{type(backend).__name__}>")
        if problem:
            self.entries.append(Entry(label, plugin, None, f"failed to load: {problem}"))
        else:
            self.entries.append(Entry(name, plugin, backend))

    # -- queries -----------------------------------------------------------------
    def check(self, entry: Entry) -> Entry:
        """Fill in ``entry.status`` from ``available()`` (once; errors are contained)."""
        if entry.backend is None or entry._checked:
            return entry
        entry._checked = True
        avail = getattr(entry.backend, "available", None)
        if avail is None:
            return entry
        try:
            ok, why = avail()
        except BaseException as exc:  # noqa: BLE001
            entry.status = f"unavailable: available() raised {_error(exc)}"
        else:
            if not ok:
                entry.status = f"unavailable: {why or 'reason not given'}"
        return entry

    def all(self) -> list[Entry]:
        return [self.check(e) for e in self.entries]

    def get(self, name: str) -> Entry | None:
        for e in self.entries:
            if e.name == name:
                return self.check(e)
        return None

    def available(self) -> list[Entry]:
        return [e for e in self.all() if e.ok]
