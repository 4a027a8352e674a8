"""The backend host: the child process in which plugin code runs (CONTRACT §3).

The judge — the Hypothesis search, the reference, the baseline, the tolerance and the
verdict — never imports or calls plugin code. It starts this module as a child process
(``python -m lmspec.backends.host FD``) and speaks a small pickle protocol with it over
the socket ``FD``; :mod:`lmspec.backends.remote` is the other end. The child's stdin is
``/dev/null`` and its stdout/stderr go to a capture file that the judge reads, so
nothing a plugin prints reaches lmspec's own output.

Requests are tuples ``(verb, *payload)``; every reply is ``("ok", value)`` or
``("raise", type_name, message, not_implemented)``:

``("load", source, target)``
    load one plugin (``source`` is ``"entry point"``, ``"module"`` …, ``target`` the
    entry point's ``module:attr`` or a module name); value: a list of backend
    descriptors (name, device, dtypes, implemented ops, deviations, status).
``("available", name)`` / ``("info", name)``
    the backend's ``available()`` / ``info()`` (JSON-safe, bounded).
``("call", name, method, args, kwargs)``
    ``backend.method(*args, **kwargs)``; value: ``(result, changed)`` — the paths of
    the input arrays the backend modified (see :meth:`Host.call`).
``("applies", name, key, args, kwargs)``
    a declared deviation's predicate on one example.

Replies hold only NumPy arrays, numbers, strings, tuples, lists, dicts and None
(outputs of other types are converted with ``numpy.asarray``), so the judge can
unpickle them with a restricted unpickler. Messages are cut to
:data:`MAX_MESSAGE` characters.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import sys
import threading
import time
import zlib
from importlib import metadata
from multiprocessing.connection import Connection
from typing import Any

MAX_MESSAGE = 2000
"""Longest exception message (characters) a reply carries; longer ones are cut."""


def cut(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to ``limit`` characters, saying how much was dropped."""
    if len(text) <= limit:
        return text
    return text[:limit] + f" …[{len(text) - limit} more characters cut]"


def _plain(x: Any, depth: int = 0) -> Any:
    """``x`` as data the judge's restricted unpickler accepts."""
    import numpy as np

    if depth > 20:
        raise TypeError("output nested more than 20 levels deep")
    if x is None or isinstance(x, (bool, int, float, complex, str, bytes, np.ndarray,
                                   np.generic)):
        return x
    if isinstance(x, (tuple, list)):
        items = [_plain(a, depth + 1) for a in x]
        return tuple(items) if isinstance(x, tuple) else items
    if isinstance(x, dict):
        return {str(k): _plain(v, depth + 1) for k, v in x.items()}
    return np.asarray(x)  # tensors and other array-likes


def _fingerprints(x: Any, path: tuple = ()) -> list[tuple[tuple, tuple]]:
    """``(path, (shape, dtype, crc32 of the bytes))`` of every array in ``(args,
    kwargs)``; paths start with ``"args"`` or ``"kwargs"``."""
    import numpy as np

    if not path:
        args, kwargs = x
        return _fingerprints(args, ("args",)) + _fingerprints(kwargs, ("kwargs",))
    if isinstance(x, np.ndarray):
        return [(path, (x.shape, x.dtype.str, zlib.crc32(x.tobytes())))]
    if isinstance(x, (tuple, list)):
        return [p for i, a in enumerate(x) for p in _fingerprints(a, (*path, i))]
    if isinstance(x, dict):
        return [p for k, v in x.items() for p in _fingerprints(v, (*path, str(k)))]
    return []


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str, allow_nan=True)[:100_000]) if x else {}


def _descriptor(entry: Any) -> dict[str, Any]:
    import lmspec

    b = entry.backend
    d: dict[str, Any] = {"name": entry.name, "status": entry.status, "device": "",
                         "dtypes": [], "implements": [], "vjp": False, "deviations": {},
                         "plugin": entry.plugin.name, "distribution": entry.plugin.distribution,
                         "version": entry.plugin.version}
    if b is None:
        return d
    d.update(device=entry.device, dtypes=list(entry.dtypes))
    try:
        d["precision"] = {str(k): str(v) for k, v in dict(getattr(b, "precision", None)
                                                            or {}).items()}
    except Exception:  # noqa: BLE001 - a malformed declaration declares nothing
        d["precision"] = {}
    d["implements"] = [op for op in lmspec.OPS if _callable_attr(b, op)]
    d["vjp"] = _callable_attr(b, "vjp")
    try:
        devs = dict(getattr(b, "deviations", None) or {})
    except Exception as exc:  # noqa: BLE001 - a broken attribute declares nothing
        d["status"] = f"failed to load: deviations raised {type(exc).__name__}: {exc}"
        return d
    for key, v in devs.items():
        reason = getattr(v, "reason", v)
        d["deviations"][str(key)] = {"reason": cut(str(reason)),
                                     "predicate": callable(getattr(v, "applies", None))}
    return d


def _callable_attr(obj: Any, name: str) -> bool:
    try:
        return callable(getattr(obj, name, None))
    except Exception:  # noqa: BLE001
        return False


class Host:
    """The plugins loaded in this process and the requests it serves."""

    def __init__(self) -> None:
        from lmspec.backends.registry import Registry

        self.registry = Registry()

    def backend(self, name: str) -> Any:
        for e in self.registry.entries:
            if e.name == name and e.backend is not None:
                return e.backend
        raise LookupError(f"no backend {name!r} is loaded in this host")

    def load(self, source: str, target: str) -> list[dict[str, Any]]:
        before = len(self.registry.entries)
        if source == "entry point":
            eps = [ep for ep in metadata.entry_points(group="lmspec") if ep.value == target]
            if eps:
                self.registry.load_entry_point(eps[0])
            else:
                self.registry.load_module(target.split(":")[0], source)
        else:
            self.registry.load_module(target, source)
        return [_descriptor(e) for e in self.registry.entries[before:]]

    def available(self, name: str) -> tuple[bool, str]:
        fn = getattr(self.backend(name), "available", None)
        if fn is None:
            return True, ""
        ok, why = fn()
        return bool(ok), cut(str(why or ""))

    def info(self, name: str) -> dict[str, Any]:
        fn = getattr(self.backend(name), "info", None)
        return _jsonable(dict(fn())) if callable(fn) else {}

    def call(self, name: str, method: str, args: tuple, kwargs: dict) -> Any:
        """``(output, changed)``: ``changed`` lists the paths (``("args", 0)``,
        ``("kwargs", "mask")``, ``("args", 3, 1)`` …) of the input arrays the backend
        modified, found by fingerprinting them before and after the call (the judge
        keeps its own originals: this only names a breach of CONTRACT §3)."""
        before = dict(_fingerprints((args, kwargs)))
        out = getattr(self.backend(name), method)(*args, **kwargs)
        after = dict(_fingerprints((args, kwargs)))
        changed = [path for path, fp in before.items() if after.get(path) != fp]
        return _plain(out), changed

    def applies(self, name: str, key: str, args: tuple, kwargs: dict) -> bool:
        dev = dict(getattr(self.backend(name), "deviations", None) or {})[key]
        return bool(dev.applies(args, kwargs))

    def handle(self, request: tuple) -> tuple:
        verb, *payload = request
        try:
            value = getattr(self, verb)(*payload)
            return ("ok", value)
        except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt/SystemExit included
            return ("raise", type(exc).__name__, cut(str(exc)), isinstance(
                exc, NotImplementedError))


def _die_with_parent() -> None:
    """End this process when the judge that started it ends, however it ends."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except Exception:  # noqa: BLE001 - elsewhere the watchdog below does it
        pass
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def main(fd: int) -> None:
    # ``python -m`` put the working directory first on sys.path; the ``lmspec`` command
    # does not, and a project directory named like its package would shadow the
    # installed plugin (a namespace package without the hook). Modules outside the
    # installed packages come through PYTHONPATH, as for ``lmspec`` itself.
    if sys.path and sys.path[0] in ("", os.getcwd()) and sys.path[0] not in os.environ.get(
            "PYTHONPATH", "").split(os.pathsep):
        sys.path.pop(0)
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the judge decides when a run stops
    conn = Connection(socket.socket(fileno=fd).detach())
    host = Host()
    while True:
        try:
            request = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        if request == ("exit",):
            return
        reply = host.handle(request)
        try:
            data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as exc:  # noqa: BLE001 - an unpicklable output is the backend's
            data = pickle.dumps(("raise", "TypeError", cut(
                f"the backend's output cannot be sent to the judge: {exc}"), False))
        conn.send_bytes(data)
        sys.stdout.flush()
        sys.stderr.flush()


if __name__ == "__main__":
    main(int(sys.argv[1]))
