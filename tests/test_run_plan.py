"""The run plan and the way results come back from pytest workers."""

from __future__ import annotations

import json

import execnet.gateway_base as wire
import pytest

from lmspec.conformance import pytest_plugin
from lmspec.conformance.plan import PlannedBackend, RunPlan, Settings, Target
from lmspec.conformance.record import CheckResult
from lmspec.conformance.runner import Collector

T = Target("b", "softmax", "float64", "forward")


def _plan(**kw) -> RunPlan:
    return RunPlan(backends=(PlannedBackend({"name": "b"}, ("--plugin", "mod")),),
                   targets=(T, Target("b", "softmax", "float64", "vjp")),
                   settings=Settings("quick", 7, 3, 12.0, ("--plugin", "mod"), "large"),
                   ops=("softmax",), dtypes=("float64",), **kw)


@pytest.mark.parametrize("kw", [{}, {"checks": ("forward",), "plugins": ("mod",),
                                     "sandbox": "bwrap", "allow_network": True,
                                     "shard": "1/2"}])
def test_a_plan_is_written_once_and_read_back_whole(tmp_path, kw):
    plan = _plan(**kw)
    plan.write(tmp_path / "plan.json")
    assert RunPlan.read(tmp_path / "plan.json") == plan
    rec = plan.recorded()
    assert rec["max_examples"] == 7 and rec["shapes"] == "large"
    assert rec["checks"] == (list(kw["checks"]) if kw else "all")
    assert ("shard" in rec) == bool(kw)


class _Report:
    def __init__(self, nodeid: str, props: list, failed: bool = False):
        self.nodeid, self.user_properties, self.failed = nodeid, props, failed
        self.longreprtext = "worker crashed"


def test_a_record_crosses_the_worker_wire_whatever_ints_it_holds():
    """xdist's wire format refuses ints past 32 bits; a counterexample may hold one (the
    default torch-cpu run at --jobs 2 lost 70 checks to it)."""
    big = CheckResult("b", "softmax", "float64", "forward", status="fail",
                      counterexample={"seed": 2**40, "xs": [2**63 - 1]})

    class J:
        def run(self, target):
            return big

    props: list = []
    with pytest.raises(pytest.fail.Exception):
        pytest_plugin.check(J(), T, lambda k, v: props.append((k, v)))
    wire.loads_internal(wire.dumps_internal(props))  # what xdist sends
    got: list[CheckResult] = []
    c = Collector(_plan(), got.append)
    c.pytest_runtest_logreport(_Report(f"suite.py::test_conformance[{T.id}]", props))
    assert got == [CheckResult.from_json(json.loads(json.dumps(big.to_json())))]
    assert got[0].counterexample["seed"] == 2**40


def test_the_collector_keys_results_by_planned_target():
    got: list[CheckResult] = []
    c = Collector(_plan(), got.append)
    other = Target("b", "softmax", "float64", "vjp")
    wrong = json.dumps(CheckResult("b", "softmax", "float64", "forward").to_json())
    c.pytest_runtest_logreport(_Report(f"x::t[{other.id}]", [("lmspec_result", wrong)]))
    c.pytest_runtest_logreport(_Report(f"x::t[{T.id}]", [], failed=True))
    c.pytest_runtest_logreport(_Report("x::t[not::a::planned::id]", [], failed=True))
    assert [(r.check, r.status) for r in got] == [("vjp", "error"), ("forward", "error")]
    assert "returned the result of b::softmax::float64::forward" in got[0].message
    assert got[1].message == "worker crashed"


def test_an_internal_error_is_said_in_one_line():
    c = Collector(_plan(), [].append)
    text = ("Traceback (most recent call last):\n  File \"x.py\", line 3, in f\n"
            "    g()\nE   struct.error: 'i' format requires -2147483648 <= number\n")

    class Info:
        value = AssertionError("crash item")

    c.pytest_internalerror(text, Info())
    c.pytest_internalerror("AssertionError: later", Info())
    assert c.internal_error == "struct.error: 'i' format requires -2147483648 <= number"
