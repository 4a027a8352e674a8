"""The flat wire format (issue 24): what a host can send the judge, and what the judge
does with it before it allocates anything or waits past a deadline."""

from __future__ import annotations

import json
import socket
import time

import ml_dtypes
import numpy as np
import pytest

from lmspec.backends import validate, wire


def _pair() -> tuple[socket.socket, socket.socket]:
    judge, host = socket.socketpair()
    judge.setblocking(False)
    return judge, host


def _roundtrip(value):
    judge, host = _pair()
    tree, arrays = wire.encode(value)
    wire.send_blocking(host, wire.reply_frame({"id": "1", "status": "ok", "value": tree}, arrays))
    return wire.read_reply(judge, time.monotonic() + 5)[1]


def test_nested_outputs_travel_as_json_and_raw_buffers():
    bf = np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16)
    value = ((np.arange(6.0).reshape(2, 3).T, None, 2.5, np.float32(3.0)), [bf],
             {"bound": "tf32", "n": 3}, 1 + 2j, True, np.zeros((0, 4)))
    got = _roundtrip(value)
    np.testing.assert_array_equal(got[0][0], value[0][0])
    assert got[0][1:3] == (None, 2.5) and got[0][3] == np.float32(3.0)
    assert got[1][0].dtype == bf.dtype and got[1][0].tobytes() == bf.tobytes()
    assert got[2] == {"bound": "tf32", "n": 3} and got[3] == 1 + 2j and got[4] is True
    assert got[5].shape == (0, 4)


@pytest.mark.parametrize("prefix, head, says", [
    (wire.PREFIX.pack(b"LMW1", 1 << 30, 0), b"", "header announces"),
    (wire.PREFIX.pack(b"LMW1", 2, 1 << 40), b"{}", "exceeds"),
    (b"\x80\x04\x95" + b"\0" * 13, b"", "frame header"),
])
def test_limits_are_checked_before_anything_is_allocated(prefix, head, says):
    judge, host = _pair()
    host.sendall(prefix + head)
    with pytest.raises(wire.ProtocolError, match=says):
        wire.read_reply(judge, time.monotonic() + 5)


@pytest.mark.parametrize("arrays, value, says", [
    ([["object", [1], 8]], {"a": 0}, "malformed array"),
    ([["float64", [10 ** 9, 10 ** 9], 8]], {"a": 0}, "cannot hold"),
    ([["float64", [1], 8]], {"t": [{"a": 0}, {"a": 0}]}, "repeated array reference"),
    ([["float64", [1], 8]] * 2000, None, "at most"),
    ([], {"x": 1}, "malformed value"),
])
def test_malformed_array_descriptions_are_refused(arrays, value, says):
    judge, host = _pair()
    body = b"\0" * 64 * len(arrays)
    head = json.dumps({"id": "1", "status": "ok", "value": value, "arrays": arrays}).encode()
    host.sendall(wire.PREFIX.pack(b"LMW1", len(head), len(body)) + head)
    host.setblocking(False)
    try:
        host.sendall(body)
    except BlockingIOError:
        pass
    with pytest.raises(wire.ProtocolError, match=says):
        wire.read_reply(judge, time.monotonic() + 5)


def test_every_read_runs_against_the_deadline():
    judge, host = _pair()
    host.sendall(wire.PREFIX.pack(b"LMW1", 1000, 0) + b"{}")  # 2 of 1000 bytes, then silence
    t0 = time.monotonic()
    with pytest.raises(wire.Deadline):
        wire.read_reply(judge, time.monotonic() + 0.5)
    assert time.monotonic() - t0 < 2


def test_unsendable_outputs_raise_in_the_host():
    with pytest.raises(TypeError, match="cannot be sent"):
        wire.encode(np.array([object()], dtype=object))


@pytest.mark.parametrize("name", ["t\u03bfrch-cpu", "Torch-CPU", "torch\u200b-cpu", "torch-cpu ",
                                  "", 7, "a" * 65])
def test_the_judge_checks_names_itself(name):
    d, status = validate.descriptor({"name": name, "status": "ok", "device": "cpu",
                                     "dtypes": ["float64"], "implements": ["softmax"]}, "x")
    assert status.startswith("failed to load") and "must match" in status


@pytest.mark.parametrize("precision, ok", [({"float32": "tf32"}, True),
                                           ({"float64": "bfloat16"}, False),
                                           ({"float32": "float16"}, False)])
def test_declared_precision_is_an_engine_mode_or_refused(precision, ok):
    d, status = validate.descriptor({"name": "b", "status": "ok", "device": "cpu",
                                     "dtypes": ["float32", "float64"], "implements": [],
                                     "precision": precision}, "x")
    assert (status == "ok") is ok
    if not ok:
        assert "is refused" in status and "deviation with a bound" in status


@pytest.mark.parametrize("raw", [(1, 2, 3), "yes", None, (True,), ("no", 5), [1, ""]])
def test_malformed_availability_answers_are_refused(raw):
    assert validate.availability(raw) is None
