"""Malformed-argument fuzzing of every catalogue op and of ``lmspec.vjp`` (CONTRACT §1).

Bad input must raise a ``ValueError`` whose message names the op and the argument; nothing
else may escape (no ``TypeError``/``IndexError``/``OverflowError`` from NumPy, no runaway
allocation, no token sampled from NaN). The tests are generic over ``lmspec.OPS``: each
op's valid calls come from its conformance declaration (``lmspec.conformance.cases_*``),
or from its signature when its family declares none, so an op added to the catalogue is
fuzzed without touching this file. One argument (or two) of a valid call is replaced by a
malformed value of the same kind: wrong rank or shape, an empty or broadcastable axis,
a ragged nested list, a wrong dtype (int, bool, complex, object, str, a huge uint64),
NaN/±inf, huge or negative integers, ``None``, strings, wrong keyword types and ranges.
``lmspec.vjp`` gets malformed cotangents (``None``, a broadcastable or wrong shape, a
wrong structure or dtype), which must be refused by name, and malformed arguments.
"""

from __future__ import annotations

import importlib
import inspect
import math
import signal
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

import lmspec
from lmspec.conformance.declare import CASES, Call

for _fam in lmspec.FAMILIES:
    try:
        importlib.import_module(f"lmspec.conformance.cases_{_fam}")
    except ModuleNotFoundError as _e:  # a family without conformance declarations (yet)
        if _e.name != f"lmspec.conformance.cases_{_fam}":
            raise

FUZZ = settings(max_examples=25, derandomize=True, deadline=None, database=None,
                phases=(Phase.explicit, Phase.generate),
                suppress_health_check=list(HealthCheck))
"""Derandomized, and no shrinking: a failure reports the labelled example as drawn, which
names the argument and the malformation, and the whole file stays fast."""
TIME_LIMIT_S = 20
"""A single call that takes longer than this is a failure (runaway work or allocation)."""

Variant = tuple[str, Any]

# -- malformed values -----------------------------------------------------------------------

SCALARS: tuple[Variant, ...] = (
    ("None", None), ("str", "abc"), ("bytes", b"x"), ("int 2**70", 2**70),
    ("int -2**70", -(2**70)), ("int 10**9", 10**9), ("int -1", -1), ("int 0", 0), ("int 1", 1),
    ("float 0.5", 0.5), ("float -0.5", -0.5), ("nan", math.nan), ("inf", math.inf),
    ("-inf", -math.inf), ("True", True), ("complex", 1j), ("np.int64", np.int64(3)),
    ("np.float32 nan", np.float32("nan")), ("int array", np.array([1, 2])),
    ("0-d array", np.array(2)), ("list", [1]), ("empty tuple", ()), ("object", object()),
)
"""Replacements for a scalar option (``axis``, ``eps``, ``num_heads``, ``method``, …)."""

FOR_NONE: tuple[Variant, ...] = (
    ("bool [2]", np.ones(2, bool)), ("bool [2, 3]", np.ones((2, 3), bool)),
    ("bool [0]", np.zeros(0, bool)), ("float [2, 3]", np.ones((2, 3))),
    ("int [2, 3]", np.ones((2, 3), np.int64)), ("str", "abc"), ("True", True), ("int 1", 1),
    ("ragged", [[True], [True, False]]), ("empty tuple", ()),
)
"""Replacements for an argument that is ``None`` in the valid call (masks, ``W3``, …)."""


def _resized(a: np.ndarray, axis: int, n: int) -> np.ndarray:
    """``a`` with axis ``axis`` cut or cyclically extended to length ``n``."""
    if a.shape[axis] == 0:
        shape = list(a.shape)
        shape[axis] = n
        return np.ones(shape, a.dtype)
    return np.take(a, np.arange(n) % a.shape[axis], axis=axis)


def _ragged(a: np.ndarray) -> list:
    rows = a.tolist()
    if a.ndim == 1:
        return [*rows, [rows[0] if rows else 0, 1]]
    first = rows[0] if rows else []
    return [[*first, first[0] if first else 0], *rows[1:]] if a.shape[0] > 1 else [
        first, first[:-1]]


def _with_first(a: np.ndarray, value: Any, dtype: Any = None) -> np.ndarray:
    b = np.array(a, dtype=dtype or a.dtype)
    b.flat[0] = value
    return b


def _array_variants(a: np.ndarray) -> list[Variant]:
    made: list[tuple[str, Callable[[], Any]]] = [
        ("None", lambda: None), ("str", lambda: "abc"), ("float 1.5", lambda: 1.5),
        ("rank + 1", lambda: a[None]), ("nested list", a.tolist),
        ("complex", lambda: a.astype(np.complex128)), ("object", lambda: a.astype(object)),
        ("str array", lambda: a.astype(np.float64).astype(str))]
    if a.ndim:
        made += [("rank - 1", lambda: np.take(a, 0, axis=0) if a.shape[0] else
                  np.ones(a.shape[1:], a.dtype)), ("ragged list", lambda: _ragged(a))]
    if a.ndim >= 2:
        made.append(("last two axes swapped", lambda: np.swapaxes(a, -1, -2)))
    for ax in range(a.ndim):
        n = a.shape[ax]
        made += [(f"axis {ax} {label}", lambda ax=ax, m=m: _resized(a, ax, m))
                 for label, m in (("+ 1", n + 1), ("empty", 0), ("-> 1", 1), ("- 1", n - 1))
                 if m >= 0 and m != n]
    if a.dtype == np.bool_:
        made += [("int mask", lambda: a.astype(np.int64)),
                 ("float mask", lambda: a.astype(np.float64)),
                 ("all False", lambda: ~np.ones_like(a))]
    elif a.dtype.kind in "iu":
        made += [("as float", lambda: a.astype(np.float64)), ("as bool", lambda: a.astype(bool))]
        if a.size:
            made += [("id -1", lambda: _with_first(a, -1)),
                     ("id 2**62", lambda: _with_first(a, 2**62)),
                     ("id -2**62", lambda: _with_first(a, -(2**62))),
                     ("id max + 1", lambda: _with_first(a, int(a.max()) + 1)),
                     ("uint64 2**64 - 1", lambda: _with_first(a.astype(np.uint64), 2**64 - 1))]
    else:
        made += [("as int", lambda: np.nan_to_num(a.astype(np.float64)).astype(np.int64)),
                 ("as bool", lambda: a.astype(bool)), ("float16", lambda: a.astype(np.float16)),
                 ("bfloat16", lambda: a.astype(ml_dtypes.bfloat16)),
                 ("float32", lambda: a.astype(np.float32))]
        if a.size:
            made += [("nan", lambda: _with_first(a, np.nan)),
                     ("+inf", lambda: _with_first(a, np.inf)),
                     ("-inf", lambda: _with_first(a, -np.inf)),
                     ("all nan", lambda: np.full_like(a, np.nan)),
                     ("1e308", lambda: _with_first(a, 1e308, np.float64))]
    out: list[Variant] = []
    for label, make in made:
        try:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out.append((label, make()))
        except (TypeError, ValueError, OverflowError):  # not expressible for this dtype
            pass
    return out


def _tuple_variants(t: tuple) -> list[Variant]:
    out: list[Variant] = [("None", None), ("str", "abc"), ("empty tuple", ()),
                          ("dict", dict(enumerate(t)))]
    if t:
        out += [("drop last", t[:-1]), ("extra member", (*t, t[0])), ("first member", t[0])]
    for i, m in enumerate(t):
        out += [(f"[{i}] {label}", (*t[:i], mv, *t[i + 1:])) for label, mv in variants(m)]
    return out


def variants(value: Any) -> list[Variant]:
    """Malformed replacements for ``value`` (a few of them may happen to be valid)."""
    if isinstance(value, np.ndarray):
        return _array_variants(value)
    if isinstance(value, (tuple, list)):
        return _tuple_variants(tuple(value))
    if value is None:
        return list(FOR_NONE)
    return [(label, s) for label, s in SCALARS if not _same(s, value)]


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and not isinstance(a, np.ndarray) and a == b


# -- valid calls and mutated calls ----------------------------------------------------------

def _generic_call(op: str) -> Call:
    """A call built from the signature alone (for an op with no conformance declaration):
    defaults where the signature has them, a small float array elsewhere."""
    params = inspect.signature(lmspec.OPS[op].reference).parameters.values()
    return Call(tuple(np.ones((2, 3)) for p in params if p.default is inspect.Parameter.empty))


def valid_call(op: str) -> st.SearchStrategy[Call]:
    if op in CASES:
        return CASES[op].strategy("float64")
    return st.just(_generic_call(op))


def op_kwargs(op: str, call: Call) -> dict[str, Any]:
    kw = dict(call.kwargs)
    if "dtype" in lmspec.OPS[op].params:
        kw.setdefault("dtype", "float64")
    return kw


def slots(op: str, call: Call) -> list[int | str]:
    """Every argument of ``op``: positions of the call's ``args``, then names of the rest."""
    params = lmspec.OPS[op].params
    return [*range(len(call.args)), *params[len(call.args):]]


def current(op: str, call: Call, slot: int | str) -> Any:
    if isinstance(slot, int):
        return call.args[slot]
    kw = op_kwargs(op, call)
    if slot in kw:
        return kw[slot]
    return inspect.signature(lmspec.OPS[op].reference).parameters[slot].default


def replaced(op: str, call: Call, slot: int | str, value: Any) -> Call:
    if isinstance(slot, int):
        return Call((*call.args[:slot], value, *call.args[slot + 1:]), op_kwargs(op, call))
    return Call(call.args, {**op_kwargs(op, call), slot: value})


# -- outcomes -------------------------------------------------------------------------------

class _TooSlow(Exception):
    pass


@contextmanager
def time_limit(seconds: int = TIME_LIMIT_S) -> Iterator[None]:
    def _raise(signum: int, frame: Any) -> None:
        raise _TooSlow(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def is_clear(op: str, err: ValueError, names: Sequence[str]) -> bool:
    """The message starts with the op's name and names one of ``names``."""
    msg = str(err)
    return msg.startswith(f"{op}:") and any(n in msg for n in names)


def _arrays(x: Any) -> Iterator[np.ndarray]:
    if isinstance(x, (tuple, list)):
        for m in x:
            yield from _arrays(m)
    elif x is not None and not isinstance(x, (str, bytes, dict)):
        try:
            yield np.asarray(x)
        except (ValueError, TypeError):
            return


def _has_nan(x: Any) -> bool:
    for a in _arrays(x):
        if a.dtype.kind == "f" or a.dtype in lmspec.DTYPES.values():
            if np.isnan(a.astype(np.float64)).any():
                return True
    return False


def outcome(op: str, fn: Callable[[], Any], names: Sequence[str],
            inputs: Any = None) -> tuple[str, str]:
    """``(kind, detail)`` with kind ``result``, ``clear`` (a ValueError naming the op and one
    of ``names``), ``unclear`` (any other ValueError), ``nan-to-int`` (an integer result
    computed from a NaN input) or ``escape`` (any other exception)."""
    try:
        with time_limit(), np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # e.g. the mean of an empty row
            res = fn()
    except ValueError as e:
        return ("clear" if is_clear(op, e, names) else "unclear"), f"ValueError: {e}"
    except Exception as e:  # noqa: BLE001 - the point is to catch every other kind
        return "escape", f"{type(e).__name__}: {e}"
    ints = [a for a in _arrays(res) if a.dtype.kind in "iu"]
    if ints and _has_nan(inputs):
        return "nan-to-int", f"returned {ints[0]!r} from a NaN input"
    return "result", ""


def op_names(op: str) -> tuple[str, ...]:
    return lmspec.OPS[op].params


def conforms(cot: Any, out: Any) -> bool:
    """Whether ``cot`` is a well-formed cotangent for the output ``out``."""
    if isinstance(out, tuple):
        return (isinstance(cot, tuple) and len(cot) == len(out)
                and all(conforms(c, o) for c, o in zip(cot, out)))
    if cot is None or isinstance(cot, (tuple, list, str, bytes, dict)):
        return False
    try:
        c = np.asarray(cot)
    except (ValueError, TypeError):
        return False
    floatish = c.dtype.kind == "f" or c.dtype in lmspec.DTYPES.values()
    return floatish and c.shape == np.shape(out)


def grads_shaped_like(grads: Any, args: Sequence[Any]) -> bool:
    if not isinstance(grads, tuple) or len(grads) != len(args):
        return False
    for g, a in zip(grads, args):
        if g is None:
            continue
        if isinstance(a, (tuple, list)):
            if not grads_shaped_like(tuple(g), tuple(a)):
                return False
        elif np.shape(g) != np.shape(a):
            return False
    return True


# -- the tests ------------------------------------------------------------------------------

ALL_OPS = list(lmspec.OPS)
DIFF_OPS = [op for op in ALL_OPS if lmspec.OPS[op].vjp_rule is not None]


def _draw_mutation(data: Any, op: str, call: Call) -> tuple[Call, list[str]]:
    """One or two arguments of ``call`` replaced by malformed values."""
    labels = []
    for _ in range(data.draw(st.integers(1, 2), label="how many")):
        slot = data.draw(st.sampled_from(slots(op, call)), label="argument")
        label, value = data.draw(st.sampled_from(variants(current(op, call, slot))),
                                 label="variant")
        call = replaced(op, call, slot, value)
        labels.append(f"{slot}: {label}")
    return call, labels


def _pass(kind: str, detail: str, labels: Any) -> None:
    assert kind in ("result", "clear"), f"{labels}: {kind}: {detail}"


@pytest.mark.parametrize("op", ALL_OPS)
@FUZZ
@given(data=st.data())
def test_op_refuses_malformed_arguments_by_name(op, data):
    call, labels = _draw_mutation(data, op, data.draw(valid_call(op), label="valid call"))
    ref = lmspec.OPS[op].reference
    _pass(*outcome(op, lambda: ref(*call.args, **call.kwargs), op_names(op), call.args), labels)


@contextmanager
def sizes_from_zero() -> Iterator[None]:
    """Conformance declarations draw their sizes with ``draw.dim(lo, hi)``; inside this
    block every size may also be 0, so that all arrays sharing it are empty together."""
    from lmspec.conformance import draw as d

    orig = d.dim

    def dim(draw: Any, lo: int, hi: int, *, label: str) -> int:
        return orig(draw, 0, hi, label=label)

    d.dim = dim
    try:
        yield
    finally:
        d.dim = orig


def draw_with_empty_sizes(data: Any, op: str) -> Call:
    with sizes_from_zero():
        try:
            return data.draw(valid_call(op), label="call with sizes from 0")
        except Exception:  # noqa: BLE001 - the declaration cannot build such a call
            assume(False)
            raise


@pytest.mark.parametrize("op", ALL_OPS)
@FUZZ
@given(data=st.data())
def test_op_handles_empty_sizes(op, data):
    """Empty sizes either have a documented meaning (a result) or are refused by name; a
    differentiable op's vjp then does the same."""
    call = draw_with_empty_sizes(data, op)
    res: list[Any] = []
    ref = lmspec.OPS[op].reference
    kind, detail = outcome(op, lambda: res.append(ref(*call.args, **call.kwargs)), op_names(op))
    _pass(kind, detail, "sizes from 0")
    if kind == "result" and op in DIFF_OPS:
        out = res[0]
        cot = tuple(np.ones_like(o) for o in out) if isinstance(out, tuple) else np.ones_like(out)
        grads: list[Any] = []
        kind, detail = outcome(op, lambda: grads.append(
            lmspec.vjp(op, call.args, call.kwargs, cot)), op_names(op))
        assert kind == "result", f"vjp of a call whose forward worked: {kind} {detail}"
        assert grads_shaped_like(grads[0], call.args)


def cotangent_variants(out: Any) -> list[Variant]:
    """Cotangents for the output ``out``: mostly malformed, a few well-formed."""
    if isinstance(out, tuple):
        return _tuple_variants(out)
    a = np.asarray(out, dtype=np.float64)
    extra: list[Variant] = [("a 1-tuple", (a,)), ("ones", np.ones_like(a))]
    if a.ndim == 0:
        extra += [("python float", 1.0), ("python int", 1), ("[1]", np.ones(1)),
                  ("[1, 1]", np.ones((1, 1)))]
    return _array_variants(a) + extra


@pytest.mark.parametrize("op", DIFF_OPS)
@FUZZ
@given(data=st.data())
def test_vjp_checks_the_cotangent(op, data):
    call = data.draw(valid_call(op), label="valid call")
    with np.errstate(all="ignore"):
        out = lmspec.OPS[op].reference(*call.args, **call.kwargs)
    label, cot = data.draw(st.sampled_from(cotangent_variants(out)), label="cotangent")
    res: list[Any] = []

    def run() -> Any:
        res.append(lmspec.vjp(op, call.args, call.kwargs, cot))

    kind, detail = outcome(op, run, ("cotangent",))
    if conforms(cot, out):
        assert kind == "result", f"{label}: a well-formed cotangent was refused: {detail}"
        assert grads_shaped_like(res[0], call.args), f"{label}: gradients not shaped like args"
    else:
        assert kind == "clear", f"{label}: a malformed cotangent was not refused by name: " \
                                f"{kind} {detail}"


@pytest.mark.parametrize("op", DIFF_OPS)
@FUZZ
@given(data=st.data())
def test_vjp_refuses_malformed_arguments_by_name(op, data):
    valid = data.draw(valid_call(op), label="valid call")
    with np.errstate(all="ignore"):
        out = lmspec.OPS[op].reference(*valid.args, **valid.kwargs)
    cot = tuple(np.ones_like(o) for o in out) if isinstance(out, tuple) else np.ones_like(out)
    call, labels = _draw_mutation(data, op, valid)
    _pass(*outcome(op, lambda: lmspec.vjp(op, call.args, call.kwargs, cot),
                   (*op_names(op), "cotangent"), call.args), labels)


@pytest.mark.parametrize("bad", [
    dict(args=None), dict(args="abc"), dict(args=np.ones(3)), dict(kwargs="abc"),
    dict(kwargs={"no_such_option": 1}), dict(kwargs={"x": np.ones(3)}),
    dict(args=(np.ones(3),) * 9), dict(args=()),
], ids=lambda b: repr(b)[:40])
def test_vjp_refuses_a_malformed_call(bad):
    call = {"args": (np.ones(3),), "kwargs": {}, "cotangent": np.ones(3), **bad}
    with pytest.raises(ValueError, match=r"^softmax: "):
        lmspec.vjp("softmax", call["args"], call["kwargs"], call["cotangent"])


def test_vjp_refuses_unknown_and_non_differentiable_ops():
    with pytest.raises(ValueError, match="unknown op"):
        lmspec.vjp("no_such_op", (), {}, 1.0)
    with pytest.raises(ValueError, match="^sample_token: "):
        lmspec.vjp("sample_token", (np.zeros((1, 2)), np.zeros(1)), {}, 1.0)


@pytest.mark.parametrize("op, args, kwargs, name", [
    ("sinusoidal_positional_encoding", (10**9, 4), {}, "length"),
    ("sinusoidal_positional_encoding", (4, 2**40), {}, "d_model"),
    ("mlm_mask", (np.zeros((1, 2), np.int64), np.zeros((1, 2)), np.zeros((1, 2)),
                  np.zeros((1, 2), np.int64), 2**70), {}, "mask_token_id"),
    ("scaled_dot_product_attention", (np.ones((1, 1, 2**15, 1)), np.ones((1, 1, 2**14, 1)),
                                      np.ones((1, 1, 2**14, 1))), {}, "k"),
])
def test_allocation_guard(op, args, kwargs, name):
    """An op refuses work it would do on more than ``MAX_ELEMENTS`` elements up front."""
    with pytest.raises(ValueError, match=f"^{op}: argument '{name}"):
        lmspec.OPS[op].reference(*args, **kwargs)
