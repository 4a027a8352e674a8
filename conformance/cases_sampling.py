"""Conformance inputs and properties of the sampling family.

- ``sampling_probs`` is compared as floats (the tolerance policy, with the probability
  scale ``M`` of ``sample_token``'s cases). Its inputs keep every filter decision (the
  top-k cut, the top-p prefix, the min-p threshold) farther than the forward tolerance
  from going the other way: within it, a backend rounding differently keeps a different
  set of tokens, which no tolerance on the values can judge (exact ties of logits stay:
  ids order them exactly in every dtype).
- ``speculative_accept`` returns integers and conforms exactly, except where a comparison
  (``u·q`` with ``p``, a cumulative mass with ``u``) is within ``ε = floor(k=V, 1)`` of
  going the other way; there every reading is accepted (``ambiguous_examples``).
- The samplers with their own random numbers are judged statistically
  (:mod:`lmspec.conformance.statistical`): ``draws_fit`` (``draw_tokens`` against
  ``sampling_probs``), and ``draws_fit_target``, ``first_token_is_target``,
  ``accepted_count_closed_form`` (``draw_speculative``).
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

import lmspec
from lmspec import training as tr

from . import draw as d
from . import statistical as stat
from .cases_training import _probability_scale
from .declare import Call, Holds, cases, prop
from .tolerance import floor

# -- sampling_probs --------------------------------------------------------------------


def decision_margin(x: np.ndarray, temp: float, top_k: int, top_p: float,
                    min_p: float) -> float:
    """How far the filters' decisions on one row are from going the other way: at each cut
    (top-k, top-p, min-p) the smallest probability gap between a kept and a dropped token
    (none between equal logits, which ids order exactly in every dtype), the distance of
    every prefix mass from ``top_p``, and of every kept probability from ``min_p ×`` the
    largest."""
    if temp == 0:
        return math.inf
    order, ps = tr.sorted_probs(x[None].astype(np.float64), temp)
    order, ps = order[0], ps[0]
    xs, vocab, gaps = x.astype(np.float64)[order], ps.size, [math.inf]
    k = min(top_k or vocab, vocab)
    kept = np.where(np.arange(vocab) < k, ps, 0.0)
    kept = kept / kept.sum()
    after_p = tr.filter_sorted(ps[None], top_k, top_p)[0]
    after_m = tr.filter_sorted(ps[None], top_k, top_p, min_p)[0]
    if top_p < 1:
        gaps.append(float(np.min(np.abs(np.cumsum(kept)[:k] - top_p))))
    if min_p > 0:
        live = after_p > 0
        gaps.append(float(np.min(np.abs(after_p[live] - min_p * after_p[0]))))
    for cut in {k, int(np.sum(after_p > 0)), int(np.sum(after_m > 0))}:
        differ = xs[:cut, None] != xs[None, cut:]
        if cut < vocab and differ.any():
            gaps.append(float(np.min((ps[:cut, None] - ps[None, cut:])[differ])))
    return float(min(gaps))


def _unambiguous(draw, x: np.ndarray, kw: dict, dtype: str, slack: float = 0.0) -> None:
    for row in x:
        eps = floor(dtype, x.shape[1], _probability_scale(row, kw["temperature"] or 1.0))
        assume(decision_margin(row, kw["temperature"], kw["top_k"], kw["top_p"],
                               kw["min_p"]) > max(eps, slack))


@st.composite
def _probs_call(draw, dtype: str) -> Call:
    b, vocab = d.dim(draw, 1, 4, label="B"), d.dim(draw, 1, 7, label="V")
    x = d.logits(draw, dtype, (b, vocab))
    kw = {"temperature": draw(st.sampled_from([0.0, 0.1, 0.7, 1.0, 3.0]), label="temperature"),
          "top_k": draw(st.sampled_from([0, 1, 2, vocab, vocab + 3]), label="top_k"),
          "top_p": draw(st.sampled_from([1.0, 0.0, 0.3, 0.5, 0.9]), label="top_p"),
          "min_p": draw(st.sampled_from([0.0, 0.0, 0.05, 0.3, 1.0]), label="min_p")}
    _unambiguous(draw, x, kw, dtype)
    return Call((x,), kw)


def _probs_scale(call: Call, cot) -> float:
    x, temp = call.args[0], call.kwargs["temperature"]
    return 1.0 if temp == 0 else max(_probability_scale(row, temp) for row in x)


cases("sampling_probs", scale=_probs_scale)(_probs_call)


# -- speculative_accept ----------------------------------------------------------------

def _distribution(draw, shape, label: str,
                  regimes: tuple[str, ...] = ("normal", "ties", "large")) -> np.ndarray:
    z = d.logits(draw, "float64", shape, label=label, regimes=regimes)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


NEAR_RATIO = 1 - 0.75 * 2.0**-9
"""``p/q`` of a nearly equal draft: bfloat16 rounds it to 1 (always accept)."""


DRAFTS = ("independent", "equal", "near", "near", "sparse")


def _draft(draw, p: np.ndarray, kind: str) -> np.ndarray:
    """Draft probabilities for targets ``p[B, K, V]``: independent, equal, nearly equal
    (each ratio ``p/q`` within 2⁻⁹ of 1: where bfloat16 rounding decides acceptance), or
    independent with some tokens impossible (``kind``, one of :data:`DRAFTS`)."""
    if kind == "equal":
        return p.copy()
    if kind == "near":  # p/q = 1 − 0.75·2⁻⁹ off the most likely token, > 1 on it
        top = p == p.max(axis=-1, keepdims=True)
        up = np.where(top, 0.0, p).sum(axis=-1, keepdims=True) * (1 / NEAR_RATIO - 1)
        return np.where(top, p * (1 - up / np.where(top, p, 0).sum(-1, keepdims=True)),
                        p / NEAR_RATIO)
    q = _distribution(draw, p.shape, "draft logits")
    if kind == "sparse":
        q = np.where(d.bools(draw, q.shape, label="impossible") & (q < q.max(-1, keepdims=True)),
                     0.0, q)
        q = q / q.sum(axis=-1, keepdims=True)
    return q


def _as_probs(p: np.ndarray, dtype: str) -> np.ndarray:
    return d.as_dtype(p, dtype)


@st.composite
def _speculative_call(draw, dtype: str) -> Call:
    b, k, vocab = (d.dim(draw, 1, 3, label="B"), d.dim(draw, 0, 3, label="K"),
                   d.dim(draw, 2, 6, label="V"))
    p = _as_probs(_distribution(draw, (b, k + 1, vocab), "target logits"), dtype)
    kind = draw(st.sampled_from(DRAFTS), label="draft")
    q = _as_probs(_draft(draw, p[:, :k].astype(np.float64), kind), dtype)
    ids = d.ints(draw, (b, k), vocab, label="draft_ids")
    au = d.below_one(d.floats(draw, "float64", (b, k), 0.0, 1.0, label="accept_u"), dtype)
    if k and draw(st.booleans(), label="accept_u on the edge"):  # u·q = p where it can be
        rows, cols = np.indices((b, k))
        pq = p[rows, cols, ids].astype(np.float64) / np.maximum(
            q[rows, cols, ids].astype(np.float64), 1e-300)
        au = np.where(pq < 1, d.below_one(pq, dtype), au).astype(au.dtype)
    ru = d.below_one(d.floats(draw, "float64", (b,), 0.0, 1.0, label="resample_u"), dtype)
    return Call((p, q, ids, au, ru))


def _draw_candidates(w: np.ndarray, u: float, eps: float) -> set[int]:
    cum = np.cumsum(w) / w.sum()
    before = cum - w / w.sum()
    return {int(i) for i in np.flatnonzero((w > 0) & (before <= u + eps) & (cum > u - eps))}


def chain_candidates(p: np.ndarray, q: np.ndarray, ids: np.ndarray, au: np.ndarray,
                     ru: float, eps: float) -> set[tuple[int, ...]]:
    """Every output row of the chain rule some reading within ``eps`` gives (each
    acceptance ``u·q < p``, each cumulative mass against ``u``, an all-zero residual)."""
    kk = q.shape[0]
    found: set[tuple[int, ...]] = set()

    def drawn(prefix: list[int], weights: list[np.ndarray]) -> None:
        for w in weights:
            for t in _draw_candidates(w, ru, eps):
                found.add(tuple(prefix + [t] + [-1] * (kk - len(prefix))))

    def walk(k: int, prefix: list[int]) -> None:
        if k == kk:
            drawn(prefix, [p[kk]])
            return
        x = int(ids[k])
        margin = au[k] * q[k, x] - p[k, x]
        if q[k, x] > 0 and margin < eps:
            walk(k + 1, prefix + [x])
        if q[k, x] <= 0 or margin > -eps:
            r = np.maximum(p[k] - q[k], 0.0)
            drawn(prefix, ([r] if r.max() > 0 else []) + ([p[k]] if r.max() <= eps else []))

    walk(0, [])
    return found


def compare_speculative(call: Call, ref_out, got_out, dtype: str, tol) -> tuple[bool, int, str]:
    """Exact, except rows where a decision is within ``floor(k=V, 1)`` of its threshold:
    there any output row some reading gives is accepted (``ids``), and its count of
    accepted drafts (``n_accepted``)."""
    p, q, au, ru = (np.asarray(call.args[i]).astype(np.float64) for i in (0, 1, 3, 4))
    ids = np.asarray(call.args[2]).astype(np.int64)
    got = np.asarray(got_out)
    ambiguous = 0
    for b in np.flatnonzero((got != ref_out).reshape(len(got), -1).any(axis=1)):
        cands = chain_candidates(p[b], q[b], ids[b], au[b], ru[b], tol(p.shape[-1], 1.0))
        ok = (tuple(int(t) for t in got[b]) in cands if got.ndim == 2 else
              int(got[b]) in {sum(t != -1 for t in c) - 1 for c in cands})
        if not ok:
            name = "ids" if got.ndim == 2 else "n_accepted"
            return False, ambiguous, (f"{name}[{b}] = {got[b].tolist()}, but should be "
                                      f"{ref_out[b].tolist()}")
        ambiguous += 1
    return True, ambiguous, ""


cases("speculative_accept", k=lambda call: call.args[0].shape[-1],
      compare=compare_speculative)(_speculative_call)


@prop("speculative_accept")
def accepted_count_matches_ids(run, call: Call, dtype: str):
    """``n_accepted`` counts the accepted drafts: ``ids`` holds exactly ``n_accepted + 1``
    tokens, the first ``n_accepted`` of them the drafts themselves."""
    ids, n = run("speculative_accept", *call.args)
    k = call.args[2].shape[1]
    tokens = np.sum(ids != -1, axis=1)
    prefix = [bool(np.all(ids[b, :n[b]] == call.args[2][b, :n[b]])) for b in range(ids.shape[0])]
    yield Holds("n_accepted + 1 tokens, then −1", bool(np.all(tokens == n + 1)) and bool(
        np.all((n >= 0) & (n <= k))), f"ids {ids.tolist()}, n_accepted {n.tolist()}")
    yield Holds("the accepted tokens are the drafts", all(prefix), f"ids {ids.tolist()}")


@st.composite
def _same_draft(draw, dtype: str) -> Call:
    b, k, vocab = d.dim(draw, 1, 3, label="B"), d.dim(draw, 1, 3, label="K"), d.dim(
        draw, 2, 6, label="V")
    p = _as_probs(_distribution(draw, (b, k + 1, vocab), "target logits"), dtype)
    ids = d.ints(draw, (b, k), vocab, label="draft_ids")
    rows, cols = np.indices((b, k))
    ids = np.where(p[rows, cols, ids] > 0, ids, np.argmax(p[:, :k], axis=-1))
    au = d.as_dtype(d.floats(draw, "float64", (b, k), 0.0, 0.99, label="accept_u"), dtype)
    ru = d.below_one(d.floats(draw, "float64", (b,), 0.0, 1.0, label="resample_u"), dtype)
    return Call((p, p[:, :k].copy(), ids, au, ru))


@prop("speculative_accept", strategy=_same_draft)
def accepts_all_when_draft_is_target(run, call: Call, dtype: str):
    """A draft distribution equal to the target accepts every draft it can propose
    (``u·q < q`` for ``q > 0``; ``u ≤ 0.99`` keeps this clear of rounding)."""
    _, n = run("speculative_accept", *call.args)
    k = call.args[1].shape[1]
    yield Holds("n_accepted = K", bool(np.all(n == k)), f"n_accepted {n.tolist()}, K = {k}")


@st.composite
def _disjoint(draw, dtype: str) -> Call:
    b, k, vocab = d.dim(draw, 1, 3, label="B"), d.dim(draw, 1, 3, label="K"), d.dim(
        draw, 2, 6, label="V")
    split = d.dim(draw, 1, vocab - 1, label="split")
    p = np.zeros((b, k + 1, vocab))
    q = np.zeros((b, k, vocab))
    p[..., :split] = _distribution(draw, (b, k + 1, split), "target logits")
    q[..., split:] = _distribution(draw, (b, k, vocab - split), "draft logits")
    p, q = _as_probs(p, dtype), _as_probs(q, dtype)
    ids = d.ints(draw, (b, k), vocab - split, label="draft_ids") + split
    au = d.below_one(d.floats(draw, "float64", (b, k), 0.0, 1.0, label="accept_u"), dtype)
    ru = d.below_one(d.floats(draw, "float64", (b,), 0.0, 1.0, label="resample_u"), dtype)
    return Call((p, q, ids, au, ru), {"split": split})


@prop("speculative_accept", strategy=_disjoint)
def accepts_none_when_supports_disjoint(run, call: Call, dtype: str):
    """A draft whose support is disjoint from the target's is never accepted, and the
    token drawn instead comes from the target's support (the residual is ``p``)."""
    ids, n = run("speculative_accept", *call.args)
    split = call.kwargs["split"]
    yield Holds("n_accepted = 0", bool(np.all(n == 0)), f"n_accepted {n.tolist()}")
    yield Holds("ids[:, 0] in the target's support", bool(np.all((ids[:, 0] >= 0) & (
        ids[:, 0] < split))), f"ids {ids.tolist()}, target support [0, {split})")

# -- samplers with their own random numbers: judged statistically ------------------------

FOCUS = ("min_p", "top_k+top_p", "top_p", "top_k", "mixed")
"""Which filters an example of ``draws_fit`` exercises: one at a time (where the documented
alternatives of that filter change the distribution), or any mixture."""


@st.composite
def _draw_call(draw, dtype: str) -> Call:
    b, vocab = d.dim(draw, 1, 3, label="B"), d.dim(draw, 2, 10, label="V")
    x = d.logits(draw, dtype, (b, vocab), regimes=("normal", "normal", "normal", "ties", "tiny"))
    if b > 1 and draw(st.booleans(), label="a repeated row"):
        x[-1] = x[0]
    focus = draw(st.sampled_from(FOCUS), label="focus")
    temps = [0.5, 2.0, 0.3, 3.0] + ([1.0, 0.0] if focus == "mixed" else [])
    kw = {"temperature": draw(st.sampled_from(temps), label="temperature"),
          "top_k": draw(st.sampled_from([2, 3, 4, vocab - 1] + [0, 1] * (focus == "mixed"))
                        if focus in ("top_k", "top_k+top_p", "mixed") else st.just(0),
                        label="top_k"),
          "top_p": draw(st.sampled_from([0.5, 0.7, 0.8, 0.9, 0.6, 0.95] + [1.0] * (
                            focus == "mixed"))
                        if focus in ("top_p", "top_k+top_p", "mixed") else st.just(1.0),
                        label="top_p"),
          "min_p": draw(st.sampled_from([0.2, 0.3, 0.5] + [0.0] * (focus == "mixed"))
                        if focus in ("min_p", "mixed") else st.just(0.0), label="min_p")}
    if focus == "top_k+top_p" and draw(st.booleans(), label="top_p where renormalising matters"):
        kw["top_p"] = _renormalisation_window(x[0], kw["temperature"], kw["top_k"], kw["top_p"])
    _unambiguous(draw, x, kw, dtype, slack=1e-4)
    return Call((x,), kw)


def _renormalisation_window(x: np.ndarray, temp: float, top_k: int, default: float) -> float:
    """A ``top_p`` that keeps a different nucleus when the prefix mass is measured before
    top-k's renormalisation (mass ``S·m``) than after it (``m``): the middle of
    ``(S·m_j, m_j)`` for the first rank ``j`` that has one, else ``default``."""
    _, ps = tr.sorted_probs(x[None].astype(np.float64), temp)
    kept = ps[0, :top_k]
    mass = np.cumsum(kept)[:-1]
    if mass.size == 0 or kept.sum() >= 1:
        return default
    renorm = mass / kept.sum()
    return float(np.round((mass[0] + renorm[0]) / 2, 6))


def _ids(got, shape: tuple[int, ...], low: int, high: int) -> tuple[np.ndarray | None, str]:
    ids = np.asarray(got)
    if ids.shape != shape or ids.dtype.kind not in "iu":
        return None, f"returned {ids.dtype} of shape {ids.shape}, but should be int {shape}"
    bad = (ids < low) | (ids >= high)
    if bad.any():
        return None, (f"drew {int(ids[bad][0])} at {np.argwhere(bad)[0].tolist()}, outside "
                      f"[{low}, {high}): outside the support")
    return ids.astype(np.int64), ""


@prop("sampling_probs", strategy=_draw_call)
def draws_fit(run, call: Call, dtype: str):
    """``draw_tokens`` (the engine's own generator) draws from ``sampling_probs``: no token
    outside its support, counts that fit it (exact binomial tests, false alarm ≤ 10⁻⁶ per
    check), and independent rows (agreement counts); ``n`` sized for power ≥ 0.99
    against the documented alternatives (:mod:`lmspec.conformance.statistical`)."""
    x, kw = call.args[0], dict(call.kwargs)
    xf = x.astype(np.float64)
    exact = lmspec.sampling_probs(xf, **kw)
    opts = [kw[k] for k in ("temperature", "top_k", "top_p", "min_p")]
    alts = {name: fn(xf, *opts) for name, fn in stat.TOKEN_ALTERNATIVES.items()}
    fams = [stat.Family(f"row {b} token", exact[b], {n: a[b] for n, a in alts.items()
                                                     if a is not None}) for b in range(len(x))]
    pairs = [(i, j) for i in range(len(x)) for j in range(i + 1, len(x))]
    plan = stat.plan(fams, extra_tests=len(pairs))
    seed = stat.example_seed(x, kw)
    ids, bad = _ids(run("draw_tokens", x, plan.n, seed, **kw), (len(x), plan.n), 0, x.shape[1])
    if ids is None:
        yield Holds("draw_tokens draws from the support of sampling_probs", False, bad)
        return
    ok, msg = stat.judge(fams, list(ids), plan.n, plan.alpha_test)
    for i, j in pairs:
        if ok:
            ok, msg = stat.agreement(ids[i], ids[j], exact[i], exact[j], plan.alpha_test)
        if np.array_equal(x[i], x[j]) and np.sum(exact[i] ** 2) < 1 - 1e-12:
            plan.power["generator not advanced between rows"] = stat.identical_rows_power(
                plan.n, exact[i], plan.alpha_test)
    stat.record(plan, ids.size)
    yield from stat.claims(ok, "draw_tokens fits sampling_probs", msg, seed)


@st.composite
def _chain_call(draw, dtype: str) -> Call:
    b, k, vocab = (d.dim(draw, 1, 2, label="B"), d.dim(draw, 1, 3, label="K"),
                   d.dim(draw, 2, 6, label="V"))
    kind = draw(st.sampled_from(DRAFTS), label="draft")
    regimes = ("normal",) if kind == "near" else ("normal", "ties", "large")
    p = _as_probs(_distribution(draw, (b, k + 1, vocab), "target logits", regimes), dtype)
    return Call((p, _as_probs(_draft(draw, p[:, :k].astype(np.float64), kind), dtype)))


def _closed_form_count(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``P(N = m) = Π_{j<m} β_j · (1 − β_m)``, ``P(N = K) = Π β``, with the acceptance
    rate ``β_k = Σ_x q̃_k(x)·min(1, p_k(x)/q_k(x)) = Σ_x min(p_k, q_k) / Σ_x q_k``
    (drafts ``x ~ q̃_k = q_k/Σq_k``; Leviathan et al. 2023, §3.5)."""
    beta = np.minimum(p[:-1], q).sum(-1) / q.sum(-1)
    alive = np.concatenate([[1.0], np.cumprod(beta)])
    return alive * np.concatenate([1 - beta, [1.0]])


def _families(p: np.ndarray, q: np.ndarray, view: str) -> list[stat.Family]:
    out = []
    vocab = p.shape[-1]
    for b in range(p.shape[0]):
        laws = {name: rule.law(p[b], q[b]) for name, rule in stat.CHAIN_ALTERNATIVES.items()}
        if view == "count":
            out.append(stat.Family(f"row {b} accepted drafts", _closed_form_count(p[b], q[b]),
                                   {n: law[1] for n, law in laws.items()}))
            continue
        exact = stat.EXACT_CHAIN.law(p[b], q[b])[0]
        if view == "first":
            exact = exact[:1]
        out += [stat.Family(f"row {b} position {k} (token, or {vocab} = none)", exact[k],
                            {n: law[0][k] for n, law in laws.items()})
                for k in range(len(exact))]
    return out


def _drafts(q: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``draft_ids[b, c, k] ~ q[b, k]`` (the harness's own draws), ``[B, n, K]``."""
    rng = np.random.default_rng(seed)
    cum = np.cumsum(q / q.sum(-1, keepdims=True), axis=-1)
    u = rng.random((q.shape[0], q.shape[1], n))
    ids = np.stack([[np.searchsorted(cum[b, k], u[b, k], side="right")
                     for k in range(q.shape[1])] for b in range(q.shape[0])])
    return np.minimum(ids, q.shape[-1] - 1).transpose(0, 2, 1).astype(np.int64)


def _speculative_draws(run, call: Call, dtype: str, view: str, what: str):
    p, q = call.args
    pf, qf = p.astype(np.float64), q.astype(np.float64)
    fams = _families(pf, qf, view)
    plan = stat.plan(fams)
    seed = stat.example_seed(p, q)
    drafts = _drafts(qf, plan.n, seed)
    (b, kk, vocab), n = q.shape, plan.n
    ids, bad = _ids(run("draw_speculative", p, q, drafts, seed), (b, n, kk + 1), -1, vocab)
    if ids is None:
        yield Holds("draw_speculative draws from the target's support", False, bad)
        return
    count = np.sum(ids != -1, axis=-1) - 1
    layout = np.all(ids == np.where(np.arange(kk + 1) <= count[..., None], ids, -1)) and bool(
        np.all(ids[..., 0] != -1))
    drafted = np.all((ids[..., :kk] == drafts) | (np.arange(kk) >= count[..., None]))
    yield Holds("each chain: the accepted drafts, one drawn token, then −1",
                bool(layout and drafted), "a chain breaks the layout or changes a draft")
    if view == "count":
        outcomes = list(count)
    else:
        coded = np.where(ids == -1, vocab, ids)
        outcomes = [coded[i, :, k] for i in range(b) for k in range(kk + 1)][:len(fams)] if (
            view == "positions") else [coded[i, :, 0] for i in range(b)]
    ok, msg = stat.judge(fams, outcomes, n, plan.alpha_test)
    stat.record(plan, b * n)
    yield from stat.claims(ok, what, msg, seed)


@prop("speculative_accept", strategy=_chain_call)
def draws_fit_target(run, call: Call, dtype: str):
    """``draw_speculative`` (the engine's own generator, drafts drawn by the harness from
    ``q``): every output position follows its exact law (token ``~ p_k`` once the
    position is reached; statistically, false alarm ≤ 10⁻⁶ per check)."""
    yield from _speculative_draws(run, call, dtype, "positions",
                                  "every output position follows the target")


@prop("speculative_accept", strategy=_chain_call)
def first_token_is_target(run, call: Call, dtype: str):
    """The first output token of ``draw_speculative`` is distributed as ``p_0`` whatever
    the draft (Leviathan et al. 2023, Theorem 1; statistically). The law used is the
    theorem's closed form ``q̃·min(1, p/q) + (1 − β)·r̃`` (drafts ``~ q̃ = q/Σq``, ``r̃`` the
    normalised residual), which is ``p_0`` for rows that are distributions and stays exact
    for rows rounded to a half-precision dtype, whose sums miss 1 by up to 2⁻⁸ (there the
    first token's law is not ``p_0``: with ``q_0 = (1, 0)`` and ``p_0`` rounded to
    ``(1.0, 9e-4)`` no draft is ever rejected)."""
    yield from _speculative_draws(run, call, dtype, "first", "first token ~ p_0")


@prop("speculative_accept", strategy=_chain_call)
def accepted_count_closed_form(run, call: Call, dtype: str):
    """The number of accepted drafts follows the closed form from the acceptance rates
    ``β_k = Σ min(p_k, q_k)`` (mean ``Σ_m Π_{j<m} β_j``; statistically)."""
    yield from _speculative_draws(run, call, dtype, "count",
                                  "accepted drafts follow Π β_j (1 − β_m)")
