"""The guarded call: a backend's op or vjp called on copies of its inputs.

:func:`call_backend` is the one door through which the judge reaches code under test. The
backend receives copies (or, in a host process, its own unpickled arrays); the originals
are what the reference, the baseline and the tolerance use. A backend that raises, hangs,
dies or modifies an input is classified here (:class:`BackendError`, :class:`Fatal`,
:class:`Unsupported`); :func:`output` turns its answer into float64/int64 NumPy or
refuses it. What the answer is worth is :mod:`lmspec.conformance.judge`'s business.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

import lmspec
from lmspec._precision import DTYPES
from lmspec.backends.host import cut
from lmspec.backends.remote import BackendFatal, BackendRaised, InputModified

from .declare import Call

# -- how a call can go wrong (raised inside the Hypothesis test, so that it shrinks) ----

class Mismatch(AssertionError):
    """The backend disagrees with the spec (status ``fail``)."""


class BackendError(Exception):
    """The backend raised, hung, or returned the wrong structure (status ``error``)."""


class Unsupported(Exception):
    pass


class CallTimeout(Exception):
    pass


class Fatal(BaseException):
    """The backend's process died or overstayed: the check ends at once as ``error``
    (a ``BaseException``, so Hypothesis neither retries nor shrinks it)."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Interrupt an *in-process* backend call that runs past ``seconds`` (main thread,
    POSIX only; backends in a host process are killed by the host's timeout instead)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread() or not hasattr(
            signal, "setitimer"):
        yield
        return

    def _raise(signum, frame):
        raise CallTimeout(f"timed out after {seconds:g} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def copy_tree(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.copy()
    if isinstance(x, (tuple, list)):
        return type(x)(copy_tree(a) for a in x)
    if isinstance(x, dict):
        return {k: copy_tree(v) for k, v in x.items()}
    return x


def modified(before: Any, after: Any, name: str) -> str | None:
    """The name of the first array in ``after`` that differs from ``before`` bit for bit."""
    if isinstance(before, np.ndarray):
        same = (isinstance(after, np.ndarray) and after.dtype == before.dtype
                and after.shape == before.shape and after.tobytes() == before.tobytes())
        return None if same else name
    if isinstance(before, (tuple, list)):
        for i, b in enumerate(before):
            hit = modified(b, after[i] if len(after) > i else None, f"{name}[{i}]")
            if hit:
                return hit
    return None


def path_name(path: Sequence[Any], names: Sequence[str]) -> str:
    """``("args", 3, 1)`` → ``weights[1]`` (with ``names`` the positional names)."""
    head, *rest = path[1:] if path and path[0] in ("args", "kwargs") else path
    base = names[head] if path[0] == "args" and isinstance(head, int) and head < len(
        names) else str(head)
    return base + "".join(f"[{i}]" for i in rest)


def call_backend(fn: Callable[..., Any], what: str, timeout: float, names: Sequence[str],
                 args: Sequence[Any], kwargs: dict[str, Any], owner: str = "the backend") -> Any:
    """``fn(*args, **kwargs)`` on copies of the arguments; the originals are what the
    reference, the baseline and the tolerance use. A backend that changes a buffer it
    was given is an ``error`` (CONTRACT §3), whatever its output. A backend in a host
    process gets copies by pickling, and its host names any array the backend changed;
    an in-process one gets copies here, compared with the originals after the call."""
    remote = getattr(fn, "remote", False)
    a, kw = (tuple(args), dict(kwargs)) if remote else (copy_tree(tuple(args)),
                                                        copy_tree(dict(kwargs)))
    try:
        if remote:  # the host enforces the timeout by killing
            out = fn(*a, **kw)
        else:
            with time_limit(timeout):
                out = fn(*a, **kw)
    except NotImplementedError as exc:
        raise Unsupported(str(exc) or "NotImplementedError") from exc
    except InputModified as exc:
        raise BackendError(f"{owner} modified its input {path_name(exc.path, names)} "
                            "(backends must not modify their inputs, CONTRACT §3)") from None
    except BackendFatal as exc:
        raise Fatal(f"{what}: {exc}") from None
    except CallTimeout as exc:
        raise BackendError(f"{what} {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any backend failure is an "error" result
        text = str(exc) if isinstance(exc, BackendRaised) else f"{type(exc).__name__}: {exc}"
        raise BackendError(f"{what} raised {cut(text)}") from exc
    if not remote:
        for i, (orig, mine) in enumerate(zip(args, a)):
            hit = modified(orig, mine, names[i] if i < len(names) else f"args[{i}]")
            if hit:
                raise BackendError(f"{owner} modified its input {hit} (backends must not "
                                    "modify their inputs, CONTRACT §3)")
        for key, orig in kwargs.items():
            hit = modified(orig, kw.get(key), key)
            if hit:
                raise BackendError(f"{owner} modified its input {hit} (backends must not "
                                    "modify their inputs, CONTRACT §3)")
    return out


class Vjp:
    """A backend's ``vjp(op, args, kwargs, cotangent)`` in the positional form that
    :func:`call_backend` copies and checks (the cotangent is the last argument)."""

    def __init__(self, vjp: Callable[..., Any], op: str):
        self.vjp, self.op = vjp, op
        self.remote = getattr(vjp, "remote", False)

    def __call__(self, *a: Any, **k: Any) -> Any:
        try:
            return self.vjp(self.op, a[:-1], k, a[-1])
        except InputModified as exc:  # the host's path is within vjp(op, args, kwargs, cot)
            where, *rest = exc.path[1:]
            path = {1: ("args", *rest), 2: ("kwargs", *rest), 3: ("args", len(a) - 1, *rest)}
            raise InputModified(path.get(where, exc.path)) from None


def map_arrays(x: Any, fn: Callable[[np.ndarray], Any]) -> Any:
    if isinstance(x, (tuple, list)):
        return tuple(map_arrays(a, fn) for a in x)
    return fn(x) if isinstance(x, np.ndarray) else x


def widen(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64) if a.dtype.kind == "f" or a.dtype in DTYPES.values() else a


def as_result(x: Any) -> Any:
    """A backend's output as NumPy (float outputs as float64), tuples kept."""
    if isinstance(x, (tuple, list)):
        return tuple(as_result(a) for a in x)
    if x is None:
        return None
    a = np.asarray(x)
    if a.dtype == DTYPES["bfloat16"] or a.dtype.kind == "f":
        return a.astype(np.float64)
    return a


def output(x: Any, what: str) -> Any:
    """A backend's output as NumPy (:func:`as_result`); one that is not made of arrays
    (ragged lists, strings, objects) is the backend's error."""
    try:
        out = as_result(x)
    except Exception as exc:  # noqa: BLE001
        raise BackendError(f"{what} returned {type(x).__name__}, which is not an array "
                            f"({type(exc).__name__}: {cut(str(exc), 200)})") from None
    for name, a in named(out, "out"):
        if a is not None and a.dtype.kind not in "fiub":
            raise BackendError(f"{what} returned {name} of dtype {a.dtype}, which is not a "
                                "numeric array")
    return out


def named(x: Any, name: str) -> list[tuple[str, Any]]:
    if isinstance(x, (tuple, list)):
        return [p for i, a in enumerate(x) for p in named(a, f"{name}[{i}]")]
    return [(name, x)]


def op_kwargs(op: str, call: Call, dtype: str) -> dict[str, Any]:
    kw = dict(call.kwargs)
    if "dtype" in lmspec.OPS[op].params:
        kw["dtype"] = dtype
    return kw
