"""The judge's side of the backend host (see :mod:`lmspec.backends.host`).

:class:`HostProcess` starts a host child, sends it requests and waits for each reply
at most ``timeout`` seconds: a call that overstays gets the child killed (its whole
process group, ``SIGKILL``), not interrupted, and a child that dies — ``os._exit``, a
segfault, out of memory — is noticed by the closed socket. Either way the next request
starts a fresh child and loads the plugin again. :class:`RemoteBackend` makes a backend
served by a host look like the backend object itself, so the harness is the same for
in-process objects (the project's tests, ``lmspec.check``) and plugins.

Replies are unpickled with an allow-list of NumPy and ml_dtypes constructors only: a
plugin cannot run code in the judge by crafting its reply.
"""

from __future__ import annotations

import io
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

DEFAULT_TIMEOUT_S = 30.0
"""Default limit on one backend call (``lmspec run --timeout``)."""

MAX_REPLY_BYTES = 1 << 30
"""Largest reply the judge accepts (a larger one is an error of the backend)."""

MAX_OUTPUT = 4000
"""Characters of a backend's captured stdout/stderr kept per check."""


class BackendRaised(Exception):
    """The backend raised an exception (status ``error``)."""


class InputModified(Exception):
    """The backend modified one of its input arrays (``path``: ``("args", i, …)`` or
    ``("kwargs", name, …)``)."""

    def __init__(self, path: tuple):
        super().__init__(path)
        self.path = path


class BackendFatal(Exception):
    """The backend host died or overstayed: the check ends as ``error`` at once."""


_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.numeric", "_frombuffer"), ("builtins", "complex"), ("builtins", "slice"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module == "ml_dtypes" and name in (
                "bfloat16", "float8_e4m3fn", "float8_e5m2")) or (
                module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the backend's reply holds a {module}.{name}, which the "
                                     "judge does not accept")


def safe_loads(data: bytes) -> Any:
    return _SafeUnpickler(io.BytesIO(data)).load()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "was killed"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class HostProcess:
    """One backend host child, restarted on demand, loading ``plugins`` each time."""

    def __init__(self, plugins: Sequence[tuple[str, str]], timeout: float = DEFAULT_TIMEOUT_S,
                 load_timeout: float | None = None):
        self.plugins = list(plugins)
        self.timeout = timeout
        self.load_timeout = max(timeout, 60.0) if load_timeout is None else load_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None
        self.capture = tempfile.TemporaryFile(prefix="lmspec-host-")
        self.descriptors: list[dict[str, Any]] = []
        self.starts = 0
        self._dismissed = False

    # -- life cycle ----------------------------------------------------------------
    def start(self) -> list[dict[str, Any]]:
        """Start a child and load the plugins; their backend descriptors."""
        self.spawn()
        return self.collect()

    def spawn(self) -> None:
        """Start the child and ask it to load the plugins (:meth:`collect` gets the
        answers), so that several hosts start in parallel."""
        parent, child = socket.socketpair()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lmspec.backends.host", str(child.fileno())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=self.capture,
                stderr=subprocess.STDOUT, start_new_session=True, env=env)
        finally:
            child.close()
        self.conn = Connection(parent.detach())
        self.starts += 1
        self._dismissed = False
        for source, target in self.plugins:
            self.send(("load", source, target))

    def collect(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        t0 = time.monotonic()
        for _source, target in self.plugins:
            if self.proc is None:  # the child died loading an earlier plugin
                out.append({"name": target, "status": "failed to load: not loaded (the "
                            "backend process ended before it)", "plugin": target})
                continue
            try:
                out += self.receive(max(0.01, self.load_timeout - (time.monotonic() - t0)))
            except (BackendRaised, BackendFatal, NotImplementedError) as exc:
                out.append({"name": target, "status": f"failed to load: {exc}",
                            "plugin": target})
        self.descriptors = out
        return out

    def kill(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
        self._forget()

    def _forget(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn, self.proc = None, None

    def dismiss(self) -> None:
        """Ask the child to leave without waiting for it (:meth:`close` reaps it): a
        controller whose checks run in other processes lets it exit meanwhile."""
        if self.proc is not None and self.conn is not None and not self._dismissed:
            try:
                self.conn.send_bytes(pickle.dumps(("exit",)))
                self._dismissed = True
            except OSError:
                pass

    def close(self) -> None:
        """Ask the child to leave; kill it if it does not within a second."""
        self.dismiss()
        if self.proc is not None:
            try:
                self.proc.wait(1.0)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        self.capture.close()

    def __del__(self) -> None:  # a judge that forgets to close still leaves no child behind
        try:
            self.kill()
        except Exception:  # noqa: BLE001
            pass

    # -- output --------------------------------------------------------------------
    def output_mark(self) -> int:
        return self.capture.seek(0, io.SEEK_END)

    def output_since(self, mark: int, limit: int = MAX_OUTPUT) -> str:
        """What the backend printed since ``mark`` (the last ``limit`` characters)."""
        end = self.capture.seek(0, io.SEEK_END)
        if end <= mark:
            return ""
        self.capture.seek(max(mark, end - 4 * limit))
        text = self.capture.read().decode("utf-8", "replace")
        self.capture.seek(0, io.SEEK_END)
        return text if len(text) <= limit else "…" + text[-limit:]

    # -- requests ------------------------------------------------------------------
    def request(self, message: tuple, timeout: float | None = None) -> Any:
        """Send ``message`` and return the reply's value (raises BackendRaised,
        NotImplementedError or BackendFatal)."""
        self.send(message)
        return self.receive(timeout)

    def send(self, message: tuple) -> None:
        if self.proc is None and message[0] != "load":
            self.start()
        if self.conn is None:
            return
        try:
            self.conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            pass  # a dead child: receive() says how it ended

    def receive(self, timeout: float | None = None) -> Any:
        if self.conn is None:
            raise BackendFatal("the backend process is gone")
        limit = self.timeout if timeout is None else timeout
        try:
            if not self.conn.poll(limit):
                self.kill()
                raise BackendFatal(f"timed out after {limit:g} s (the backend process was "
                                   "killed)")
            reply = safe_loads(self.conn.recv_bytes(MAX_REPLY_BYTES))
        except (EOFError, OSError, pickle.UnpicklingError) as exc:
            code = None
            if self.proc is not None:
                try:
                    code = self.proc.wait(2.0)
                except subprocess.TimeoutExpired:
                    pass
            self.kill()
            if isinstance(exc, pickle.UnpicklingError):
                raise BackendFatal(str(exc)) from None
            if code is None and isinstance(exc, OSError) and "bad message length" in str(exc):
                raise BackendFatal(f"the backend's reply exceeds {MAX_REPLY_BYTES} bytes"
                                   ) from None
            raise BackendFatal(f"the backend process {_exit_text(code)}") from None
        if reply[0] == "ok":
            return reply[1]
        _, kind, text, not_implemented = reply
        if not_implemented:
            raise NotImplementedError(text)
        raise BackendRaised(f"{kind}: {text}" if text else kind)


class RemoteBackend:
    """A backend served by a :class:`HostProcess`, with the backend's own interface.

    ``getattr(remote, op)`` exists exactly when the backend implements ``op``; calling
    it sends the arguments to the host (a copy, by pickling) and raises
    :class:`InputModified` when the host saw the backend change one of them.
    """

    def __init__(self, descriptor: Mapping[str, Any], host: HostProcess):
        self.descriptor = dict(descriptor)
        self.host = host
        self.name: str = descriptor["name"]
        self.device: str = descriptor.get("device", "")
        self.dtypes: tuple[str, ...] = tuple(descriptor.get("dtypes", ()))
        self.implements = frozenset(descriptor.get("implements", ()))
        self.precision: dict[str, str] = dict(descriptor.get("precision", {}))
        self.deviations = {key: _RemoteDeviation(self, key, d["reason"], d["predicate"],
                                                 d.get("bound"))
                           for key, d in descriptor.get("deviations", {}).items()}
        if descriptor.get("vjp"):
            self.vjp = self._method("vjp")

    def __getattr__(self, op: str) -> Callable[..., Any]:
        if op.startswith("_") or op not in self.__dict__.get("implements", ()):
            raise AttributeError(op)
        return self._method(op)

    def _method(self, method: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            out, changed = self.host.request(("call", self.name, method, args, kwargs))
            if changed:
                raise InputModified(tuple(changed[0]))
            return out

        call.__name__ = method
        call.remote = True  # type: ignore[attr-defined] # the host enforces the time limit
        return call

    def available(self) -> tuple[bool, str]:
        return tuple(self.host.request(("available", self.name)))  # type: ignore[return-value]

    def info(self) -> dict[str, Any]:
        return dict(self.host.request(("info", self.name)))


class _RemoteDeviation:
    def __init__(self, backend: RemoteBackend, key: str, reason: str, predicate: bool,
                 bound: float | str | None = None):
        self.reason = reason
        self.bound = bound
        self.applies = (lambda args, kwargs: bool(backend.host.request(
            ("applies", backend.name, key, tuple(args), dict(kwargs))))) if predicate else None


def ask_all(hosts: Sequence[HostProcess], messages: Sequence[tuple],
            timeout: float) -> list[Any]:
    """Send each message to its host and collect the replies (a value, or the exception
    it raised), each within ``timeout`` seconds. Different hosts work in parallel (one
    hanging plugin costs the others nothing); the messages of one host go in turn."""
    results: list[Any] = [None] * len(messages)
    queues: dict[int, list[int]] = {}
    for i, h in enumerate(hosts):
        queues.setdefault(id(h), []).append(i)
    while any(queues.values()):
        batch = [q.pop(0) for q in queues.values() if q]
        for i in batch:
            hosts[i].send(messages[i])
        for i in batch:
            try:
                results[i] = hosts[i].receive(timeout)
            except (BackendRaised, BackendFatal, NotImplementedError) as exc:
                results[i] = exc
    return results
