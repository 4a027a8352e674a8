"""The search: one Hypothesis run per (backend, op, dtype, check).

A *check* is ``"forward"`` (values against the float64 reference), ``"vjp"``
(gradients against the reference vjp) or the name of a reference-free property.
:func:`run_target` draws examples from the op's declared strategy, calls the backend
through :mod:`lmspec.conformance.calls`, has :mod:`lmspec.conformance.judge` decide each
answer, lets Hypothesis shrink a failure, and returns the check's record
(:mod:`lmspec.conformance.record`). Everything here is generic: what varies per op lives
in the spec catalogue (``lmspec.OPS``) and the families' declarations (``cases_*``).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisException

import lmspec
from lmspec._precision import DTYPES
from lmspec._vjp import pullback
from lmspec.backends.host import MAX_MESSAGE, cut

from . import tolerance
from .calls import (
    BackendError,
    Fatal,
    Mismatch,
    Unsupported,
    Vjp,
    as_result,
    call_backend,
    map_arrays,
    op_kwargs,
    output,
    widen,
)
from .declare import CASES, PROPERTIES, Call
from .judge import (
    ENGINE_MODES,
    STRICT,
    Gate,
    baseline,
    check_claims,
    compare_outputs,
    describe_deviation,
    deviation_for,
    deviation_key,
    excused,
    once,
    perturbed_reference,
    reference,
)
from .plan import Settings, Target
from .record import (
    MIN_CHECKED_FRACTION,
    CheckResult,
    Stats,
    compact,
    jsonable,
    ratio_distribution,
)


def pin_hypothesis_constants() -> None:
    """Make generated examples depend only on the seed and the settings.

    Hypothesis mixes constants scraped from every *local* module imported so far into
    its draws, so the examples of a check would change with whatever else the process
    happened to import (the CLI, an xdist worker, a plugin). A report must be replayable
    from its seed, so the scraped pool is pinned to empty (Hypothesis' global pool of
    interesting values is kept). Private API: if it changes, nothing breaks but replay
    may differ between processes.
    """
    try:
        from hypothesis.internal.conjecture import providers

        empty = providers.Constants()
        providers._get_local_constants = lambda: empty
    except Exception:  # noqa: BLE001 - best effort
        pass


pin_hypothesis_constants()


@contextmanager
def fresh_examples() -> Iterator[None]:
    """Make every generated example a fresh draw, for the duration of one check.

    After each example it generates, Hypothesis' generation phase runs up to five
    "mutations" of it: copies of one part of the input over another part drawn by the
    same strategy (``ConjectureRunner.generate_mutations_from``), which finds bugs that
    need repeated structure in general-purpose tests. In lmspec's checks they took 62–75
    of every 100 examples (softmax, SDPA and LSTM forward, float64), leaving about 30
    fresh inputs per check. With them off, every example is a fresh draw, and the mutant
    suite run at a quarter of its examples on three seeds missed 8 mutants instead of 21
    (6 instead of 17 with the previous array draws). Ties, which the copies would
    produce, are drawn on purpose where they matter (the ``ties`` regime of logits).

    Private API, patched only while a check runs and restored afterwards (Hypothesis
    tests of the same process keep their mutator); if it changes, the mutator stays on
    and nothing else differs.
    """
    try:
        from hypothesis.internal.conjecture.engine import ConjectureRunner
    except Exception:  # noqa: BLE001 - best effort
        yield
        return
    saved = ConjectureRunner.__dict__.get("generate_mutations_from")
    if saved is None:
        yield
        return
    ConjectureRunner.generate_mutations_from = lambda self, data: None
    try:
        yield
    finally:
        ConjectureRunner.generate_mutations_from = saved


class StrategyError(Exception):
    """A conformance declaration produced an input that breaks the harness's rules."""


def check_drawn_dtypes(drawn: Any, dtype: str, where: str) -> None:
    """Every float array a strategy draws must already be in the dtype under test (NumPy
    quietly widens bfloat16 in e.g. ``np.clip``, which would show up as a baffling
    backend error instead)."""
    items = [drawn.args, dict(drawn.kwargs)] if isinstance(drawn, Call) else [drawn]
    stack = list(items)
    while stack:
        x = stack.pop()
        if isinstance(x, (tuple, list)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, Call):
            stack.extend([x.args, dict(x.kwargs)])
        elif isinstance(x, np.ndarray) and (x.dtype.kind == "f" or x.dtype in DTYPES.values()):
            if x.dtype != DTYPES[dtype]:
                raise StrategyError(f"the strategy of {where} drew a {x.dtype} array of shape "
                                    f"{x.shape} for dtype {dtype} (a bug in its conformance "
                                    "declaration)")


def seed_of(target: Target, base: int) -> int:
    """Examples depend on the seed, op, dtype and check — not on the backend — so that
    every backend is checked on the same inputs."""
    key = f"{target.op}|{target.dtype}|{target.check}".encode()
    return (base * 1_000_003 + zlib.crc32(key)) % 2**32


def cotangent(draw_data: Any, ref: Any, dtype: str) -> Any:
    if isinstance(ref, tuple):
        return tuple(cotangent(draw_data, r, dtype) for r in ref)
    from .draw import floats

    c = floats(draw_data.draw, dtype, np.shape(ref), -2.0, 2.0, label="cotangent")
    # no subnormal cotangents: scaling a gradient by 1e-40 tests flush-to-zero, not the op
    tiny = float(np.finfo(np.float16).tiny) if dtype == "float16" else float(
        np.finfo(np.float32).tiny) if dtype in ("float32", "bfloat16") else 0.0
    return np.where(np.abs(c.astype(np.float64)) < tiny, 0, c).astype(c.dtype)


class Drawer:
    """Adapts ``st.data()`` to the ``draw(strategy, label=)`` signature of draw.py helpers."""

    def __init__(self, data: Any):
        self._data = data

    def draw(self, strategy: st.SearchStrategy[Any], label: str | None = None) -> Any:
        return self._data.draw(strategy, label=label)


def run_target(backend: Any, target: Target, config: Settings,
               deviations: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run one check and return its result record (CONTRACT §5 ``results`` item).

    ``backend`` is an object with the backend interface: a plugin's backend served by a
    host process (:class:`lmspec.backends.remote.RemoteBackend`) or, in tests and
    :func:`lmspec.check`, an in-process object. It only ever receives copies of the
    inputs; the reference, the baseline and the tolerance are computed on the originals.
    ``deviations`` maps ``op``, ``op/check`` or ``op/check/dtype`` to a reason or to a
    :class:`lmspec.Deviation` (see :func:`deviation_for`).
    """
    t0 = time.perf_counter()
    op, dtype, check = target.op, target.dtype, target.check
    stats = Stats()
    host = getattr(backend, "host", None)
    mark = host.output_mark() if host is not None else 0
    result = CheckResult(target.backend, op, dtype, check)

    def done(status: str, message: str = "") -> dict[str, Any]:
        result.status, result.message = status, cut(message, MAX_MESSAGE)
        result.examples = stats.examples
        result.max_abs_err, result.max_rel_err = jsonable(stats.max_abs), jsonable(stats.max_rel)
        result.worst_ratio = jsonable(stats.worst_ratio)
        result.duration_s = round(time.perf_counter() - t0, 3)
        result.unsupported_examples = stats.unsupported
        result.shrink_replays = stats.shrink_replays
        extra = result.extra
        if stats.worst_tol or check in ("forward", "vjp") or status == "fail":
            result.tolerance = {
                "policy": tolerance.POLICY, "c_base": tolerance.C_BASE,
                "c_floor": tolerance.C_FLOOR, "u": tolerance.floor_u(dtype),
                "working_precision": tolerance.working_precision(dtype),
                "u_dtype": lmspec._precision.UNIT_ROUNDOFF[dtype],
                "at_worst": jsonable(stats.worst_tol)}
        if stats.ambiguous:
            extra["ambiguous_examples"] = stats.ambiguous
        if stats.deviated:
            extra["deviation_examples"] = stats.deviated
        dist = ratio_distribution(stats.ratios)
        if dist:
            extra["ratio_distribution"] = dist
        failure = stats.failure if status in ("fail", "error") else stats.deviation if (
            status == "deviation") else None
        if failure is not None:
            result.counterexample = jsonable(compact(failure))
            result.reproduce = reproduce_command(target, config)
        if host is not None:
            out = host.output_since(mark)
            if out:
                extra["backend_output"] = out
        return result.to_json()

    oc = CASES.get(op)
    if oc is None:
        return done("skipped", f"no conformance cases are declared for {op}")
    large = config.shapes == "large"
    if large and oc.large is None:
        return done("skipped", f"no large-shape cases declared for {op}")
    if large and check not in ("forward", "vjp"):
        return done("skipped", "no large-shape cases for this check")
    method = getattr(backend, op, None)
    if method is None:
        return done("unsupported", f"{target.backend} does not implement {op}")
    if check == "vjp" and not callable(getattr(backend, "vjp", None)):
        return done("unsupported", f"{target.backend} has no vjp")
    prop = PROPERTIES.get((op, check)) if check not in ("forward", "vjp") else None
    if check not in ("forward", "vjp") and prop is None:
        return done("skipped", f"unknown check {check!r} for {op}")
    timeout = config.call_timeout_s
    owner = target.backend

    calls = [0]  # backend calls in the current example

    def run_as_backend(name: str, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        fn = getattr(backend, name, None)
        if name in lmspec.OPS:
            names, kw = lmspec.OPS[name].params, op_kwargs(name, Call(args, kwargs), dtype)
        else:  # a sampler method, not a catalogue op (draw_tokens, draw_speculative; §2)
            from .statistical import sampler_call

            fn, names, kw = sampler_call(backend, name, fn, kwargs, result.extra)
        if fn is None:
            raise Unsupported(f"{target.backend} does not implement {name} (used by {check})")
        return output(call_backend(fn, f"{name}()", timeout, names, args, kw, owner),
                       f"{name}()")

    # one strategy object per check: Hypothesis validates each new one it is handed
    inputs = ((prop.strategy or oc.strategy) if prop else (
        oc.large if large else oc.strategy))(dtype)

    def example(data: Any) -> None:
        stats.begin()
        with np.errstate(all="ignore"):
            checked = _example(data)
        if checked:
            stats.end()

    def _example(data: Any) -> bool:
        """One example; whether the backend's answer was checked."""
        drawer = Drawer(data)
        drawn = data.draw(inputs, label="input")
        check_drawn_dtypes(drawn, dtype, f"{op} {check}")
        record: dict[str, Any] = {"input": drawn}
        calls[0] = 0
        judge: Callable[[Gate, Stats], None] | None = None
        try:
            judge = _evaluate(drawer, drawn, record)
            if prop is not None and calls[0] == 0:  # the property decided without the backend
                stats.vacuous += 1
                return False
            judge(STRICT, stats)
        except Unsupported as exc:
            stats.unsupported += 1
            stats.unsupported_reason = str(exc)
            return False
        except Mismatch as exc:
            dev = deviation_for(deviations or {}, target)
            if dev is not None and judge is not None and excused(dev, drawn, judge):
                stats.deviated += 1
                stats.examples += not stats.shrinking
                if stats.deviation is None:
                    stats.deviation = dict(record, message=str(exc))
                return True
            _failed(record, exc)
            raise
        except (BackendError, Fatal) as exc:
            _failed(record, exc)
            raise
        stats.shrink_replays += stats.shrinking
        stats.examples += not stats.shrinking
        return True

    def _failed(record: dict[str, Any], exc: BaseException) -> None:
        record["message"] = str(exc)
        if stats.shrinking:
            stats.shrink_replays += 1
        else:
            stats.examples += 1
        stats.shrinking = True
        stats.failure = record

    def _evaluate(drawer: Drawer, drawn: Any,
                  record: dict[str, Any]) -> Callable[[Gate, Stats], None]:
        """Call the backend on one example; return the judge of its answers (a gate and
        the statistics to add to → raises ``Mismatch``), which a deviation's bound may
        run again at its own gate without calling the backend twice."""
        if prop is not None:
            claims = list(prop.check(run_as_backend, drawn, dtype))
            return lambda gate, st_: check_claims(claims, dtype, st_, gate)
        ref = reference(op, drawn)
        kw = op_kwargs(op, drawn, dtype)
        names = lmspec.OPS[op].params
        if check == "forward":
            got = output(call_backend(method, f"{op}()", timeout, names, drawn.args, kw,
                                       owner), f"{op}()")

            def judge_forward(gate: Gate, st_: Stats) -> None:
                base = baseline(op, drawn, dtype, working=gate.working)
                pert = once(lambda: perturbed_reference(op, drawn, dtype,
                                                         working=gate.working))
                compare_outputs(oc, drawn, got, ref, base, dtype, st_, "out", pert=pert,
                                 gate=gate)
            return judge_forward
        cot = cotangent(drawer, ref, dtype)
        record["cotangent"] = cot
        # the forward above validated these arguments and shaped the cotangent
        ref_g = as_result(pullback(op, map_arrays(drawn.args, widen), kw | (
            {"dtype": "float64"} if "dtype" in kw else {}), map_arrays(cot, widen)))
        got_g = call_backend(Vjp(backend.vjp, op), f"vjp({op!r})", timeout,
                             (*names, "cotangent"), (*drawn.args, cot), kw, owner)
        if not isinstance(got_g, (tuple, list)) or len(got_g) != len(drawn.args):
            raise BackendError(f"vjp returned {type(got_g).__name__} of length "
                                f"{len(got_g) if isinstance(got_g, (tuple, list)) else '-'}"
                                f", but should be a tuple of {len(drawn.args)}")
        grads = [output(g, f"vjp({op!r})") for g in got_g]

        def judge_vjp(gate: Gate, st_: Stats) -> None:
            base_g = baseline(op, drawn, dtype, cot, working=gate.working)
            pert_g = once(lambda: perturbed_reference(op, drawn, dtype, cot,
                                                       working=gate.working))
            for i, r in enumerate(ref_g):
                compare_outputs(oc, drawn, grads[i], r,
                                 None if base_g is None else base_g[i], dtype, st_,
                                 f"grad {names[i]}", map_arrays(cot, widen),
                                 lambda i=i: [None if p is None else p[i] for p in pert_g()],
                                 gate=gate)
        return judge_vjp

    test = settings(
        max_examples=config.examples, deadline=None, database=None, derandomize=False,
        print_blob=False, report_multiple_bugs=False,
        # a large-tier example costs seconds and its sizes already start at the boundary
        # values a shrink would seek: no shrinking there
        phases=(Phase.explicit, Phase.reuse, Phase.generate) + (
            (Phase.shrink,) if config.shapes != "large" else ()),
        suppress_health_check=list(HealthCheck),
    )(seed(seed_of(target, config.seed))(given(st.data())(example)))

    precision = {d: p for d, p in dict(getattr(backend, "precision", None) or {}).items()
                 if (d, p) in ENGINE_MODES}
    if precision.get(dtype, dtype) != dtype:
        result.extra["precision"] = precision[dtype]
    with tolerance.declared_precision(precision), fresh_examples():
        try:
            test()
        except Mismatch as exc:
            return done("fail", str(exc))
        except (BackendError, Fatal) as exc:
            return done("error", str(exc))
        except StrategyError as exc:
            return done("error", f"harness: {exc}")
        except HypothesisException as exc:
            return done("error", f"the search failed: {type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - a harness or reference problem is an error
            return done("error", f"{type(exc).__name__}: {exc}")
        return verdict(done, stats, deviations, target, result)


def verdict(done: Callable[..., dict[str, Any]], stats: Stats,
             deviations: Mapping[str, Any] | None, target: Target,
             result: CheckResult) -> dict[str, Any]:
    """The status of a check whose search raised nothing (CONTRACT §5 statuses; a pass
    with fewer than :data:`MIN_CHECKED_FRACTION` of its examples checked is partial)."""
    if stats.deviated:
        described = describe_deviation(deviation_key(deviations or {}, target),
                                       deviation_for(deviations or {}, target))
        result.extra["deviation_reason"] = described["reason"]
        result.extra["deviation"] = described
        msg = (stats.deviation or {}).get("message", "")
        return done("deviation", f"{msg} ({stats.deviated} of "
                    f"{stats.examples} examples deviate as declared)")
    answered = stats.examples
    drawn_total = answered + stats.unsupported
    if answered == 0:
        return done("unsupported", stats.unsupported_reason or (
            "no example exercised the backend" if stats.vacuous else "no example was checked"))
    msg = ""
    if stats.unsupported:
        msg = (f"{stats.unsupported} of {drawn_total} examples unsupported: "
               f"{stats.unsupported_reason}")
    if answered < MIN_CHECKED_FRACTION * drawn_total:
        result.extra["partial"] = True
        msg = f"partial pass: only {answered} of {drawn_total} examples checked; " + msg
    return done("pass", msg)


def reproduce_command(t: Target, config: Settings) -> str:
    parts = ["lmspec", "run", "--backend", t.backend, "--op", t.op, "--dtype", t.dtype,
             "--check", t.check, "--seed", str(config.seed), "--max-examples",
             str(config.examples), *config.replay_args]
    if config.shapes == "large":
        parts += ["--shapes", "large"]
    return " ".join(parts)
