"""Which backends exist, learned without importing a single plugin in this process.

Plugins are *sources* — installed entry points (group ``lmspec``), the built-in plugin,
``LMSPEC_PLUGINS=mod1,mod2`` and ``--plugin MOD`` — found from package metadata and
names only. Each source is loaded in its own backend host (:mod:`lmspec.backends.host`),
all in parallel, so a plugin that crashes, hangs or prints while importing, registering
or answering ``available()`` affects its own entries and nothing else (CONTRACT §3).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from . import validate
from .registry import BUILTIN_NAMES, BUILTIN_PLUGIN, ENTRY_POINT_GROUP
from .remote import DEFAULT_TIMEOUT_S, BackendFatal, HostProcess, RemoteBackend, ask_all


@dataclass(frozen=True)
class Source:
    """A plugin, by name only: ``kind`` is ``entry point``, ``built-in``,
    ``LMSPEC_PLUGINS`` or ``--plugin``; ``target`` the entry point's value or a module."""

    kind: str
    target: str
    name: str
    distribution: str = ""
    version: str = ""

    @property
    def builtin(self) -> bool:
        return self.target.split(":")[0] == BUILTIN_PLUGIN

    @property
    def label(self) -> str:
        dist = f"{self.distribution} {self.version}".strip()
        return f"{self.name} ({dist})" if dist else self.name


def sources(extra_modules: Iterable[str] = ()) -> list[Source]:
    """Every plugin source, in load order: entry points (by name), the built-in plugin
    when running from a source tree, ``LMSPEC_PLUGINS``, then ``extra_modules``."""
    out: list[Source] = []
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if any(s.target == ep.value for s in out):
            continue  # the same module installed twice (e.g. editable + site)
        dist = getattr(ep, "dist", None)
        out.append(Source("entry point", ep.value, ep.name, getattr(dist, "name", "") or "",
                          getattr(dist, "version", "") or ""))
    if not any(s.builtin for s in out):
        import lmspec

        out.append(Source("built-in", BUILTIN_PLUGIN, "lmspec", "lmspec", lmspec.__version__))
    env = [m.strip() for m in os.environ.get("LMSPEC_PLUGINS", "").split(",") if m.strip()]
    for kind, mods in (("LMSPEC_PLUGINS", env), ("--plugin", list(extra_modules))):
        for mod in mods:
            if not any(s.target == mod for s in out):
                out.append(Source(kind, mod, mod))
    return out


@dataclass
class Entry:
    """One backend as the judge knows it: its descriptor, its status and its host."""

    name: str
    source: Source
    descriptor: dict[str, Any]
    host: HostProcess | None = None
    status: str = "ok"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def loaded(self) -> bool:
        return self.host is not None and not self.status.startswith("failed to load")

    @property
    def device(self) -> str:
        return str(self.descriptor.get("device", ""))

    @property
    def dtypes(self) -> tuple[str, ...]:
        return tuple(self.descriptor.get("dtypes", ()))

    def backend(self) -> RemoteBackend:
        assert self.host is not None
        return RemoteBackend(self.descriptor, self.host)

    def row(self) -> dict[str, Any]:
        """The report's / ``lmspec backends --json``'s record of this backend."""
        row = {"name": self.name, "device": self.device, "dtypes": list(self.dtypes),
               "plugin": self.source.label, "source": self.source.kind,
               "version": self.source.version, "status": self.status, "info": self.info}
        devs = self.descriptor.get("deviations") or {}
        if devs:  # every declared deviation: key, reason, predicate?, bound (CONTRACT §3)
            row["deviations"] = [{"key": k, "reason": p.get("reason", ""),
                                  "predicate": bool(p.get("predicate")),
                                  "bound": p.get("bound")}
                                 for k, d in sorted(devs.items())
                                 for p in d.get("parts", [d])]
        precision = self.descriptor.get("precision") or {}
        if precision:
            row["precision"] = dict(precision)
        return row


class BackendTable:
    """Every backend of the given sources, each loaded in a host of its own plugin."""

    def __init__(self, srcs: Sequence[Source], timeout: float = DEFAULT_TIMEOUT_S,
                 probe_timeout: float | None = None):
        self.timeout = timeout
        self.probe_timeout = timeout if probe_timeout is None else probe_timeout
        self.entries: list[Entry] = []
        self.hosts: list[HostProcess] = []
        self._load(srcs)

    @classmethod
    def default(cls, extra_modules: Iterable[str] = (), timeout: float = DEFAULT_TIMEOUT_S,
                only_builtin: bool = False, probe_timeout: float | None = None
                ) -> BackendTable:
        """All sources; ``only_builtin`` loads the built-in plugin alone (enough when
        every backend asked for has a reserved built-in name)."""
        srcs = sources(extra_modules)
        return cls([s for s in srcs if s.builtin] if only_builtin else srcs, timeout,
                   probe_timeout)

    def _load(self, srcs: Sequence[Source]) -> None:
        hosts = [HostProcess([(s.kind, s.target)], self.timeout,
                             load_timeout=max(self.probe_timeout, 60.0)) for s in srcs]
        for h in hosts:
            h.spawn()
        for src, host in zip(srcs, hosts):
            self.hosts.append(host)
            for raw in host.collect():
                d, status = validate.descriptor(raw, src.target)
                name = d["name"]
                if status == "ok" and any(e.name == name and e.loaded for e in self.entries):
                    status = f"failed to load: backend name {name!r} is already registered"
                if status == "ok" and name in BUILTIN_NAMES and not src.builtin:
                    status = f"failed to load: name {name!r} is taken by lmspec (built-in)"
                ok = not status.startswith("failed to load")
                self.entries.append(Entry(name, src, d, host if ok else None, status))

    def check(self, entries: Sequence[Entry] | None = None) -> list[Entry]:
        """Fill in each entry's status from ``available()`` and its ``info()``, all
        hosts in parallel, each answer within the call timeout."""
        todo = [e for e in (self.entries if entries is None else entries)
                if e.loaded and e.status == "ok" and not e.info]
        answers = ask_all([e.host for e in todo], [("available", e.name) for e in todo],
                          self.probe_timeout)  # type: ignore[misc]
        for e, ans in zip(todo, answers):
            pair = None if isinstance(ans, BaseException) else validate.availability(ans)
            if isinstance(ans, BaseException):
                e.status = f"unavailable: available() {_failure(ans)}"
            elif pair is None:
                e.status = "unavailable: available() returned a malformed answer"
            elif not pair[0]:
                e.status = f"unavailable: {pair[1] or 'reason not given'}"
        live = [e for e in todo if e.ok]
        infos = ask_all([e.host for e in live], [("info", e.name) for e in live],
                        self.probe_timeout)  # type: ignore[misc]
        for e, ans in zip(live, infos):
            e.info = {"error": f"info() {_failure(ans)}"} if isinstance(
                ans, BaseException) else validate.info(ans)
        return list(self.entries if entries is None else entries)

    def get(self, name: str) -> Entry | None:
        for e in self.entries:
            if e.name == name:
                return e
        return None

    def dismiss(self) -> None:
        """Let the hosts exit without waiting (:meth:`close` reaps them)."""
        for h in self.hosts:
            h.dismiss()

    def close(self) -> None:
        for h in self.hosts:
            h.close()


def _failure(exc: BaseException) -> str:
    if isinstance(exc, BackendFatal):
        return str(exc)
    return f"raised {exc}"
