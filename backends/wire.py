"""The wire between the judge and a backend host: flat frames, never a pickle from a host.

A frame is a fixed prefix (:data:`PREFIX`: magic, header length, body length), a JSON
header and a body of raw bytes. The judge sends requests as frames whose header names the
request (``{"id": ..., "verb": ...}``) and whose body is the pickled request (the host
trusts the judge; the judge never unpickles anything). A host replies with a header

``{"id": <the request's id>, "status": "ok" | "raise", "value": TREE,
  "arrays": [[dtype, shape, nbytes], ...], "error": {...}}``

and a body that holds the arrays' bytes, each padded to :data:`ALIGN` bytes. ``TREE`` is
JSON in which ``{"a": i}`` is array ``i``, ``{"s": i}`` the scalar held by the 0-d array
``i``, ``{"t": [...]}`` a tuple, ``{"d": {...}}`` a dict, ``{"c": [re, im]}`` a complex
number; lists, strings, numbers (NaN and infinities included), booleans and null are
themselves. Dtypes come from the closed set :data:`DTYPES`; the judge checks the number of
arrays, every shape against its byte length and the total against :data:`MAX_BODY_BYTES`
before it allocates anything, and reads every byte against the call's deadline.
"""

from __future__ import annotations

import json
import math
import select
import socket
import struct
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

MAGIC = b"LMW1"
PREFIX = struct.Struct("!4sIQ")
"""Magic, header length, body length."""
ALIGN = 64
MAX_HEADER_BYTES = 8 << 20
"""Largest JSON header either side accepts (descriptors, info dicts, messages)."""
MAX_BODY_BYTES = 256 << 20
"""Largest body of a reply (the arrays' bytes, padding included)."""
MAX_ARRAYS = 1024
"""Most arrays one reply may carry."""
MAX_NDIM = 32
MAX_DEPTH = 20
"""Deepest nesting of a reply's value."""


def _dtypes() -> dict[str, np.dtype]:
    names = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
             "float16", "float32", "float64", "complex64", "complex128"]
    out = {n: np.dtype(n).newbyteorder("<") for n in names}
    try:
        import ml_dtypes

        out["bfloat16"] = np.dtype(ml_dtypes.bfloat16)
    except ImportError:  # pragma: no cover - ml_dtypes is a dependency of lmspec
        pass
    return out


DTYPES = _dtypes()
"""The only dtypes a reply's arrays may have (little-endian numeric types, bfloat16)."""


class ProtocolError(Exception):
    """A frame that breaks the protocol or its limits (the host's fault)."""


class Deadline(Exception):
    """A read or write did not finish before the call's deadline."""


def _pad(n: int) -> int:
    return -n % ALIGN


# -- the host's side: a value as a tree and buffers --------------------------------------

def encode(value: Any) -> tuple[Any, list[np.ndarray]]:
    """``value`` (nested tuples/lists/dicts of arrays, scalars, strings, None) as a JSON
    tree and the arrays it refers to. Array-likes (tensors) go through ``numpy.asarray``;
    what cannot be sent raises ``TypeError``."""
    arrays: list[np.ndarray] = []

    def array(x: np.ndarray) -> int:
        dt = np.dtype(x.dtype)
        name = next((n for n, d in DTYPES.items() if d == dt.newbyteorder("<") or d == dt),
                    None)
        if name is None:
            raise TypeError(f"an output of dtype {dt} cannot be sent to the judge (numeric "
                            f"dtypes only: {', '.join(DTYPES)})")
        arrays.append(np.asarray(x, dtype=DTYPES[name], order="C"))
        return len(arrays) - 1

    def walk(x: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise TypeError(f"output nested more than {MAX_DEPTH} levels deep")
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, int) and not isinstance(x, np.generic):
            return int(x)
        if isinstance(x, float):
            return float(x)
        if isinstance(x, complex):
            return {"c": [x.real, x.imag]}
        if isinstance(x, np.ndarray):
            return {"a": array(x)}
        if isinstance(x, np.generic):
            return {"s": array(np.asarray(x))}
        if isinstance(x, tuple):
            return {"t": [walk(a, depth + 1) for a in x]}
        if isinstance(x, list):
            return [walk(a, depth + 1) for a in x]
        if isinstance(x, dict):
            return {"d": {str(k): walk(v, depth + 1) for k, v in x.items()}}
        return {"a": array(np.asarray(x))}  # tensors and other array-likes

    return walk(value, 0), arrays


def reply_frame(header: dict[str, Any], arrays: Iterable[np.ndarray] = ()) -> list[bytes]:
    """The chunks of one reply frame (``header`` gains the arrays' descriptions)."""
    arrays = list(arrays)
    header = dict(header, arrays=[[_name(a.dtype), list(a.shape), a.nbytes] for a in arrays])
    head = json.dumps(header, allow_nan=True, separators=(",", ":")).encode()
    chunks: list[bytes] = []
    for a in arrays:
        chunks += [memoryview(a.reshape(-1).view(np.uint8)) if a.nbytes else b"",
                   b"\0" * _pad(a.nbytes)]
    body = sum(len(c) for c in chunks)
    return [PREFIX.pack(MAGIC, len(head), body), head, *chunks]


def _name(dt: np.dtype) -> str:
    return next(n for n, d in DTYPES.items() if d == dt)


def frame(header: dict[str, Any], body: bytes = b"") -> list[bytes]:
    """The chunks of a frame with a JSON header and an opaque body."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return [PREFIX.pack(MAGIC, len(head), len(body)), head, body]


# -- blocking I/O (the host's side) --------------------------------------------------------

def read_frame_blocking(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    """One frame from the judge (the host trusts it): header and body."""
    magic, hlen, blen = PREFIX.unpack(_recv_blocking(sock, PREFIX.size))
    if magic != MAGIC:
        raise ProtocolError("bad magic")
    return json.loads(_recv_blocking(sock, hlen)), _recv_blocking(sock, blen)


def _recv_blocking(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise EOFError
        got += k
    return bytes(buf)


def send_blocking(sock: socket.socket, chunks: Iterable[bytes]) -> None:
    for c in chunks:
        if len(c):
            sock.sendall(c)


# -- I/O against a deadline (the judge's side) -----------------------------------------------

def _wait(sock: socket.socket, events: int, deadline: float) -> None:
    poller = select.poll()
    poller.register(sock, events)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Deadline
        if poller.poll(max(1, math.ceil(left * 1000))):
            return


def send(sock: socket.socket, chunks: Iterable[bytes], deadline: float) -> None:
    """Write ``chunks`` to the non-blocking ``sock`` before ``deadline`` (monotonic)."""
    for c in chunks:
        view = memoryview(c).cast("B") if len(c) else memoryview(b"")
        while len(view):
            _wait(sock, select.POLLOUT, deadline)
            try:
                view = view[sock.send(view):]
            except BlockingIOError:
                continue


def _recv_into(sock: socket.socket, view: memoryview, deadline: float) -> None:
    got = 0
    while got < len(view):
        _wait(sock, select.POLLIN, deadline)
        try:
            k = sock.recv_into(view[got:])
        except BlockingIOError:
            continue
        if not k:
            raise EOFError
        got += k


def read_reply(sock: socket.socket, deadline: float,
               max_body: int = MAX_BODY_BYTES) -> tuple[dict[str, Any], Any]:
    """One reply from a host before ``deadline``: its header and its value, with every
    array rebuilt over the received bytes. ``ProtocolError`` for anything malformed,
    ``Deadline``, ``EOFError``/``OSError`` for a host that went away."""
    prefix = bytearray(PREFIX.size)
    _recv_into(sock, memoryview(prefix), deadline)
    magic, hlen, blen = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ProtocolError("the backend's reply does not start with a frame header")
    if hlen > MAX_HEADER_BYTES:
        raise ProtocolError(f"the backend's reply header announces {hlen} bytes (at most "
                            f"{MAX_HEADER_BYTES})")
    if blen > max_body:
        raise ProtocolError(f"the backend's reply exceeds {max_body} bytes ({blen} announced)")
    head = bytearray(hlen)
    _recv_into(sock, memoryview(head), deadline)
    try:
        header = json.loads(head)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"the backend's reply header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("the backend's reply header is not a JSON object")
    specs = _array_specs(header.get("arrays", []), blen)
    body = np.empty(blen, np.uint8)
    _recv_into(sock, memoryview(body), deadline)
    arrays, off = [], 0
    for dt, shape, nbytes in specs:
        arrays.append(np.frombuffer(body, dt, nbytes // dt.itemsize, off).reshape(shape))
        off += nbytes + _pad(nbytes)
    return header, decode(header.get("value"), arrays)


def _array_specs(raw: Any, body_len: int) -> list[tuple[np.dtype, tuple[int, ...], int]]:
    if not isinstance(raw, list) or len(raw) > MAX_ARRAYS:
        raise ProtocolError(f"a reply carries a list of at most {MAX_ARRAYS} arrays")
    out, total = [], 0
    for spec in raw:
        if not (isinstance(spec, list) and len(spec) == 3 and spec[0] in DTYPES
                and isinstance(spec[1], list) and len(spec[1]) <= MAX_NDIM
                and all(type(n) is int and n >= 0 for n in spec[1])
                and type(spec[2]) is int and spec[2] >= 0):
            raise ProtocolError(f"malformed array description {str(spec)[:200]!r}")
        dt = DTYPES[spec[0]]
        if math.prod(spec[1]) * dt.itemsize != spec[2]:
            raise ProtocolError(f"array {spec[0]}{spec[1]} cannot hold {spec[2]} bytes")
        total += spec[2] + _pad(spec[2])
        out.append((dt, tuple(spec[1]), spec[2]))
    if total != body_len:
        raise ProtocolError(f"the arrays take {total} bytes, the body announced {body_len}")
    return out


def decode(tree: Any, arrays: list[np.ndarray]) -> Any:
    """The value a tree describes; each array may be referred to once."""
    used: set[int] = set()

    def walk(x: Any, depth: int) -> Any:
        if depth > MAX_DEPTH + 2:
            raise ProtocolError("reply nested too deeply")
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, list):
            return [walk(a, depth + 1) for a in x]
        if not isinstance(x, dict) or len(x) != 1:
            raise ProtocolError(f"malformed value {str(x)[:200]!r}")
        (tag, v), = x.items()
        if tag in ("a", "s"):
            if type(v) is not int or not 0 <= v < len(arrays) or v in used:
                raise ProtocolError(f"bad or repeated array reference {v!r}")
            used.add(v)
            a = arrays[v]
            if tag == "s":
                if a.ndim:
                    raise ProtocolError("a scalar reference to an array with dimensions")
                return a[()]
            return a
        if tag == "t" and isinstance(v, list):
            return tuple(walk(a, depth + 1) for a in v)
        if tag == "d" and isinstance(v, dict):
            return {str(k): walk(a, depth + 1) for k, a in v.items()}
        if tag == "c" and isinstance(v, list) and len(v) == 2 and all(
                isinstance(p, (int, float)) for p in v):
            return complex(v[0], v[1])
        raise ProtocolError(f"malformed value {str(x)[:200]!r}")

    return walk(tree, 0)
