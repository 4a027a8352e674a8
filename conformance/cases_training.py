"""Conformance inputs and properties of the training family.

``mlm_mask`` and ``sample_token`` return integers. They conform by exact equality, except
where the decision is numerically ambiguous, and only there either neighbour is accepted
(and counted as ``ambiguous_examples``):

- ``mlm_mask``: the draws arrive exact in the dtype under test and the reference compares
  those very values with the real thresholds, so there is no rounding error in the
  comparison itself. The only ambiguity is the threshold: a backend computing in a low
  precision dtype compares with the threshold rounded to that dtype (torch does: float32
  ``0.9`` is 0.89999998). A draw equal to that rounded threshold (when the rounding is
  inexact) may therefore fall either way; in float64 nothing is ambiguous.
- ``sample_token``: probabilities, cumulative masses and their comparisons with ``u`` and
  ``top_p`` are rounded. Within ``ε = floor(k=V, M)`` of each other two probabilities may
  sort either way, a cumulative mass may sit on either side of ``u`` or ``top_p``, and a
  probability on either side of ``min_p ×`` the largest, with
  ``M = 1 + max|logits/T|·Σ_i p_i(1 − p_i)`` (rounding ``logits/T`` moves the
  probabilities by about that much, and not at all when ``p`` is one-hot); the accepted
  tokens are those some such reading selects.
  Greedy (``temperature = 0``) compares exact logits and is exact.

Low precision: ``distillation_loss`` draws only temperatures at which the log-probabilities
``ln softmax(x/T)`` fit in the dtype (:func:`_temperatures`; binds in float16 only), and
``grid_frequencies_match_filtered`` skips rows whose top-k/top-p cut is within the
forward check's tolerance of going the other way (:func:`_cut_ambiguity`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

from lmspec import training as tr
from lmspec._precision import DTYPES, UNIT_ROUNDOFF

from . import draw as d
from .conditioning import exponent_error, pnorm_rounding
from .declare import Call, Close, Holds, cases, prop
from .tolerance import floor

Tol = Callable[[int, float], float]


def _max_abs(*arrays: np.ndarray) -> float:
    vals = [np.abs(a.astype(np.float64)[np.isfinite(a)]).max(initial=0.0) for a in arrays]
    return float(max(vals, default=0.0))


def _cot_scale(cot) -> float:
    return 1.0 if cot is None else max(1.0, _max_abs(np.asarray(cot)))


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


# -- kl_divergence ------------------------------------------------------------------

@cases("kl_divergence", scale=lambda call, cot=None: _kl_scale(*call.args) * _cot_scale(cot))
@st.composite
def _kl(draw, dtype: str) -> Call:
    n, vocab = d.dim(draw, 1, 4, label="N"), d.length(draw, 1, 6, label="V")
    log_p = _np_log_softmax(d.logits(draw, "float64", (n, vocab), label="p logits"))
    log_q = _np_log_softmax(d.logits(draw, "float64", (n, vocab), label="q logits"))
    holes = draw(st.sampled_from(["none", "p = 0", "p = q = 0", "q = 0"]), label="zeros")
    if holes != "none":
        where = d.bools(draw, (n, vocab), label="zero positions")
        if holes != "q = 0":
            log_p = np.where(where, -np.inf, log_p)
        if holes != "p = 0":  # q = 0 only where p = exp(log_p) is 0 even in float64:
            # p > 0 = q makes KL = inf, and its gradient inf·cotangent, which turns NaN
            # whenever a backend's cotangent/N underflows; that case is in the unit tests
            log_q = np.where(where & (log_p < -746), -np.inf, log_q)
    return Call((d.as_dtype(log_p, dtype), d.as_dtype(log_q, dtype)))


def _kl_scale(log_p: np.ndarray, log_q: np.ndarray) -> float:
    """The terms summed, in magnitude: ``max_n Σ_v p·|ln p − ln q|`` (at least 1)."""
    lp, lq = log_p.astype(np.float64), log_q.astype(np.float64)
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        terms = np.where((p == 0) | ~np.isfinite(lq), 0.0, p * np.abs(lp - lq))
    return max(1.0, float(terms.sum(axis=1).max(initial=0.0)))


# -- distillation_loss ----------------------------------------------------------------

TEMPERATURES = (0.05, 0.5, 1.0, 2.0, 7.5, 40.0)


@st.composite
def _logit_pair(draw, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, vocab = d.dim(draw, 1, 4, label="N"), d.length(draw, 1, 6, label="V")
    s = d.logits(draw, dtype, (n, vocab), label="student_logits")
    t = d.logits(draw, dtype, (n, vocab), label="teacher_logits")
    return s, t, d.ints(draw, (n,), vocab, label="targets")


def _distill_scale(call: Call, cot=None) -> float:
    """Magnitude the rounding error grows with: ``ln p`` at temperature ``T`` is off by
    about ``u·max|logits|/T`` and the soft term multiplies it by ``T²``; the hard term's
    ``ln p`` by ``u·max|s|``."""
    s, t, _ = call.args
    temp, a = call.kwargs["temperature"], call.kwargs["alpha"]
    rs, rt, lv = _max_abs(s), _max_abs(t), math.log(s.shape[1])
    if cot is None:
        return a * (rs + lv) + (1 - a) * (temp * (rs + rt) + temp**2 * (1 + lv))
    return _cot_scale(cot) * (1 + rs + rt + temp * (1 + lv))


def _temperatures(dtype: str, *logits: np.ndarray) -> list[float]:
    """The temperatures ``T`` at which the logits' log-probabilities ``ln softmax(x/T)``,
    of magnitude up to ``(max x − min x)/T``, stay within half the dtype's range, as
    :func:`draw.logits` keeps the logits themselves. Beyond it (float16 only: a spread of
    3276 at ``T = 0.05``) the log-probabilities that the contract's formula and
    ``F.kl_div`` work with are not representable in the dtype, so no implementation in
    it can give the finite loss, and ``(1 − α)·T²·KL`` is ``0·∞`` = NaN even at α = 1."""
    spread = max(float(np.ptp(x.astype(np.float64), axis=-1).max(initial=0.0)) for x in logits)
    return [t for t in TEMPERATURES if spread / t <= d.FINITE_MAX[dtype] / 2]


@cases("distillation_loss", scale=_distill_scale)
@st.composite
def _distill(draw, dtype: str) -> Call:
    s, t, y = draw(_logit_pair(dtype))
    temp = draw(st.sampled_from(_temperatures(dtype, s, t)), label="temperature")
    alpha = draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]), label="alpha")
    return Call((s, t, y), {"temperature": temp, "alpha": alpha})


# -- clip_grad_norm -------------------------------------------------------------------

def _n_elements(call: Call) -> int:
    return max(1, sum(g.size for g in call.args[0]))


CLIP_REGIMES = ("normal", "zeros", "tiny", "one huge", "|g|³ out of range")


@cases("clip_grad_norm", k=_n_elements)
@st.composite
def _clip(draw, dtype: str) -> Call:
    count = d.dim(draw, 1, 3, label="number of arrays")
    shapes = [tuple(d.length(draw, 1, 4, label="size") for _ in range(d.dim(draw, 0, 2,
                                                                             label="ndim")))
              for _ in range(count)]
    regime = draw(st.sampled_from(CLIP_REGIMES), label="regime")
    lo, hi = {"tiny": (-1e-3, 1e-3), "zeros": (0.0, 0.0)}.get(regime, (-3.0, 3.0))
    info = ml_dtypes.finfo(DTYPES[dtype])
    smallest = float(info.tiny) ** (1 / 3) * 16  # below it |g|³ would underflow
    grads = [d.floats(draw, "float64", shp, lo, hi, label=f"grads[{i}]")
             for i, shp in enumerate(shapes)]
    grads = [np.where(np.abs(g) < smallest, 0.0, g) for g in grads]
    if regime == "one huge":  # |g|³ of the huge element stays finite in the dtype
        cube = min(float(info.max) ** (1 / 3) / 64, 1e30)
        i = draw(st.integers(0, count - 1), label="huge array")
        j = draw(st.integers(0, grads[i].size - 1), label="huge element")
        grads[i].reshape(-1)[j] = draw(st.sampled_from([cube, -cube, 1e3, -50.0]), label="huge")
    if regime == "|g|³ out of range":  # |g|² representable, |g|³ over- or underflows
        factor = draw(st.sampled_from([float(info.max) ** 0.5 / 64,
                                       float(info.tiny) ** 0.5 * 64]), label="factor")
        grads = [g * factor for g in grads]
    grads = tuple(d.as_dtype(g, dtype) for g in grads)
    norm_type = draw(st.sampled_from([2.0, 1.0, math.inf, 3.0]), label="norm_type")
    choice = draw(st.sampled_from(["fixed", "= total", "total / 2"]), label="max_norm kind")
    if choice == "fixed":
        max_norm = draw(st.sampled_from([0.0, 0.5, 1.0, 5.0, 1e4]), label="max_norm")
    else:
        total = float(tr.global_norm(tuple(g.astype(np.float64) for g in grads), norm_type))
        max_norm = total if choice == "= total" else total / 2
    return Call((grads,), {"max_norm": max_norm, "norm_type": norm_type})


# -- mlm_mask -------------------------------------------------------------------------

MLM_THRESHOLDS = (tr.MLM_MASK_BELOW, tr.MLM_RANDOM_BELOW)


def _near(x: float, dtype: str) -> list[float]:
    """``x`` rounded to ``dtype`` and that value's two neighbours in the dtype."""
    dt = DTYPES[dtype]
    r = np.asarray(x, dtype=np.float64).astype(dt)
    out = [r, np.nextafter(r, np.array(0.0, dt)), np.nextafter(r, np.array(1.0, dt))]
    return [float(a) for a in out]


@st.composite
def _draws(draw, dtype: str, shape, edges: list[float], label: str) -> np.ndarray:
    """Uniform draws in ``[0, 1)``, some of them on or next to the decision edges."""
    u = d.floats(draw, "float64", shape, 0.0, 1.0, label=label)
    special = [v for e in edges for v in _near(e, dtype)] + [0.0]
    how = draw(st.sampled_from(["none", "some", "all"]), label=f"{label} on edges")
    pick = {"none": np.zeros(shape, bool), "all": np.ones(shape, bool)}.get(how)
    if pick is None:
        pick = d.bools(draw, shape, label=f"{label} on an edge")
    edge = draw(st.lists(st.sampled_from(special), min_size=u.size, max_size=u.size),
                label=f"{label} edges")
    u = np.where(pick, np.reshape(edge, shape), u)
    return d.below_one(u, dtype)


@st.composite
def _mlm(draw, dtype: str) -> Call:
    b, t = d.dim(draw, 1, 3, label="B"), d.dim(draw, 1, 6, label="T")
    vocab = d.dim(draw, 2, 10, label="V")
    tokens = d.ints(draw, (b, t), vocab, label="tokens")
    prob = draw(st.sampled_from([0.15, 0.0, 0.5, 1.0, 0.3]), label="mask_prob")
    select_u = draw(_draws(dtype, (b, t), [prob], "select_u"))
    action_u = draw(_draws(dtype, (b, t), list(MLM_THRESHOLDS), "action_u"))
    random_tokens = d.ints(draw, (b, t), vocab, label="random_tokens")
    kind = draw(st.sampled_from(["none", "drawn", "nothing maskable"]), label="maskable kind")
    maskable = {"none": None, "nothing maskable": np.zeros((b, t), dtype=bool)}.get(kind)
    if kind == "drawn":
        maskable = d.bools(draw, (b, t), label="maskable")
    mask_id = draw(st.sampled_from([vocab, 0]), label="mask_token_id")
    return Call((tokens, select_u, action_u, random_tokens, mask_id, prob, maskable))


def _readings(x: np.ndarray, threshold: float, dtype: str) -> list[np.ndarray]:
    """``x < threshold`` as the reference decides it, and as a backend comparing with the
    threshold rounded to ``dtype`` decides it (they differ only at that rounded value)."""
    rounded = float(np.asarray(threshold).astype(DTYPES[dtype]))
    exact = x < threshold
    return [exact] if rounded == threshold else [exact, x < rounded]


def _mlm_outputs(call: Call, dtype: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every ``(inputs, labels)`` a reading of the three thresholds gives; the first is the
    reference's own."""
    tokens, select_u, action_u, random_tokens, mask_id, prob, maskable = call.args
    su, au = select_u.astype(np.float64), action_u.astype(np.float64)
    able = np.ones(tokens.shape, bool) if maskable is None else maskable
    out = []
    for sel in _readings(su, prob, dtype):
        for to_mask in _readings(au, MLM_THRESHOLDS[0], dtype):
            for to_random in _readings(au, MLM_THRESHOLDS[1], dtype):
                chosen = able & sel
                labels = np.where(chosen, tokens, tr.IGNORE)
                inputs = np.where(chosen & to_mask, mask_id,
                                  np.where(chosen & ~to_mask & to_random, random_tokens, tokens))
                out.append((inputs, labels))
    return out


def _positions(got: np.ndarray, options: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per position: matches the first option (the reference); matches some option."""
    exact = got == options[0]
    return exact, np.any([got == o for o in options], axis=0)


def _first_miss(name: str, got: np.ndarray, ref: np.ndarray, ok: np.ndarray) -> str:
    idx = tuple(int(i) for i in np.argwhere(~ok)[0])
    where = ",".join(map(str, idx))
    return f"{name}[{where}]={got[idx]}, but should be {ref[idx]}"


def compare_mlm_mask(call: Call, ref_out: np.ndarray, got_out: np.ndarray, dtype: str,
                     tol: Tol) -> tuple[bool, int, str]:
    """Exact, except at a draw equal to a threshold rounded to ``dtype`` (see the module
    docstring). Called once per output; which one is told by the reference array."""
    readings = _mlm_outputs(call, dtype)
    best: tuple[bool, int, str] | None = None
    for i, name in enumerate(("inputs", "labels")):
        if not np.array_equal(ref_out, readings[0][i]):
            continue
        exact, accepted = _positions(got_out, [r[i] for r in readings])
        verdict = (bool(accepted.all()), int(np.sum(accepted & ~exact)),
                   "" if accepted.all() else _first_miss(name, got_out, ref_out, accepted))
        if best is None or (verdict[0], -verdict[1]) > (best[0], -best[1]):
            best = verdict
    return best if best is not None else (False, 0, "the reference output is not mlm_mask's")


cases("mlm_mask", k=lambda call: 1, compare=compare_mlm_mask)(_mlm)


# -- sample_token ----------------------------------------------------------------------

MIN_P_EDGE = (0.9, 0.97, 1.03, 1.1)
"""Ratios ``p_1/(min_p·p_0)`` of the runner-up token in the min-p edge family: just
outside (below 1: dropped) and just inside (kept)."""


@st.composite
def _min_p_edge(draw, dtype: str, b: int) -> tuple[np.ndarray, dict]:
    """Rows at min-p's decision edge, with the top-k filter renormalising first: token 0
    has probability ``p_0``, token 1 ``r·min_p·p_0`` (``r`` in :data:`MIN_P_EDGE`) and the
    ``V − 2 ≥ 2`` others ``0.9·`` that each, cut by ``top_k = 2``, which leaves a mass
    ``Z < 1`` to renormalise. Whether token 1 survives depends on comparing with the largest
    *renormalised* probability (CONTRACT §6, 2026-11-29): taking the largest before the
    renormalisation keeps token 1 for every ratio ``r ≥ Z``. Token ids are permuted; the
    logits are scaled by the temperature so that ``logits/T`` keeps the ratios."""
    vocab = max(4, d.dim(draw, 4, 7, label="V (min-p edge)"))
    min_p = draw(st.sampled_from([0.3, 0.5, 0.8]), label="min_p (edge)")
    temp = draw(st.sampled_from([0.7, 1.0, 3.0]), label="temperature (edge)")
    rows = []
    for i in range(b):
        r = draw(st.sampled_from(MIN_P_EDGE), label=f"ratio to min_p, row {i}")
        z = np.full(vocab, math.log(0.9 * r * min_p))
        z[0], z[1] = 0.0, math.log(r * min_p)
        rows.append(z[np.array(draw(st.permutations(range(vocab)), label=f"ids, row {i}"))])
    x = d.as_dtype(np.array(rows) * temp + draw(st.sampled_from([0.0, 3.0, -40.0]),
                                                 label="common offset"), dtype)
    return x, {"temperature": temp, "top_k": 2, "top_p": 1.0, "min_p": min_p}


@st.composite
def _sample(draw, dtype: str) -> Call:
    """Logits of every regime over 1…7 tokens (sometimes past a tile) with every filter;
    in about one example in three, two or more rows at min-p's decision edge
    (:func:`_min_p_edge`)."""
    b = d.dim(draw, 1, 4, label="B")
    if draw(st.sampled_from([False, False, True]), label="min-p edge"):
        b = max(b, 2)
        x, kw = draw(_min_p_edge(dtype, b))
        temp, top_k, top_p, min_p = (kw[k] for k in ("temperature", "top_k", "top_p", "min_p"))
    else:
        vocab = d.length(draw, 1, 7, label="V")
        x = d.logits(draw, dtype, (b, vocab))
        temp = draw(st.sampled_from([0.0, 1e-3, 0.1, 0.7, 1.0, 3.0, 50.0]),
                    label="temperature")
        top_k = draw(st.sampled_from([0, 1, 2, vocab, vocab + 3]), label="top_k")
        top_p = draw(st.sampled_from([1.0, 0.0, 1e-3, 0.3, 0.5, 0.75, 0.9, 0.999]),
                     label="top_p")
        min_p = draw(st.sampled_from([0.0, 0.0, 0.05, 0.2, 0.3, 0.5, 1.0]), label="min_p")
    edges = []
    if temp > 0:  # u on the bin edges of the reference's own filtered distribution, and of
        # the one without min-p (where min-p's decision changes the outcome, both sides)
        _, ps = tr.sorted_probs(x.astype(np.float64), temp)
        edges = [e for mp in dict.fromkeys((min_p, 0.0))
                 for e in np.cumsum(tr.filter_sorted(ps, top_k, top_p, mp), axis=-1).ravel()]
    u = draw(_draws(dtype, (b,), [e for e in edges if e < 1], "u"))
    return Call((x, u), {"temperature": temp, "top_k": top_k, "top_p": top_p, "min_p": min_p})


def _scaled_max(call: Call) -> float:
    x, temp = call.args[0], call.kwargs["temperature"]
    return max(1.0, _max_abs(x) / temp) if temp > 0 else 1.0


def _probability_scale(row: np.ndarray, temperature: float) -> float:
    """``M`` for the error of the probabilities ``p = softmax(z)``, ``z = row/T``: rounding
    ``z`` and ``z − max z`` costs up to ``δ ≈ 2u·max|z|`` in each exponent, which moves
    ``p_i`` by at most ``2δ·p_i(1 − p_i)``, a cumulative mass by ``2δ·Σ_i p_i(1 − p_i)``
    (nothing for a one-hot ``p``, however large ``z``); plus ordinary rounding (1)."""
    _, ps = tr.sorted_probs(row[None].astype(np.float64), temperature)
    return 1.0 + _max_abs(row) / temperature * float(np.sum(ps * (1 - ps)))


def _rank_holders(x: np.ndarray, order: np.ndarray, block: np.ndarray, r: int) -> set[int]:
    """Tokens that may stand at rank ``r``: any of its run of near-tied probabilities,
    unless their logits are all equal (an exact tie, which ids order)."""
    run = order[block == block[r]]
    return {int(order[r])} if np.all(x[run] == x[run[0]]) else {int(t) for t in run}


def sample_candidates(x: np.ndarray, u: float, temperature: float, top_k: int, top_p: float,
                      eps: float, min_p: float = 0.0) -> set[int]:
    """Tokens some reading of the sampling rule selects when every comparison within
    ``eps`` (of probabilities with each other, of cumulative masses with ``u`` and
    ``top_p``, of probabilities with ``min_p ×`` the largest) may go either way; equal
    logits stay in id order. ``x`` is one row of logits."""
    order, ps = tr.sorted_probs(x[None].astype(np.float64), temperature)
    order, ps = order[0], ps[0]
    vocab = ps.size
    block = np.concatenate([[0], np.cumsum(-np.diff(ps) > eps)])  # near-tied runs
    m_k = min(top_k or vocab, vocab)
    mass = np.concatenate([[0.0], np.cumsum(ps[:m_k])])
    frac = mass / mass[m_k]
    lengths = [m_k] if top_p >= 1 else [
        m for m in range(1, m_k + 1)
        if (m == 1 or frac[m - 1] < top_p + eps) and (m == m_k or frac[m] >= top_p - eps)]
    found: set[int] = set()
    if min_p > 0:  # min-p keeps a prefix too: the ranks with p ≥ min_p × the largest
        lengths = [m2 for m in lengths for m2 in range(1, m + 1)
                   if (m2 == 1 or ps[m2 - 1] >= min_p * ps[0] - eps)
                   and (m2 == m or ps[m2] < min_p * ps[0] + eps)]
    for m in lengths:
        cum = mass[: m + 1] / mass[m]
        for r in range(1, m + 1):
            if cum[r - 1] <= u + eps and cum[r] > u - eps:
                found |= _rank_holders(x, order, block, r - 1)
    return found


def compare_sample_token(call: Call, ref_out: np.ndarray, got_out: np.ndarray, dtype: str,
                         tol: Tol) -> tuple[bool, int, str]:
    """Exact, except for rows whose decision is within the tolerance of a tie, of ``u`` or
    of ``top_p`` (see the module docstring)."""
    x, u = call.args
    temp, top_k, top_p = (call.kwargs[k] for k in ("temperature", "top_k", "top_p"))
    min_p = call.kwargs.get("min_p", 0.0)
    ambiguous = 0
    for b in np.flatnonzero(got_out != ref_out):
        if temp == 0 or int(got_out[b]) not in sample_candidates(
                x[b], float(u[b]), temp, top_k, top_p,
                tol(x.shape[1], _probability_scale(x[b], temp)), min_p):
            return False, ambiguous, f"ids[{b}]={got_out[b]}, but should be {ref_out[b]}"
        ambiguous += 1
    return True, ambiguous, ""


cases("sample_token", k=lambda call: call.args[0].shape[1], compare=compare_sample_token)(_sample)


# -- properties ------------------------------------------------------------------------

@prop("distillation_loss")
def alpha_one_is_cross_entropy(run, call: Call, dtype: str):
    """With α = 1 the distillation loss is the cross-entropy with the hard targets."""
    s, t, y = call.args
    got = run("distillation_loss", s, t, y, temperature=call.kwargs["temperature"], alpha=1.0)
    yield Close("distillation(α=1) = CE(student, targets)", got, run("cross_entropy", s, y),
                k=s.shape[1], scale=max(1.0, _max_abs(s)))


@prop("distillation_loss")
def same_teacher_has_no_soft_loss(run, call: Call, dtype: str):
    """A student identical to its teacher has no KL term: the loss is α·CE."""
    s, _, y = call.args
    temp, a = call.kwargs["temperature"], call.kwargs["alpha"]
    got = run("distillation_loss", s, s, y, temperature=temp, alpha=a)
    yield Close("distillation(s, s) = α·CE(s)", got, a * run("cross_entropy", s, y),
                k=s.shape[1], scale=_distill_scale(Call((s, s, y), call.kwargs)))


@st.composite
def _two_distributions(draw, dtype: str):
    n, vocab = d.dim(draw, 1, 4, label="N"), d.dim(draw, 1, 6, label="V")
    return tuple(d.as_dtype(_np_log_softmax(d.logits(draw, "float64", (n, vocab), label=w)),
                            dtype) for w in ("p logits", "q logits"))


@prop("kl_divergence", strategy=_two_distributions)
def nonnegative(run, drawn, dtype: str):
    """KL(p ‖ q) ≥ 0 for distributions p, q (Gibbs' inequality), up to rounding."""
    log_p, log_q = drawn
    kl = run("kl_divergence", log_p, log_q)
    yield Close("min(KL, 0) = 0", np.minimum(kl, 0.0), 0.0, k=log_p.shape[1],
                scale=_kl_scale(log_p, log_q))


def _flat(arrays) -> np.ndarray:
    return np.concatenate([np.ravel(a).astype(np.float64) for a in arrays] + [np.zeros(0)])


@prop("clip_grad_norm")
def clipped_norm_at_most_max_norm(run, call: Call, dtype: str):
    """After clipping, the global norm of all arrays together is ≤ max_norm (when the
    input norm is nonzero)."""
    grads = call.args[0]
    (clipped, _), p = run("clip_grad_norm", grads, **call.kwargs), call.kwargs["norm_type"]
    if not np.any(_flat(grads)):
        return
    # the spec's own scaled norm m·‖g/m‖_p: the literal (Σ|g|^p)^(1/p) of np.linalg.norm
    # overflows for |g| ≈ 1e152 and p = 3 in float64, failing a correct implementation
    after = float(tr.global_norm((_flat(clipped),), p))
    limit = call.kwargs["max_norm"]
    # the literal S^fl(1/p) of the backend's norm (conformance.conditioning); this one's
    # power sum lies in [1, n], so its exponent's rounding costs at most δ·ln n
    rho = pnorm_rounding(grads, p, dtype) + exponent_error(p, "float64") * math.log(
        _n_elements(call))
    yield Close("max(‖clipped‖ − max_norm, 0) = 0", max(after - limit, 0.0), 0.0,
                k=_n_elements(call), scale=max(1.0, limit) + limit * rho / UNIT_ROUNDOFF[dtype])


@prop("clip_grad_norm")
def one_common_factor(run, call: Call, dtype: str):
    """Clipping scales every array by one common factor c ∈ [0, 1]: the direction of the
    whole gradient is unchanged (c estimated from the largest element)."""
    grads = call.args[0]
    clipped, _ = run("clip_grad_norm", grads, **call.kwargs)
    g, out = _flat(grads), _flat(clipped)
    if not np.any(g):
        yield Holds("zero gradients stay zero", not np.any(out), f"got {out.tolist()}")
        return
    j = int(np.argmax(np.abs(g)))
    c = out[j] / g[j]
    yield Holds("0 ≤ c ≤ 1", 0.0 <= c <= 1.0 + 4 * UNIT_ROUNDOFF[dtype], f"c = {c!r}")
    yield Close("clipped = c·g", out, c * g, k=_n_elements(call), scale=max(1.0, _max_abs(g)))


@prop("mlm_mask")
def changes_only_selected(run, call: Call, dtype: str):
    """Only selected positions change, labels are −100 exactly where a position is not
    selected and the original token where it is; selection follows maskable and
    ``select_u < mask_prob`` (a draw on the threshold rounded to the dtype may go either
    way)."""
    tokens, select_u, _, _, _, prob, maskable = call.args
    inputs, labels = run("mlm_mask", *call.args)
    chosen = labels != tr.IGNORE
    yield Holds("unselected inputs unchanged", bool(np.all((inputs == tokens) | chosen)))
    yield Holds("labels = tokens where selected", bool(np.all((labels == tokens) | ~chosen)))
    readings = _readings(select_u.astype(np.float64), prob, dtype)
    able = np.ones(tokens.shape, bool) if maskable is None else maskable
    must, may = able & np.all(readings, axis=0), able & np.any(readings, axis=0)
    yield Holds("selected = maskable ∧ select_u < mask_prob",
                bool(np.all(chosen[must]) and not np.any(chosen & ~may)),
                f"labels {labels.tolist()}")


@prop("sample_token")
def top_k_one_is_greedy(run, call: Call, dtype: str):
    """top_k = 1 gives the greedy token (temperature 0), whatever u and top_p are; the
    two may differ only between logits equal up to rounding at that temperature."""
    x, u = call.args
    temp = call.kwargs["temperature"] or 1.0
    top1 = run("sample_token", x, u, temperature=temp, top_k=1, top_p=call.kwargs["top_p"])
    greedy = run("sample_token", x, u, temperature=0.0)
    rows = np.arange(x.shape[0])
    gap = np.abs(x[rows, greedy].astype(np.float64) - x[rows, top1].astype(np.float64)) / temp
    ok = (top1 == greedy) | (gap <= 4 * UNIT_ROUNDOFF[dtype] * _scaled_max(call))
    yield Holds("sample(top_k=1) = greedy", bool(ok.all()),
                f"top_k=1 gave {top1.tolist()}, greedy {greedy.tolist()}")


GRID = 256


@st.composite
def _one_row(draw, dtype: str) -> Call:
    vocab = d.dim(draw, 1, 6, label="V")
    x = d.logits(draw, dtype, (1, vocab), regimes=("normal", "ties", "tiny"))
    temp = draw(st.sampled_from([0.5, 1.0, 3.0]), label="temperature")
    top_k = draw(st.sampled_from([0, 1, 2, vocab + 1]), label="top_k")
    top_p = draw(st.sampled_from([1.0, 0.0, 0.3, 0.75, 0.95]), label="top_p")
    return Call((x,), {"temperature": temp, "top_k": top_k, "top_p": top_p})


def _cut_ambiguity(x: np.ndarray, p: np.ndarray, ranked: list[int], cuts: list[int],
                   top_p: float, mass: np.ndarray) -> float:
    """How far the filter's decisions are from going the other way: the smallest
    probability gap between a token kept and one dropped at each cut of the sorted order
    ``ranked`` (none between equal logits, which ids order exactly in any dtype), and the
    distance of the prefix masses from ``top_p``."""
    gaps = [p[i] - p[j] for c in cuts for i in ranked[:c] for j in ranked[c:] if x[i] != x[j]]
    if top_p < 1:
        gaps.append(float(np.min(np.abs(mass - top_p))))
    return float(min(gaps, default=math.inf))


def _filtered_np(x: np.ndarray, temp: float, top_k: int, top_p: float) -> tuple[np.ndarray, float]:
    """The filtered distribution of ``sample_token``'s docstring, in plain NumPy (sorted by
    Python's stable sort), and the margin of its decisions (:func:`_cut_ambiguity`)."""
    z = x.astype(np.float64) / temp
    p = np.exp(z - z.max())
    p /= p.sum()
    ranked = sorted(range(p.size), key=lambda i: -p[i])
    order = ranked[: top_k or p.size]
    mass = np.cumsum(p[order]) / p[order].sum()
    keep = order if top_p >= 1 else order[: int(np.searchsorted(mass, top_p)) + 1]
    q = np.zeros_like(p)
    q[keep] = p[keep] / p[keep].sum()
    return q, _cut_ambiguity(x, p, ranked, [len(order), len(keep)], top_p, mass)


@prop("sample_token", strategy=_one_row)
def grid_frequencies_match_filtered(run, call: Call, dtype: str):
    """Sampling one row at the midpoints of a grid of G values of u gives every token a
    count within 1 (+ rounding at the bin edges) of G times its filtered probability.
    Rows where the filter's choice is itself within rounding (two probabilities across
    the top-k or top-p cut, or a prefix mass and ``top_p``, closer than the tolerance
    ``floor(k=V, M)`` of the forward check) are not meaningful and are skipped."""
    (x,), kw = call.args, call.kwargs
    q, margin = _filtered_np(x[0], kw["temperature"], kw["top_k"], kw["top_p"])
    eps = floor(dtype, x.shape[1], _probability_scale(x[0], kw["temperature"]))
    if margin <= eps:  # the filter's decision is ambiguous in this dtype
        return
    u = d.below_one((np.arange(GRID) + 0.5) / GRID, dtype)
    ids = run("sample_token", np.repeat(x, GRID, axis=0), u, **kw)
    counts = np.bincount(ids, minlength=x.shape[1])
    slack = 1 + GRID * 16 * UNIT_ROUNDOFF[dtype] * max(1.0, _max_abs(x) / kw["temperature"])
    worst = float(np.max(np.abs(counts - GRID * q)))
    yield Holds(f"|count − {GRID}·q| ≤ 1", worst <= slack,
                f"counts {counts.tolist()}, expected {(GRID * q).round(2).tolist()}")


@prop("sample_token")
def min_p_zero_changes_nothing(run, call: Call, dtype: str):
    """min_p = 0 keeps every token the other filters kept: the ids equal those of the same
    call without min_p."""
    kw = {k: val for k, val in call.kwargs.items() if k != "min_p"}
    with_zero = run("sample_token", *call.args, **kw, min_p=0.0)
    without = run("sample_token", *call.args, **kw)
    yield Holds("sample(min_p=0) = sample()", bool(np.array_equal(with_zero, without)),
                f"min_p=0 gave {with_zero.tolist()}, without min_p {without.tolist()}")
