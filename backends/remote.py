"""The judge's side of the backend host (see :mod:`lmspec.backends.host`).

:class:`HostProcess` starts a host child (in the sandbox of :mod:`lmspec.backends.sandbox`),
sends it requests and reads each reply against the call's deadline, every byte of it: a
call that overstays gets the child killed (its whole process group, ``SIGKILL``), not
interrupted, and a child that dies — ``os._exit``, a segfault, out of memory — is noticed
by the closed socket. Either way the next request starts a fresh child and loads the
plugin again. A child killed by a signal the judge did not send is restarted and asked
once more; while the judge itself is being stopped, that death is part of the stop.
:class:`RemoteBackend` makes a backend served by a host look like the backend object
itself, so the harness is the same for in-process objects (the project's tests,
``lmspec.check``) and plugins.

Replies are flat frames (:mod:`lmspec.backends.wire`): JSON and raw array bytes, never a
pickle. Each carries the id of the request it answers; any other id, a malformed frame
or one over the limits is the backend's error and restarts its host.
"""

from __future__ import annotations

import io
import itertools
import os
import pickle
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import guard, sandbox, wire

DEFAULT_TIMEOUT_S = 30.0
"""Default limit on one backend call (``lmspec run --timeout``)."""

MAX_REPLY_BYTES = wire.MAX_BODY_BYTES
"""Largest reply body the judge accepts (a larger one is an error of the backend)."""

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


class HostSignalled(BackendFatal):
    """The host was killed by a signal the judge did not send."""


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
        self.sock: socket.socket | None = None
        self.capture = tempfile.TemporaryFile(prefix="lmspec-host-")
        self.descriptors: list[dict[str, Any]] = []
        self.starts = 0
        self.sandbox = sandbox.current()
        self._pending: deque[str] = deque()
        self._ids = itertools.count()
        self._nonce = ""
        self._killed = False
        self._dismissed = False
        self._timed_out: float | None = None
        self._stray = False

    # -- life cycle ----------------------------------------------------------------
    def start(self) -> list[dict[str, Any]]:
        """Start a child and load the plugins; their backend descriptors."""
        self.spawn()
        return self.collect()

    def spawn(self) -> None:
        """Start the child and ask it to load the plugins (:meth:`collect` gets the
        answers), so that several hosts start in parallel."""
        parent, child = socket.socketpair()
        argv, env = self.sandbox.command(
            [sys.executable, "-I", "-u", "-m", "lmspec.backends.host", str(child.fileno())],
            ",".join(t for _, t in self.plugins))
        try:
            self.proc = subprocess.Popen(argv, pass_fds=(child.fileno(),),
                                         stdin=subprocess.DEVNULL, stdout=self.capture,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env=env)
        finally:
            child.close()
        guard.adopt(self.proc.pid)
        parent.setblocking(False)
        self.sock = parent
        self.starts += 1
        self._dismissed = self._killed = False
        self._pending.clear()
        self._nonce = secrets.token_hex(8)
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
                value = self.receive(max(0.01, self.load_timeout - (time.monotonic() - t0)))
            except (BackendRaised, BackendFatal, NotImplementedError) as exc:
                value = [{"name": target, "status": f"failed to load: {exc}",
                          "plugin": target}]
            if not isinstance(value, list):
                value = [{"name": target, "status": "failed to load: the plugin's host sent "
                          "a malformed list of backends", "plugin": target}]
            out += value
        self.descriptors = out
        return out

    def kill(self) -> None:
        if self.proc is not None:
            self._killed = True
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
        self._forget()

    def _forget(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.proc = None, None
        self._pending.clear()

    def dismiss(self) -> None:
        """Ask the child to leave without waiting for it (:meth:`close` reaps it): a
        controller whose checks run in other processes lets it exit meanwhile."""
        if self.proc is not None and self.sock is not None and not self._dismissed:
            try:
                wire.send(self.sock, wire.frame({"verb": "exit"}), time.monotonic() + 1.0)
                self._dismissed = True
            except (OSError, wire.Deadline):
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
        NotImplementedError or BackendFatal). A host killed by a signal the judge did not
        send is started again and asked once more; while the judge is being stopped,
        :class:`~lmspec.backends.guard.Interrupted` instead."""
        for attempt in (0, 1):
            self.send(message, timeout)
            try:
                return self.receive(timeout)
            except HostSignalled:
                _interrupted_now()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def send(self, message: tuple, timeout: float | None = None) -> None:
        if self.proc is None and message[0] != "load":
            self.start()
        if self.sock is None:
            return
        if not self._pending and self._stray_bytes():
            self.kill()  # receive() says why
            self._stray = True
            return
        rid = f"{self._nonce}:{next(self._ids)}"
        self._pending.append(rid)
        limit = self.timeout if timeout is None else timeout
        try:
            wire.send(self.sock, wire.frame({"id": rid, "verb": message[0]}, pickle.dumps(
                message, protocol=pickle.HIGHEST_PROTOCOL)), time.monotonic() + limit)
        except wire.Deadline:
            self.kill()  # a host that does not read: receive() says so
            self._timed_out = limit
        except OSError:
            pass  # a dead child: receive() says how it ended

    def _stray_bytes(self) -> bool:
        """Whether the host sent something while no request was pending."""
        assert self.sock is not None
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK))
        except (BlockingIOError, OSError):
            return False

    def receive(self, timeout: float | None = None) -> Any:
        limit = self.timeout if timeout is None else timeout
        if self.sock is None:
            if self._stray:
                self._stray = False
                raise BackendFatal("the backend sent a reply to another request (one that "
                                   "nobody asked for); the backend process was restarted")
            if self._timed_out is not None:
                self._timed_out = None
                raise BackendFatal(f"timed out after {limit:g} s (the backend process was "
                                   "killed)")
            raise BackendFatal("the backend process is gone")
        expected = self._pending.popleft() if self._pending else None
        try:
            header, value = wire.read_reply(self.sock, time.monotonic() + limit)
        except wire.Deadline:
            self.kill()
            raise BackendFatal(f"timed out after {limit:g} s (the backend process was "
                               "killed)") from None
        except wire.ProtocolError as exc:
            self.kill()
            raise BackendFatal(f"{exc} (the backend process was restarted)") from None
        except (EOFError, OSError):
            raise self._died() from None
        if header.get("id") != expected:
            self.kill()
            raise BackendFatal(f"the backend sent a reply to another request (id "
                               f"{str(header.get('id'))[:40]!r}); the backend process was "
                               "restarted")
        if header.get("status") == "ok":
            return value
        err = header.get("error")
        if header.get("status") != "raise" or not isinstance(err, dict):
            self.kill()
            raise BackendFatal("the backend sent a malformed reply (the backend process was "
                               "restarted)")
        kind, text = str(err.get("type", "Exception"))[:200], str(err.get("message", ""))
        text = text if len(text) <= 2 * 2000 else text[:2000] + " …[cut]"
        if err.get("not_implemented") is True:
            raise NotImplementedError(text)
        raise BackendRaised(f"{kind}: {text}" if text else kind)

    def _died(self) -> BackendFatal:
        """How the child ended, as the exception of the call that noticed."""
        code = None
        if self.proc is not None:
            try:
                code = self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                pass
        killed_by_us = self._killed
        self.kill()
        if code is not None and self.sandbox.level == "bwrap" and 128 < code < 128 + 65:
            code = 128 - code  # bwrap exits 128+n when its child was killed by signal n
        exc_type = HostSignalled if code is not None and code < 0 and not killed_by_us \
            else BackendFatal
        return exc_type(f"the backend process {_exit_text(code)}")


def _interrupted_now(wait: float = 0.5) -> None:
    """Raise :class:`guard.Interrupted` if the judge is being stopped (a signal sent to
    the judge and its hosts together may kill the host first: wait a moment for it)."""
    deadline = time.monotonic() + wait
    while True:
        signum = guard.stopping()
        if signum is not None:
            raise guard.Interrupted(signum)
        if time.monotonic() >= deadline:
            return
        time.sleep(0.02)


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
        self.deviations = {key: _remote_deviation(self, key, d)
                           for key, d in descriptor.get("deviations", {}).items()}
        if descriptor.get("vjp"):
            self.vjp = self._method("vjp")

    def __getattr__(self, op: str) -> Callable[..., Any]:
        if op.startswith("_") or op not in self.__dict__.get("implements", ()):
            raise AttributeError(op)
        return self._method(op)

    def _method(self, method: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            reply = self.host.request(("call", self.name, method, args, kwargs))
            if not (isinstance(reply, tuple) and len(reply) == 2 and isinstance(
                    reply[1], (tuple, list)) and all(
                    isinstance(p, tuple) and len(p) >= 2 and p[0] in ("args", "kwargs")
                    and all(isinstance(i, (int, str)) for i in p) for p in reply[1])):
                self.host.kill()
                raise BackendFatal("the backend's host sent a malformed reply to a call (the "
                                   "backend process was restarted)")
            out, changed = reply
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


def _remote_deviation(backend: RemoteBackend, key: str, d: dict[str, Any]) -> Any:
    """The judge's stand-in for a declared deviation (or a tuple of them, ``parts``)."""
    if "parts" in d:
        return tuple(_RemoteDeviation(backend, key, p["reason"], p["predicate"],
                                      p.get("bound"), i) for i, p in enumerate(d["parts"]))
    return _RemoteDeviation(backend, key, d["reason"], d["predicate"], d.get("bound"))


class _RemoteDeviation:
    def __init__(self, backend: RemoteBackend, key: str, reason: str, predicate: bool,
                 bound: float | str | None = None, part: int | None = None):
        self.reason = reason
        self.bound = bound
        request = ("applies", backend.name, key) if part is None else None

        def applies(args: Any, kwargs: Any) -> bool:
            message = ((*request, tuple(args), dict(kwargs)) if request else
                       ("applies", backend.name, key, tuple(args), dict(kwargs), part))
            return _strict_bool(backend.host.request(message))

        self.applies = applies if predicate else None


def _strict_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise BackendFatal("a deviation's predicate answered something other than a bool")
    return value


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
