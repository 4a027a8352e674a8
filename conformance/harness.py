"""The conformance harness: one Hypothesis search per (backend, op, dtype, check).

A *check* is ``"forward"`` (values against the float64 reference), ``"vjp"``
(gradients against the reference vjp) or the name of a reference-free property.
Everything here is generic: what varies per op lives in the spec catalogue
(``lmspec.OPS``) and in the families' conformance declarations (``cases_*``).
"""

from __future__ import annotations

import importlib
import math
import signal
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisException

import lmspec
from lmspec._precision import DTYPES, computing_in
from lmspec._vjp import pullback
from lmspec.backends.host import MAX_MESSAGE, cut
from lmspec.backends.remote import (
    DEFAULT_TIMEOUT_S,
    BackendFatal,
    BackendRaised,
    InputModified,
)

from . import tolerance
from .declare import CASES, PROPERTIES, Call, Close, Holds, OpCases

for _fam in lmspec.FAMILIES:
    importlib.import_module(f"lmspec.conformance.cases_{_fam}")


def _pin_hypothesis_constants() -> None:
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


_pin_hypothesis_constants()


@contextmanager
def _fresh_examples() -> Iterator[None]:
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


PROFILES: dict[str, int] = {"quick": 20, "default": 30, "thorough": 1000}
"""Fresh examples per check of each ``--profile``. The default's 30 come from
``benchmarks/bench_detection.py``: over the 65 mutants of the test suite on 5 seeds each,
a run of 30 examples per check caught 322 of 325 (mutant, seed) runs on the mutant's own
checks (323 on every check of its op in float32 and float64), 100 examples 324 (325),
and the former default (100 examples, about 70 of them Hypothesis' copies of parts of
earlier ones) 309."""
LARGE_PROFILES: dict[str, int] = {"quick": 3, "default": 5, "thorough": 50}
"""Examples per check of the large-shape tier (``--shapes large``): each costs hundreds
of small ones, and its sizes already sit at the tile boundaries a search would seek."""
STATUSES = ("pass", "fail", "error", "deviation", "unsupported", "skipped")
MIN_CHECKED_FRACTION = 0.5
"""A check passes outright only when the backend answered at least this fraction of the
examples drawn; fewer (but some) is a *partial* pass, marked with its counts; none is
``unsupported``."""


@dataclass(frozen=True)
class Target:
    backend: str
    op: str
    dtype: str
    check: str

    @property
    def id(self) -> str:
        return f"{self.backend}::{self.op}::{self.dtype}::{self.check}"


@dataclass
class Settings:
    profile: str = "default"
    max_examples: int | None = None
    seed: int = 0
    call_timeout_s: float = DEFAULT_TIMEOUT_S
    replay_args: Sequence[str] = ()
    shapes: str = "small"
    """``"small"`` (each op's own strategy) or ``"large"`` (its large-shape tier)."""

    @property
    def examples(self) -> int:
        """Examples per check: ``--max-examples``, else the profile's count
        (:data:`PROFILES`, or :data:`LARGE_PROFILES` for the large tier)."""
        if self.max_examples is not None:
            return self.max_examples
        return (LARGE_PROFILES if self.shapes == "large" else PROFILES)[self.profile]


def checks_of(op: str) -> list[str]:
    """The checks run for ``op``: forward, vjp if differentiable, then its properties."""
    out = ["forward"]
    if lmspec.OPS[op].diff:
        out.append("vjp")
    out += [name for (o, name) in PROPERTIES if o == op]
    return out


def targets(backends: Sequence[Any], ops: Sequence[str], dtypes: Sequence[str] | None,
            checks: Sequence[str] | None = None) -> list[Target]:
    """Every (backend, op, dtype, check) to run, in a stable order."""
    out = []
    for b in backends:
        for op in ops:
            for dt in [d for d in DTYPES if d in b.dtypes and (not dtypes or d in dtypes)]:
                out += [Target(b.name, op, dt, c) for c in checks_of(op)
                        if not checks or c in checks]
    return out


# -- failures raised inside the Hypothesis test (so that it shrinks them) -------------

class _Mismatch(AssertionError):
    """The backend disagrees with the spec (status ``fail``)."""


class _BackendError(Exception):
    """The backend raised, hung, or returned the wrong structure (status ``error``)."""


class _Unsupported(Exception):
    pass


class _Timeout(Exception):
    pass


class _Fatal(BaseException):
    """The backend's process died or overstayed: the check ends at once as ``error``
    (a ``BaseException``, so Hypothesis neither retries nor shrinks it)."""


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Interrupt an *in-process* backend call that runs past ``seconds`` (main thread,
    POSIX only; backends in a host process are killed by the host's timeout instead)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread() or not hasattr(
            signal, "setitimer"):
        yield
        return

    def _raise(signum, frame):
        raise _Timeout(f"timed out after {seconds:g} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _copy(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.copy()
    if isinstance(x, (tuple, list)):
        return type(x)(_copy(a) for a in x)
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    return x


def _modified(before: Any, after: Any, name: str) -> str | None:
    """The name of the first array in ``after`` that differs from ``before`` bit for bit."""
    if isinstance(before, np.ndarray):
        same = (isinstance(after, np.ndarray) and after.dtype == before.dtype
                and after.shape == before.shape and after.tobytes() == before.tobytes())
        return None if same else name
    if isinstance(before, (tuple, list)):
        for i, b in enumerate(before):
            hit = _modified(b, after[i] if len(after) > i else None, f"{name}[{i}]")
            if hit:
                return hit
    return None


def _path_name(path: Sequence[Any], names: Sequence[str]) -> str:
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
    a, kw = (tuple(args), dict(kwargs)) if remote else (_copy(tuple(args)), _copy(dict(kwargs)))
    try:
        if remote:  # the host enforces the timeout by killing
            out = fn(*a, **kw)
        else:
            with _time_limit(timeout):
                out = fn(*a, **kw)
    except NotImplementedError as exc:
        raise _Unsupported(str(exc) or "NotImplementedError") from exc
    except InputModified as exc:
        raise _BackendError(f"{owner} modified its input {_path_name(exc.path, names)} "
                            "(backends must not modify their inputs, CONTRACT §3)") from None
    except BackendFatal as exc:
        raise _Fatal(f"{what}: {exc}") from None
    except _Timeout as exc:
        raise _BackendError(f"{what} {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any backend failure is an "error" result
        text = str(exc) if isinstance(exc, BackendRaised) else f"{type(exc).__name__}: {exc}"
        raise _BackendError(f"{what} raised {cut(text)}") from exc
    if not remote:
        for i, (orig, mine) in enumerate(zip(args, a)):
            hit = _modified(orig, mine, names[i] if i < len(names) else f"args[{i}]")
            if hit:
                raise _BackendError(f"{owner} modified its input {hit} (backends must not "
                                    "modify their inputs, CONTRACT §3)")
        for key, orig in kwargs.items():
            hit = _modified(orig, kw.get(key), key)
            if hit:
                raise _BackendError(f"{owner} modified its input {hit} (backends must not "
                                    "modify their inputs, CONTRACT §3)")
    return out


# -- conversions ------------------------------------------------------------------

def _map(x: Any, fn: Callable[[np.ndarray], Any]) -> Any:
    if isinstance(x, (tuple, list)):
        return tuple(_map(a, fn) for a in x)
    return fn(x) if isinstance(x, np.ndarray) else x


def _widen(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64) if a.dtype.kind == "f" or a.dtype in DTYPES.values() else a


def _as_result(x: Any) -> Any:
    """A backend's output as NumPy (float outputs as float64), tuples kept."""
    if isinstance(x, (tuple, list)):
        return tuple(_as_result(a) for a in x)
    if x is None:
        return None
    a = np.asarray(x)
    if a.dtype == DTYPES["bfloat16"] or a.dtype.kind == "f":
        return a.astype(np.float64)
    return a


def _output(x: Any, what: str) -> Any:
    """A backend's output as NumPy (:func:`_as_result`); one that is not made of arrays
    (ragged lists, strings, objects) is the backend's error."""
    try:
        out = _as_result(x)
    except Exception as exc:  # noqa: BLE001
        raise _BackendError(f"{what} returned {type(x).__name__}, which is not an array "
                            f"({type(exc).__name__}: {cut(str(exc), 200)})") from None
    for name, a in _named(out, "out"):
        if a is not None and a.dtype.kind not in "fiub":
            raise _BackendError(f"{what} returned {name} of dtype {a.dtype}, which is not a "
                                "numeric array")
    return out


def _named(x: Any, name: str) -> list[tuple[str, Any]]:
    if isinstance(x, (tuple, list)):
        return [p for i, a in enumerate(x) for p in _named(a, f"{name}[{i}]")]
    return [(name, x)]


def _op_kwargs(op: str, call: Call, dtype: str) -> dict[str, Any]:
    kw = dict(call.kwargs)
    if "dtype" in lmspec.OPS[op].params:
        kw["dtype"] = dtype
    return kw


def perturbed_reference(op: str, call: Call, dtype: str, cot: Any = None,
                        working: str | None = None) -> Any:
    """The measured conditioning's reference evaluations (see conformance.conditioning)."""
    from .conditioning import perturbed_reference as measured

    return measured(op, call, dtype, cot, working)


def reference(op: str, call: Call) -> Any:
    """The float64 reference output for ``call``."""
    kw = _op_kwargs(op, call, "float64")
    return _as_result(lmspec.OPS[op].reference(*_map(call.args, _widen), **kw))


def baseline(op: str, call: Call, dtype: str, cot: Any = None,
             working: str | None = None) -> Any:
    """The spec's own formulas evaluated at the working precision of ``dtype`` on its
    inputs, the outputs rounded to ``dtype`` (``None`` if that cannot be done, or for
    float64 at its own precision, whose baseline would be the reference).

    The working precision (:func:`tolerance.working_precision`) is float32 for float16
    and bfloat16 (CONTRACT §6: half storage, float32 intermediates), the dtype itself
    for float32 and float64, or what a declared engine mode or a deviation's bound says.
    """
    w = tolerance.compute_dtype(working or tolerance.working_precision(dtype))
    if w == "float64":
        return None
    kw = _op_kwargs(op, call, dtype)
    try:
        with computing_in(w), np.errstate(all="ignore"):
            if cot is None:
                out = _as_result(lmspec.OPS[op].reference(*call.args, **kw))
            else:
                out = _as_result(lmspec.vjp(op, call.args, kw, cot))
    except Exception:  # noqa: BLE001 - a baseline that cannot run only removes the gate
        return None
    return _rounded(out, dtype) if tolerance.coarser(dtype, w) != w else out


def _rounded(x: Any, dtype: str) -> Any:
    """Float outputs rounded to ``dtype`` (kept as float64); others unchanged."""
    if isinstance(x, tuple):
        return tuple(_rounded(a, dtype) for a in x)
    if isinstance(x, np.ndarray) and x.dtype.kind == "f":
        with np.errstate(over="ignore"):
            return x.astype(DTYPES[dtype]).astype(np.float64)
    return x


# -- per-example bookkeeping ------------------------------------------------------

@dataclass
class _Stats:
    examples: int = 0
    unsupported: int = 0
    unsupported_reason: str = ""
    shrink_replays: int = 0
    vacuous: int = 0
    shrinking: bool = False
    deviated: int = 0
    deviation: dict[str, Any] | None = None
    ambiguous: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst_ratio: float = 0.0
    worst_tol: dict[str, Any] = field(default_factory=dict)
    failure: dict[str, Any] | None = None
    ratios: list[float] = field(default_factory=list)
    _example_ratio: float = 0.0

    def add(self, v: tolerance.Verdict, k: int, name: str) -> None:
        self.max_abs = max(self.max_abs, v.max_abs)
        self.max_rel = max(self.max_rel, v.max_rel)
        self._example_ratio = max(self._example_ratio, v.ratio)
        if v.ratio >= self.worst_ratio:
            self.worst_ratio = v.ratio
            self.worst_tol = {"value": v.tol, "k": k, "output": name}

    def begin(self) -> None:
        self._example_ratio = 0.0

    def end(self) -> None:
        if not self.shrinking:
            self.ratios.append(self._example_ratio)


RATIO_EDGES = tuple(x / 2 for x in range(-12, 3))
"""log10 bin edges of the per-example error/tolerance histogram: 1e-6 … 10."""


def ratio_distribution(ratios: Sequence[float]) -> dict[str, Any] | None:
    """Per-example worst ratio (error / tolerance) of a check: quantiles and a log10
    histogram (``below`` counts ratios under 1e-6, zeros included; ``above`` over 10).

    Each quantile is an observed ratio (the smallest ``r`` with at least a fraction ``q``
    of the examples at or below it): interpolating between examples would give NaN next
    to an infinite ratio (a deviating example whose NaN sits where the spec has a number).
    """
    if not ratios:
        return None
    r = np.asarray(ratios, dtype=np.float64)
    logs = np.log10(np.where(r > 0, r, 1e-300))
    counts, _ = np.histogram(logs, bins=RATIO_EDGES)
    return {"edges_log10": list(RATIO_EDGES), "counts": counts.tolist(),
            "below": int((logs < RATIO_EDGES[0]).sum()),
            "above": int((logs > RATIO_EDGES[-1]).sum()),
            "quantiles": {q: jsonable(float(np.quantile(r, float(q), method="inverted_cdf")))
                          for q in ("0.5", "0.9", "0.99", "1")}}


MAX_COUNTEREXAMPLE_ELEMENTS = 10_000
"""Arrays of a counterexample larger than this are summarised in reports (shape, dtype,
range and the first values); the ``reproduce`` command replays the example exactly."""


def _compact(x: Any) -> Any:
    if isinstance(x, np.ndarray) and x.size > MAX_COUNTEREXAMPLE_ELEMENTS:
        flat = x.reshape(-1)
        wide = flat.astype(np.float64) if x.dtype == DTYPES["bfloat16"] else flat
        fin = wide[np.isfinite(wide)] if wide.dtype.kind == "f" else wide
        return {"elided": True, "dtype": str(x.dtype), "shape": list(x.shape),
                "min": jsonable(fin.min()) if fin.size else None,
                "max": jsonable(fin.max()) if fin.size else None,
                "first": jsonable(wide[:8].tolist()),
                "note": "array elided in the report; the reproduce command replays it"}
    if isinstance(x, Call):
        return Call(tuple(_compact(a) for a in x.args),
                    {k: _compact(v) for k, v in x.kwargs.items()})
    if isinstance(x, (tuple, list)):
        return type(x)(_compact(a) for a in x)
    if isinstance(x, dict):
        return {k: _compact(v) for k, v in x.items()}
    return x


def jsonable(x: Any) -> Any:
    """Arrays, calls and scalars as JSON-safe data (non-finite floats as strings such as
    ``"nan"``/``"inf"``, arrays as ``{"array", "dtype", "shape"}``; anything else by repr)."""
    if isinstance(x, Call):
        return {"args": jsonable(x.args), "kwargs": jsonable(dict(x.kwargs))}
    if isinstance(x, (tuple, list)):
        return [jsonable(a) for a in x]
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        dt = str(x.dtype)
        data = x.astype(np.float64) if x.dtype == DTYPES["bfloat16"] else x
        return {"array": jsonable(data.tolist()), "dtype": dt, "shape": list(x.shape)}
    if isinstance(x, (np.floating, float)):
        f = float(x)
        return f if math.isfinite(f) else repr(f)
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    if x is None or isinstance(x, (str, int, bool)):
        return x
    return repr(x)


class StrategyError(Exception):
    """A conformance declaration produced an input that breaks the harness's rules."""


def _check_drawn_dtypes(drawn: Any, dtype: str, where: str) -> None:
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


def _seed_of(target: Target, base: int) -> int:
    """Examples depend on the seed, op, dtype and check — not on the backend — so that
    every backend is checked on the same inputs."""
    key = f"{target.op}|{target.dtype}|{target.check}".encode()
    return (base * 1_000_003 + zlib.crc32(key)) % 2**32


@dataclass(frozen=True)
class Gate:
    """How one example is judged: at a working precision (``None``: the dtype's, see
    :func:`tolerance.working_precision`) and up to ``limit`` × the tolerance (1; a
    deviation's ratio bound)."""

    working: str | None = None
    limit: float = 1.0


STRICT = Gate()


def _compare_outputs(oc: OpCases, call: Call, got: Any, ref: Any, base: Any, dtype: str,
                     stats: _Stats, label: str, cot: Any = None,
                     pert: Callable[[], list[Any]] | None = None,
                     gate: Gate = STRICT) -> None:
    """Compare each output array; ``pert`` gives the perturbed reference evaluations of
    the whole output tree, called at most once, and only if an output needs them (see
    :data:`tolerance.MEASURED_ABOVE`)."""
    k = oc.k(call)
    scale = oc.scale(call, cot) if oc.scale else None
    refs, gots = _named(ref, label), _named(got, label)
    bases = _named(base, label) if base is not None else [(n, None) for n, _ in refs]

    def perturbed(i: int) -> Callable[[], list[Any]] | None:
        if pert is None:
            return None
        return lambda: [None if p is None else _named(p, label)[i][1] for p in pert()]

    if len(refs) != len(gots):
        raise _BackendError(f"{label} has {len(gots)} arrays, but should have {len(refs)}")
    for i, ((name, r), (_, g), (_, s)) in enumerate(zip(refs, gots, bases)):
        if r is None or g is None:
            if (r is None) != (g is None):
                raise _BackendError(f"{name} is {'None' if g is None else 'an array'}, "
                                    f"but should be {'None' if r is None else 'an array'}")
            continue
        ra, ga = np.asarray(r), np.asarray(g)
        if ra.dtype.kind in "iub" and ga.dtype.kind not in "iub":
            raise _BackendError(f"{name} has dtype {ga.dtype}, but should be an integer array")
        if ra.dtype.kind == "f" and ga.dtype.kind not in "f":
            raise _BackendError(f"{name} has dtype {ga.dtype}, but should be a float array")
        if ga.shape != ra.shape:
            raise _BackendError(f"{name} has shape {ga.shape}, but should have shape {ra.shape}")
        if oc.compare is not None:
            ok, amb, msg = oc.compare(call, ra, ga, dtype,
                                      lambda kk, m: tolerance.floor(dtype, kk, m, gate.working))
            stats.ambiguous += amb
            if not ok:
                raise _Mismatch(msg)
            continue
        v = tolerance.compare(name, ga, ra, s, dtype, k, scale, perturbed=perturbed(i),
                              working=gate.working, limit=gate.limit)
        stats.add(v, k, name)
        if not v.ok:
            raise _Mismatch(v.message)


def _check_claims(claims: Any, dtype: str, stats: _Stats, gate: Gate = STRICT) -> None:
    """A property's claims. ``Close`` compares two outputs of the backend (or one with
    an exact value), each rounded to ``dtype`` at its output: its floor uses the coarser
    of the dtype's and the working precision's unit roundoff."""
    working = tolerance.coarser(dtype, gate.working or tolerance.working_precision(dtype))
    for claim in claims:
        if isinstance(claim, Holds):
            if not claim.ok:
                raise _Mismatch(f"{claim.what} does not hold" + (f": {claim.detail}"
                                                                   if claim.detail else ""))
            continue
        assert isinstance(claim, Close), f"a property yielded {claim!r}"
        expected = np.asarray(claim.expected, dtype=np.float64)
        if np.shape(claim.actual) != expected.shape:
            raise _BackendError(f"{claim.what}: the backend's output has shape "
                                f"{np.shape(claim.actual)}, but should have shape "
                                f"{expected.shape}")
        scale = claim.scale if claim.scale is not None else max(
            1.0, float(np.abs(expected[np.isfinite(expected)]).max(initial=0.0)))
        v = tolerance.compare(claim.what, claim.actual, expected, None, dtype, claim.k, scale,
                              working=working, limit=gate.limit)
        stats.add(v, claim.k, claim.what)
        if not v.ok:
            raise _Mismatch(v.message)


def _cotangent(draw_data: Any, ref: Any, dtype: str) -> Any:
    if isinstance(ref, tuple):
        return tuple(_cotangent(draw_data, r, dtype) for r in ref)
    from .draw import floats

    c = floats(draw_data.draw, dtype, np.shape(ref), -2.0, 2.0, label="cotangent")
    # no subnormal cotangents: scaling a gradient by 1e-40 tests flush-to-zero, not the op
    tiny = float(np.finfo(np.float16).tiny) if dtype == "float16" else float(
        np.finfo(np.float32).tiny) if dtype in ("float32", "bfloat16") else 0.0
    return np.where(np.abs(c.astype(np.float64)) < tiny, 0, c).astype(c.dtype)


def _once(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn``, evaluated on the first call only."""
    memo: list[Any] = []

    def get() -> Any:
        if not memo:
            memo.append(fn())
        return memo[0]

    return get


class _Drawer:
    """Adapts ``st.data()`` to the ``draw(strategy, label=)`` signature of draw.py helpers."""

    def __init__(self, data: Any):
        self._data = data

    def draw(self, strategy: st.SearchStrategy[Any], label: str | None = None) -> Any:
        return self._data.draw(strategy, label=label)


# -- one target -------------------------------------------------------------------

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
    stats = _Stats()
    host = getattr(backend, "host", None)
    mark = host.output_mark() if host is not None else 0
    result: dict[str, Any] = {
        "backend": target.backend, "op": op, "dtype": dtype, "check": check,
        "status": "pass", "examples": 0, "max_abs_err": 0.0, "max_rel_err": 0.0,
        "worst_ratio": 0.0, "tolerance": None, "message": "", "counterexample": None,
        "reproduce": None,
    }

    def done(status: str, message: str = "") -> dict[str, Any]:
        result.update(status=status, message=cut(message, MAX_MESSAGE), examples=stats.examples,
                      max_abs_err=jsonable(stats.max_abs), max_rel_err=jsonable(stats.max_rel),
                      worst_ratio=jsonable(stats.worst_ratio),
                      duration_s=round(time.perf_counter() - t0, 3))
        result["unsupported_examples"] = stats.unsupported
        result["shrink_replays"] = stats.shrink_replays
        if stats.worst_tol or check in ("forward", "vjp") or status == "fail":
            result["tolerance"] = {
                "policy": tolerance.POLICY, "c_base": tolerance.C_BASE,
                "c_floor": tolerance.C_FLOOR, "u": tolerance.floor_u(dtype),
                "working_precision": tolerance.working_precision(dtype),
                "u_dtype": lmspec._precision.UNIT_ROUNDOFF[dtype],
                "at_worst": jsonable(stats.worst_tol)}
        if stats.ambiguous:
            result["ambiguous_examples"] = stats.ambiguous
        if stats.deviated:
            result["deviation_examples"] = stats.deviated
        dist = ratio_distribution(stats.ratios)
        if dist:
            result["ratio_distribution"] = dist
        failure = stats.failure if status in ("fail", "error") else stats.deviation if (
            status == "deviation") else None
        if failure is not None:
            result["counterexample"] = jsonable(_compact(failure))
            result["reproduce"] = reproduce_command(target, config)
        if host is not None:
            out = host.output_since(mark)
            if out:
                result["backend_output"] = out
        return result

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
            names, kw = lmspec.OPS[name].params, _op_kwargs(name, Call(args, kwargs), dtype)
        else:  # a sampler method, not a catalogue op (draw_tokens, draw_speculative; §2)
            from .statistical import sampler_call

            fn, names, kw = sampler_call(backend, name, fn, kwargs, result)
        if fn is None:
            raise _Unsupported(f"{target.backend} does not implement {name} (used by {check})")
        return _output(call_backend(fn, f"{name}()", timeout, names, args, kw, owner),
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
        drawer = _Drawer(data)
        drawn = data.draw(inputs, label="input")
        _check_drawn_dtypes(drawn, dtype, f"{op} {check}")
        record: dict[str, Any] = {"input": drawn}
        calls[0] = 0
        judge: Callable[[Gate, _Stats], None] | None = None
        try:
            judge = _evaluate(drawer, drawn, record)
            if prop is not None and calls[0] == 0:  # the property decided without the backend
                stats.vacuous += 1
                return False
            judge(STRICT, stats)
        except _Unsupported as exc:
            stats.unsupported += 1
            stats.unsupported_reason = str(exc)
            return False
        except _Mismatch as exc:
            dev = deviation_for(deviations or {}, target)
            if dev is not None and judge is not None and _excused(dev, drawn, judge):
                stats.deviated += 1
                stats.examples += not stats.shrinking
                if stats.deviation is None:
                    stats.deviation = dict(record, message=str(exc))
                return True
            _failed(record, exc)
            raise
        except (_BackendError, _Fatal) as exc:
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

    def _evaluate(drawer: _Drawer, drawn: Any,
                  record: dict[str, Any]) -> Callable[[Gate, _Stats], None]:
        """Call the backend on one example; return the judge of its answers (a gate and
        the statistics to add to → raises ``_Mismatch``), which a deviation's bound may
        run again at its own gate without calling the backend twice."""
        if prop is not None:
            claims = list(prop.check(run_as_backend, drawn, dtype))
            return lambda gate, st_: _check_claims(claims, dtype, st_, gate)
        ref = reference(op, drawn)
        kw = _op_kwargs(op, drawn, dtype)
        names = lmspec.OPS[op].params
        if check == "forward":
            got = _output(call_backend(method, f"{op}()", timeout, names, drawn.args, kw,
                                       owner), f"{op}()")

            def judge_forward(gate: Gate, st_: _Stats) -> None:
                base = baseline(op, drawn, dtype, working=gate.working)
                pert = _once(lambda: perturbed_reference(op, drawn, dtype,
                                                         working=gate.working))
                _compare_outputs(oc, drawn, got, ref, base, dtype, st_, "out", pert=pert,
                                 gate=gate)
            return judge_forward
        cot = _cotangent(drawer, ref, dtype)
        record["cotangent"] = cot
        # the forward above validated these arguments and shaped the cotangent
        ref_g = _as_result(pullback(op, _map(drawn.args, _widen), kw | (
            {"dtype": "float64"} if "dtype" in kw else {}), _map(cot, _widen)))
        got_g = call_backend(_Vjp(backend.vjp, op), f"vjp({op!r})", timeout,
                             (*names, "cotangent"), (*drawn.args, cot), kw, owner)
        if not isinstance(got_g, (tuple, list)) or len(got_g) != len(drawn.args):
            raise _BackendError(f"vjp returned {type(got_g).__name__} of length "
                                f"{len(got_g) if isinstance(got_g, (tuple, list)) else '-'}"
                                f", but should be a tuple of {len(drawn.args)}")
        grads = [_output(g, f"vjp({op!r})") for g in got_g]

        def judge_vjp(gate: Gate, st_: _Stats) -> None:
            base_g = baseline(op, drawn, dtype, cot, working=gate.working)
            pert_g = _once(lambda: perturbed_reference(op, drawn, dtype, cot,
                                                       working=gate.working))
            for i, r in enumerate(ref_g):
                _compare_outputs(oc, drawn, grads[i], r,
                                 None if base_g is None else base_g[i], dtype, st_,
                                 f"grad {names[i]}", _map(cot, _widen),
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
    )(seed(_seed_of(target, config.seed))(given(st.data())(example)))

    precision = {d: p for d, p in dict(getattr(backend, "precision", None) or {}).items()
                 if (d, p) in ENGINE_MODES}
    if precision.get(dtype, dtype) != dtype:
        result["precision"] = precision[dtype]
    with tolerance.declared_precision(precision), _fresh_examples():
        try:
            test()
        except _Mismatch as exc:
            return done("fail", str(exc))
        except (_BackendError, _Fatal) as exc:
            return done("error", str(exc))
        except StrategyError as exc:
            return done("error", f"harness: {exc}")
        except HypothesisException as exc:
            return done("error", f"the search failed: {type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - a harness or reference problem is an error
            return done("error", f"{type(exc).__name__}: {exc}")
        return _verdict(done, stats, deviations, target, result)


def _verdict(done: Callable[..., dict[str, Any]], stats: _Stats,
             deviations: Mapping[str, Any] | None, target: Target,
             result: dict[str, Any]) -> dict[str, Any]:
    """The status of a check whose search raised nothing (CONTRACT §5 statuses; a pass
    with fewer than :data:`MIN_CHECKED_FRACTION` of its examples checked is partial)."""
    if stats.deviated:
        dev = deviation_for(deviations or {}, target)
        result["deviation_reason"] = getattr(dev, "reason", str(dev))
        result["deviation"] = describe_deviation(deviation_key(deviations or {}, target), dev)
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
        result["partial"] = True
        msg = f"partial pass: only {answered} of {drawn_total} examples checked; " + msg
    return done("pass", msg)


class _Vjp:
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


ENGINE_MODES = frozenset({("float32", "tf32")})
"""The working precisions a backend may declare for a dtype (``precision``): documented
engine modes only (TF32 products for float32, CUDA). Anything else is ignored here and
refused when the backend loads: a declared precision loosens the gate."""


def deviation_key(deviations: Mapping[str, Any], t: Target) -> str | None:
    """The key of a backend's declared deviation for this target, or ``None``: keys
    ``op/check/dtype``, ``op/check``, ``op/*/dtype`` (every check of the op in one dtype)
    and ``op``, the narrowest match winning (CONTRACT §3)."""
    for key in (f"{t.op}/{t.check}/{t.dtype}", f"{t.op}/{t.check}", f"{t.op}/*/{t.dtype}",
                t.op):
        if key in deviations:
            return key
    return None


def deviation_for(deviations: Mapping[str, Any], t: Target) -> Any:
    """The declared deviation for this target (see :func:`deviation_key`), or ``None``.
    A deviation with neither a predicate nor a bound (a plain reason string among them)
    covers nothing: the backend loader refuses it, and it is never applied here."""
    key = deviation_key(deviations, t)
    dev = None if key is None else deviations[key]
    if dev is None or (getattr(dev, "applies", None) is None
                       and getattr(dev, "bound", None) is None):
        return None
    return dev


def _excused(dev: Any, drawn: Any, judge: Callable[[Gate, _Stats], None]) -> bool:
    """Does the deviation excuse this example? It must cover it (its predicate) and,
    with a bound, the example must pass at the bound's gate: a ratio (error up to
    ``bound`` × the tolerance) or a working precision (judged as if computed in it)."""
    if not _covers(dev, drawn):
        return False
    bound = getattr(dev, "bound", None)
    if bound is None:
        return True
    gate = Gate(working=bound) if isinstance(bound, str) else Gate(limit=float(bound))
    try:
        with np.errstate(all="ignore"):
            judge(gate, _Stats())
    except _Mismatch:
        return False
    return True


def _covers(dev: Any, drawn: Any) -> bool:
    """Does the deviation's predicate cover this example? (None covers every example; a
    predicate that raises covers nothing.)"""
    applies = getattr(dev, "applies", None)
    if applies is None:
        return True
    args, kwargs = (drawn.args, dict(drawn.kwargs)) if isinstance(drawn, Call) else (
        (drawn,), {})
    try:
        return bool(applies(_copy(tuple(args)), _copy(kwargs)))
    except Exception:  # noqa: BLE001
        return False


def describe_deviation(key: str | None, dev: Any) -> dict[str, Any]:
    """A declared deviation as reports list it: key, reason, whether it has a predicate,
    and its bound (a ratio, a working precision, or ``None``)."""
    bound = getattr(dev, "bound", None)
    return {"key": key, "reason": str(getattr(dev, "reason", dev)),
            "predicate": getattr(dev, "applies", None) is not None,
            "bound": bound if isinstance(bound, str) or bound is None else float(bound)}


def reproduce_command(t: Target, config: Settings) -> str:
    parts = ["lmspec", "run", "--backend", t.backend, "--op", t.op, "--dtype", t.dtype,
             "--check", t.check, "--seed", str(config.seed), "--max-examples",
             str(config.examples), *config.replay_args]
    if config.shapes == "large":
        parts += ["--shapes", "large"]
    return " ".join(parts)
