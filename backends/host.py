"""The backend host: the child process in which plugin code runs (CONTRACT §3).

The judge — the Hypothesis search, the reference, the baseline, the tolerance and the
verdict — never imports or calls plugin code. It starts this module as a child process
(``python -I -m lmspec.backends.host FD``, inside a sandbox where one is available) and
speaks the flat protocol of :mod:`lmspec.backends.wire` with it over the socket ``FD``;
:mod:`lmspec.backends.remote` is the other end. The child's stdin is ``/dev/null`` and its
stdout/stderr go to a capture file that the judge reads, so nothing a plugin prints
reaches lmspec's own output.

Requests are tuples ``(verb, *payload)`` (pickled by the judge, which the host trusts);
every reply is a frame whose header says ``"ok"`` with a value, or ``"raise"`` with the
exception's type, message and whether it is a ``NotImplementedError``:

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

Replies hold NumPy arrays of numeric dtypes, numbers, strings, tuples, lists, dicts and
None (outputs of other types are converted with ``numpy.asarray``); the judge rebuilds the
arrays from raw bytes and unpickles nothing. Messages are cut to :data:`MAX_MESSAGE`
characters.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import socket
import sys
import threading
import time
import zlib
from importlib import metadata
from typing import Any

from lmspec.backends import wire

MAX_MESSAGE = 2000
"""Longest exception message (characters) a reply carries; longer ones are cut."""


def cut(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to ``limit`` characters, saying how much was dropped."""
    if len(text) <= limit:
        return text
    return text[:limit] + f" …[{len(text) - limit} more characters cut]"


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
    from lmspec.sampling import SAMPLERS

    d["implements"] = [op for op in (*lmspec.OPS, *SAMPLERS) if _callable_attr(b, op)]
    d["vjp"] = _callable_attr(b, "vjp")
    try:
        devs = dict(getattr(b, "deviations", None) or {})
    except Exception as exc:  # noqa: BLE001 - a broken attribute declares nothing
        d["status"] = f"failed to load: deviations raised {type(exc).__name__}: {exc}"
        return d
    for key, v in devs.items():
        try:
            d["deviations"][str(key)] = deviation_descriptor(str(key), v)
        except ValueError as exc:
            d["status"] = f"failed to load: {exc}"
            d["deviations"] = {}
            return d
    return d


def deviation_descriptor(key: str, dev: Any) -> dict[str, Any]:
    """What the judge needs of one declared deviation: its reason, whether it has a
    predicate (evaluated here, in the host) and its bound (CONTRACT §3). A key that names
    no op, check form or dtype, and a deviation with neither predicate nor bound (a plain
    string included), are refused with a ``ValueError`` that says why.

    A key may hold several deviations (a tuple or list of them, each bounded): an example
    is excused when any of them excuses it; the descriptor lists them as ``parts``."""
    if isinstance(dev, (tuple, list)):
        if not dev:
            raise ValueError(f"deviation {key!r}: an empty list of deviations")
        parts = [deviation_descriptor(key, d) for d in dev]
        return {"reason": cut("; ".join(p["reason"] for p in parts)), "parts": parts}
    import lmspec
    from lmspec._precision import DTYPES
    from lmspec.backend import WORKING_PRECISIONS

    parts = key.split("/")
    op = parts[0]
    if op not in lmspec.OPS or len(parts) > 3 or (len(parts) == 3 and parts[2] not in DTYPES) \
            or (len(parts) >= 2 and not parts[1]):
        raise ValueError(f"deviation key {key!r} is not 'op', 'op/check', 'op/check/dtype' "
                         "or 'op/*/dtype' with a catalogue op and one of "
                         f"{', '.join(DTYPES)}")
    if parts[1:2] == ["*"] and len(parts) != 3:
        raise ValueError(f"deviation key {key!r}: '*' stands for every check of one dtype "
                         "('op/*/dtype')")
    reason = getattr(dev, "reason", dev)
    predicate = callable(getattr(dev, "applies", None))
    bound = getattr(dev, "bound", None)
    if isinstance(bound, str) and bound not in WORKING_PRECISIONS:
        raise ValueError(f"deviation {key!r}: bound {bound!r} is not a working precision "
                         f"({', '.join(WORKING_PRECISIONS)})")
    if bound is not None and not isinstance(bound, str):
        try:
            bound = float(bound)
        except (TypeError, ValueError):
            raise ValueError(f"deviation {key!r}: bound must be a ratio > 1 or a working "
                             f"precision, got {type(bound).__name__}") from None
        if not (math.isfinite(bound) and bound > 1):
            raise ValueError(f"deviation {key!r}: bound must be a finite ratio > 1, got "
                             f"{bound!r}")
    if not predicate and bound is None:
        raise ValueError(f"deviation {key!r} is refused: it has neither a predicate nor a "
                         "bound, so it would excuse every example of its checks whatever "
                         "the error; declare lmspec.Deviation(reason, applies=..., "
                         "bound=...) (CONTRACT §3)")
    return {"reason": cut(str(reason)), "predicate": predicate, "bound": bound}


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
        return out, changed

    def applies(self, name: str, key: str, args: tuple, kwargs: dict,
                part: int | None = None) -> bool:
        dev = dict(getattr(self.backend(name), "deviations", None) or {})[key]
        if part is not None:  # one of several deviations under the key
            dev = dev[part]
        return bool(dev.applies(args, kwargs))

    def handle(self, request: tuple) -> tuple[dict[str, Any], list[Any]]:
        """The reply to ``request``: a header (without the request's id) and its arrays."""
        verb, *payload = request
        try:
            value = getattr(self, verb)(*payload)
        except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt/SystemExit included
            return _raised(exc), []
        try:
            tree, arrays = wire.encode(value)
        except BaseException as exc:  # noqa: BLE001 - an unsendable output is the backend's
            return _raised(TypeError(f"the backend's output cannot be sent to the judge: "
                                     f"{exc}")), []
        return {"status": "ok", "value": tree}, arrays


def _raised(exc: BaseException) -> dict[str, Any]:
    return {"status": "raise", "error": {"type": type(exc).__name__, "message": cut(str(exc)),
                                         "not_implemented": isinstance(exc,
                                                                       NotImplementedError)}}


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


def _plugin_path() -> None:
    """The host runs isolated (``python -I``: neither the working directory nor the user
    site is on ``sys.path``, so neither can shadow ``lmspec``); the plugin modules the user
    makes importable through ``PYTHONPATH`` are added once lmspec itself is imported."""
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = [os.path.abspath(p) for p in extra if os.path.abspath(p) not in sys.path]


def main(fd: int) -> None:
    _plugin_path()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the judge decides when a run stops
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGHUP})
    _die_with_parent()
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    host = Host()
    while True:
        try:
            header, body = wire.read_frame_blocking(sock)
        except (EOFError, OSError, wire.ProtocolError, ValueError):
            return
        if header.get("verb") == "exit":
            return
        reply, arrays = host.handle(pickle.loads(body))
        reply["id"] = header.get("id")
        try:
            wire.send_blocking(sock, wire.reply_frame(reply, arrays))
        except OSError:
            return
        sys.stdout.flush()
        sys.stderr.flush()


if __name__ == "__main__":
    main(int(sys.argv[1]))
