"""Attacks on the reply channel: each backend writes to the host's socket itself (its fd
is the host's ``sys.argv[1]``) before or instead of the host's own reply."""

from __future__ import annotations

import json
import os
import struct
import sys
import threading
import time

import numpy as np

import lmspec

from . import Base, uniform

PREFIX = struct.Struct("!4sIQ")


def _fd() -> int:
    return int(sys.argv[1])


def _frame(header: dict, body: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return PREFIX.pack(b"LMW1", len(head), len(body)) + head + body


# A pickle that, unpickled by an allow-list of numpy names, rebuilds an np.dtype with a
# forged __setstate__ (what crashed the judge before replies stopped being pickles).
PICKLE = (b"\x80\x04\x95\x30\x00\x00\x00\x00\x00\x00\x00\x8c\x05numpy\x94\x8c\x05dtype\x94"
          b"\x93\x94\x8c\x02f8\x94\x89\x88\x87\x94R\x94(K\x03\x8c\x01<\x94NNNJ\xff\xff\xff\x7f"
          b"J\xff\xff\xff\x7fK\x00t\x94b.")


def raw_pickle(x, axis):
    os.write(_fd(), PICKLE)
    return uniform(x, axis)


def slow_header(x, axis):
    os.write(_fd(), PREFIX.pack(b"LMW1", 1000, 0) + b"{}")  # 2 of 1000 bytes, then nothing
    time.sleep(3600)


def stray_reply(x, axis):
    os.write(_fd(), _frame({"id": "forged:0", "status": "ok", "value": None, "arrays": []}))
    return lmspec.softmax(x, axis)


def stray_after(x, axis):
    def later() -> None:  # just after the host's own reply, before the next request
        time.sleep(0.001)
        os.write(_fd(), _frame({"id": "forged:1", "status": "ok", "value": None, "arrays": []}))

    threading.Thread(target=later).start()
    return lmspec.softmax(x, axis)


def huge_announce(x, axis):
    os.write(_fd(), PREFIX.pack(b"LMW1", 10, 10 ** 12))
    time.sleep(3600)


def many_refs(x, axis):
    value = {"t": [{"a": 0}] * 400}
    header = {"id": "x", "status": "ok", "value": value, "arrays": [["float64", [1000], 8000]]}
    os.write(_fd(), _frame(header, b"\0" * 8000))
    time.sleep(3600)


def lying_shape(x, axis):
    header = {"id": "x", "status": "ok", "value": {"a": 0},
              "arrays": [["float64", [10 ** 9, 10 ** 9], 8]]}
    os.write(_fd(), _frame(header, b"\0" * 64))
    time.sleep(3600)


def object_dtype(x, axis):
    return np.array([object()], dtype=object)


def deep_json(x, axis):
    head = b"[" * 200_000 + b"]" * 200_000
    os.write(_fd(), PREFIX.pack(b"LMW1", len(head), 0) + head)
    time.sleep(3600)


ATTACKS = {  # name -> (attack, what the judge's message must say)
    "raw-pickle": (raw_pickle, "does not start with a frame header"),
    "slow-header": (slow_header, "timed out after 3 s"),
    "stray-reply": (stray_reply, "reply to another request"),
    "stray-after": (stray_after, "reply to another request"),
    "huge-announce": (huge_announce, "exceeds"),
    "many-refs": (many_refs, "repeated array reference"),
    "lying-shape": (lying_shape, "cannot hold"),
    "object-dtype": (object_dtype, "cannot be sent to the judge"),
    "deep-json": (deep_json, "not JSON"),
}


class Wire(Base):
    def __init__(self, attack: str):
        super().__init__(f"hostile-wire-{attack}")
        self.attack = ATTACKS[attack][0]  # type: ignore[method-assign]


@lmspec.hookimpl
def register_backends(register):
    for a in ATTACKS:
        register(Wire(a))
