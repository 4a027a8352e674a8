"""The conformance suite as a Python API: ``lmspec.check``, ``lmspec.assert_conforms``,
``lmspec.assert_close``.

:func:`check` runs, on one bare callable, exactly the searches of ``lmspec run``: the
same Hypothesis strategies, seeds (examples depend on the seed, op, dtype and check
only), tolerance policy (:mod:`lmspec.conformance.tolerance`) and properties. The
callable implements one op with the catalogue's signature, NumPy in and NumPy out
(:mod:`lmspec.adapters` wraps torch and JAX functions). A property that also calls
*another* op (``exp_is_softmax`` of ``log_softmax`` calls ``softmax``) cannot be judged
on one op: its examples are ``unsupported``, with the op it needed in the message —
never run against the reference, which would make the property vacuous.

:func:`assert_close` judges *one* call — the answer to "what atol should my bfloat16
kernel test use?": the tolerance ``C_BASE·max|baseline − r| + C_FLOOR·√k·u·M`` of each
output for those very inputs, from the reference, the baseline in the dtype and the
measured conditioning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import lmspec
from lmspec._precision import DTYPES, UNIT_ROUNDOFF

from . import harness, tolerance
from .declare import CASES, Call

__all__ = ["check", "assert_conforms", "assert_close", "CloseVerdict", "OutputVerdict"]


class _OneOp:
    """A bare callable seen by the harness as a backend that implements one op."""

    def __init__(self, op: str, fn: Callable[..., Any], vjp: Callable[..., Any] | None,
                 name: str, dtypes: Sequence[str], deviations: Mapping[str, Any] | None):
        self.name, self.device, self.dtypes = name, "callable", tuple(dtypes)
        self.deviations = dict(deviations or {})
        setattr(self, op, fn)
        if vjp is not None:
            self.vjp = vjp


def _name(fn: Callable[..., Any]) -> str:
    return str(getattr(fn, "__name__", None) or type(fn).__name__)


def check(op: str, fn: Callable[..., Any], *, dtypes: Iterable[str] | None = None,
          profile: str = "quick", seed: int = 0, vjp: Callable[..., Any] | None = None,
          checks: Iterable[str] | None = None, max_examples: int | None = None,
          deviations: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run ``op``'s checks on ``fn`` and return one result record per (dtype, check).

    ``fn(*args, **kwargs)`` has the catalogue signature of ``op`` (``lmspec.OPS[op]``).
    ``dtypes``: default all four; ``fn`` declines one by raising ``NotImplementedError``
    (status ``unsupported``). ``vjp(op, args, kwargs, cotangent) -> tuple`` is the
    backend's gradient convention (one entry per positional argument, ``None`` for the
    non-differentiable ones); default ``fn.vjp`` if present (the adapters set it), else
    the ``vjp`` check is ``unsupported``. ``checks``: default ``forward``, ``vjp`` and the
    op's properties. ``profile``/``max_examples``/``seed`` as for ``lmspec run``;
    ``deviations`` as a backend's (keys ``op``, ``op/check``, ``op/check/dtype``,
    ``op/*/dtype``; values :class:`lmspec.Deviation` with a predicate or a bound — one
    with neither is refused with a ``ValueError``, as a backend's is at load).
    The records are those of a report (CONTRACT §5); ``reproduce`` is the call to
    :func:`check` that replays a failure.
    """
    if op not in lmspec.OPS:
        raise ValueError(f"unknown op {op!r}; the catalogue has: {', '.join(lmspec.OPS)}")
    if profile not in harness.PROFILES:
        raise ValueError(f"profile must be one of {', '.join(harness.PROFILES)}")
    dts = list(dtypes) if dtypes is not None else list(DTYPES)
    for d in dts:
        if d not in DTYPES:
            raise ValueError(f"dtype {d!r} is not one of {', '.join(DTYPES)}")
    known = harness.checks_of(op)
    wanted = list(checks) if checks is not None else known
    for c in wanted:
        if c not in known:
            raise ValueError(f"{c!r} is not a check of {op} (known: {', '.join(known)})")
    from lmspec.backends.host import deviation_descriptor

    for key, dev in (deviations or {}).items():
        deviation_descriptor(str(key), dev)  # ValueError: the same refusal as at load
    backend = _OneOp(op, fn, vjp if vjp is not None else getattr(fn, "vjp", None), _name(fn),
                     dts, deviations)
    config = harness.Settings(profile=profile, max_examples=max_examples, seed=seed)
    out = []
    for t in harness.targets([backend], [op], dts, wanted):
        r = harness.run_target(backend, t, config, backend.deviations)
        if r.get("reproduce"):
            r["reproduce"] = (f"lmspec.check({op!r}, {backend.name}, dtypes=[{t.dtype!r}], "
                              f"checks=[{t.check!r}], seed={seed}, "
                              f"max_examples={config.examples})")
        out.append(r)
    return out


def describe_failure(r: Mapping[str, Any], fn_name: str = "fn",
                     vjp_name: str | None = None) -> str:
    """One failed or erroneous record as text: verdict, tolerance, runnable counterexample
    and the replay call."""
    lines = [f"{r['op']} {r['dtype']} {r['check']}: {r['status']}", f"  {r['message']}"]
    tol = r.get("tolerance")
    if tol:
        lines.append(f"  tolerance: {tol['policy']}; C_BASE={tol['c_base']:g}, "
                     f"C_FLOOR={tol['c_floor']:g}, u={tol['u']:.3g} (the failing example's "
                     "tolerance is in the message above)")
    if r.get("counterexample") is not None:
        snippet = python_snippet(r["op"], r["dtype"], r["check"], r["counterexample"], fn_name,
                                 vjp_name)
        lines.append("  counterexample (shrunk), runnable:")
        lines += ["      " + s for s in snippet.splitlines()]
    if r.get("reproduce"):
        lines.append(f"  replay: {r['reproduce']}")
    return "\n".join(lines)


def assert_conforms(op: str, fn: Callable[..., Any], **kwargs: Any) -> list[dict[str, Any]]:
    """:func:`check`, raising ``AssertionError`` when any check fails or errors; the
    message holds each verdict, the tolerance and the shrunk counterexample as a Python
    snippet that replays it. Returns the records otherwise (deviations and unsupported
    checks do not fail)."""
    results = check(op, fn, **kwargs)
    bad = [r for r in results if r["status"] in ("fail", "error")]
    if bad:
        head = (f"{_name(fn)} does not conform to lmspec's {op} ({len(bad)} of {len(results)} "
                "checks failed)")
        raise AssertionError("\n\n".join([head, *(describe_failure(r, _name(fn))
                                                  for r in bad)]))
    return results


# -- counterexamples as Python ---------------------------------------------------------

_SPECIAL = {"nan": "np.nan", "inf": "np.inf", "-inf": "-np.inf"}


def _list_src(x: Any) -> str:
    if isinstance(x, list):
        return "[" + ", ".join(_list_src(a) for a in x) + "]"
    if isinstance(x, str):
        return _SPECIAL.get(x, repr(x))
    return repr(x)


def _dtype_src(dt: str) -> str:
    return "ml_dtypes.bfloat16" if dt == "bfloat16" else f"np.{dt}"


def value_source(x: Any) -> str:
    """Python source for a value as :func:`lmspec.conformance.harness.jsonable` wrote it:
    arrays as ``np.array([...], dtype=...)`` (exact: every float is written with ``repr``),
    JSON lists (tuples in the call) as tuples."""
    if isinstance(x, dict) and "array" in x and "dtype" in x:
        data = x["array"]
        body = _list_src(data) if isinstance(data, list) else _SPECIAL.get(data, repr(data)) if (
            isinstance(data, str)) else repr(data)
        return f"np.array({body}, dtype={_dtype_src(x['dtype'])})"
    if isinstance(x, list):
        inner = ", ".join(value_source(a) for a in x)
        return f"({inner},)" if len(x) == 1 else f"({inner})"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k!r}: {value_source(v)}" for k, v in x.items()) + "}"
    return repr(x)


def python_snippet(op: str, dtype: str, check: str, counterexample: Mapping[str, Any],
                   fn_name: str = "fn", vjp_name: str | None = None) -> str:
    """A counterexample record (``result["counterexample"]``) as a runnable snippet."""
    drawn = counterexample.get("input")
    text = repr(counterexample)
    head = ["import numpy as np"] + (["import ml_dtypes"] if "bfloat16" in text else []) + [
        "import lmspec", ""]
    if not (isinstance(drawn, dict) and "args" in drawn):
        return "\n".join(head + [f"drawn = {value_source(drawn)}",
                                 f"# property {check} of {op}, checked in {dtype} on `drawn`"])
    kwargs = dict(drawn.get("kwargs") or {})
    if "dtype" in lmspec.OPS[op].params:
        kwargs["dtype"] = dtype
    body = [f"args = {value_source(drawn['args'])}", f"kwargs = {value_source(kwargs)}"]
    if check == "forward":
        body += [f"actual = {fn_name}(*args, **kwargs)  # the function under test",
                 f"lmspec.assert_close({op!r}, args, kwargs, actual, {dtype!r})"]
    elif check == "vjp":
        body += [f"cotangent = {value_source(counterexample.get('cotangent'))}",
                 f"grads = {vjp_name or fn_name + '.vjp'}({op!r}, args, kwargs, cotangent)"
                 "  # the vjp under test",
                 f"# reference: lmspec.vjp({op!r}, <args in float64>, kwargs, <cotangent in "
                 "float64>)"]
    else:
        body.append(f"# property {check} of {op} fails on these inputs (in {dtype})")
    return "\n".join(head + body)


# -- one call --------------------------------------------------------------------------

@dataclass
class OutputVerdict:
    """The verdict on one output array: ``tol`` is the absolute tolerance (the atol to
    use for exactly this call), ``k`` the reduction length, ``ratio`` = error / tol."""

    name: str
    ok: bool
    max_abs: float
    max_rel: float
    tol: float
    ratio: float
    k: int
    message: str = ""


@dataclass
class CloseVerdict:
    """:func:`assert_close`'s answer: one :class:`OutputVerdict` per output array."""

    op: str
    dtype: str
    outputs: list[OutputVerdict] = field(default_factory=list)
    policy: str = tolerance.POLICY

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def tolerances(self) -> dict[str, float]:
        """Output name → absolute tolerance."""
        return {o.name: o.tol for o in self.outputs}

    def __str__(self) -> str:
        rows = [f"{self.op} in {self.dtype}: {'conforms' if self.ok else 'does NOT conform'} "
                f"(u = {UNIT_ROUNDOFF[self.dtype]:.3g}; {self.policy})"]
        for o in self.outputs:
            rows.append(f"  {o.name}: max|err| {o.max_abs:.3g} (rel {o.max_rel:.3g}), tolerance "
                        f"{o.tol:.3g} (k={o.k}), ratio {o.ratio:.3g}"
                        + (f" — {o.message}" if o.message else ""))
        return "\n".join(rows)


def _numpy(x: Any) -> Any:
    """Arrays, tensors (torch, jax) and tuples of them as NumPy."""
    if isinstance(x, (tuple, list)):
        return tuple(_numpy(a) for a in x)
    if x is None or isinstance(x, (int, float, bool, str, np.ndarray, np.generic)):
        return x
    if hasattr(x, "detach"):  # a torch tensor
        from lmspec.backends.torch_backend import to_numpy

        return to_numpy(x)
    return np.asarray(x)


def _in_dtype(x: Any, dtype: str, name: str) -> Any:
    """Float arrays in ``dtype`` (a float array in another dtype is converted when that is
    exact, refused otherwise: the reference must run on the values the kernel saw)."""
    if isinstance(x, (tuple, list)):
        return tuple(_in_dtype(a, dtype, f"{name}[{i}]") for i, a in enumerate(x))
    if isinstance(x, np.ndarray) and (x.dtype.kind == "f" or x.dtype == DTYPES["bfloat16"]):
        if x.dtype == DTYPES[dtype]:
            return x
        y = x.astype(DTYPES[dtype])
        same = np.array_equal(y.astype(np.float64), x.astype(np.float64), equal_nan=True)
        if not same:
            raise ValueError(f"{name} is {x.dtype} and not exactly representable in {dtype}: "
                             f"pass the {dtype} values the kernel received")
        return y
    return x


def assert_close(op: str, args: Sequence[Any], kwargs: Mapping[str, Any] | None, actual: Any,
                 dtype: str) -> CloseVerdict:
    """Judge one call ``actual = kernel(*args, **kwargs)`` computed in ``dtype``.

    Per output array ``r`` (the float64 reference on ``args``), the tolerance is
    ``C_BASE·max|s − r| + C_FLOOR·√k·u_w·M + u_d·max|r|``
    (:mod:`lmspec.conformance.tolerance`): ``s`` the spec evaluated at the working
    precision ``w`` of ``dtype`` (float32 for float16/bfloat16, CONTRACT §6) and rounded
    to ``dtype``, ``k`` the op's reduction length for these inputs, ``M`` the largest of
    ``max|r|``, the op's declared input scale and the measured sensitivity of ``r`` to
    perturbing the inputs by ``u_w``; the last term, the output's own rounding, only for
    the half dtypes. Returns the
    :class:`CloseVerdict` (``.tolerances`` gives the atol of each output); raises
    ``AssertionError`` with it when an output is out of tolerance.
    """
    if op not in lmspec.OPS or op not in CASES:
        raise ValueError(f"unknown op {op!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    names = lmspec.OPS[op].params
    call_args = tuple(_in_dtype(_numpy(a), dtype, names[i] if i < len(names) else f"args[{i}]")
                      for i, a in enumerate(args))
    call = Call(call_args, {k: _in_dtype(_numpy(v), dtype, k) for k, v in (kwargs or {}).items()})
    oc = CASES[op]
    with np.errstate(all="ignore"):
        ref = harness.reference(op, call)
        base = harness.baseline(op, call, dtype)
        pert = harness.perturbed_reference(op, call, dtype)
        try:
            got = harness.output(_numpy(actual), f"{op}()")
        except harness.BackendError as exc:
            raise AssertionError(str(exc)) from None
        verdict = CloseVerdict(op, dtype)
        k = oc.k(call)
        scale = oc.scale(call, None) if oc.scale else None
        refs, gots = harness.named(ref, "out"), harness.named(got, "out")
        if len(refs) != len(gots):
            raise AssertionError(f"{op}() has {len(gots)} output arrays, but should have "
                                 f"{len(refs)}")
        bases = harness.named(base, "out") if base is not None else [(n, None) for n, _ in refs]
        per_eval = [harness.named(p, "out") for p in pert if p is not None]
        for i, ((name, r), (_, g), (_, s)) in enumerate(zip(refs, gots, bases)):
            if r is None or g is None:
                continue
            q = [pe[i][1] for pe in per_eval]
            ra, ga = np.asarray(r), np.asarray(g)
            if oc.compare is not None:
                ok, _, msg = oc.compare(call, ra, ga, dtype,
                                        lambda kk, m: tolerance.floor(dtype, kk, m))
                verdict.outputs.append(OutputVerdict(name, ok, 0.0, 0.0, 0.0, 0.0, k, msg))
                continue
            v = tolerance.compare(name, ga, ra, s, dtype, k, scale, perturbed=q)
            verdict.outputs.append(OutputVerdict(name, v.ok, v.max_abs, v.max_rel, v.tol,
                                                 v.ratio, k, v.message))
    if not verdict.ok:
        raise AssertionError(str(verdict))
    return verdict
