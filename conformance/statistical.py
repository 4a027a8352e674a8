"""The statistical judge of samplers that draw with their own random numbers.

A backend's ``draw_tokens`` and ``draw_speculative`` (CONTRACT §2) cannot be compared
draw by draw with the reference; their *counts* are compared with the exact distribution:

1. **Support.** A drawn token with exact probability 0 fails at once (no randomness can
   excuse it).
2. **Goodness of fit, exact.** Each category ``i`` (a token, or at a speculative position
   the token or "no token", or a number of accepted drafts) is tested on its own: under the
   null hypothesis its count ``X_i`` is exactly ``Binomial(n, π_i)``, and the test rejects
   when ``X_i < F⁻¹(a/2)`` or ``X_i > F̄⁻¹(a/2)`` (binomial quantiles, no approximation).
   Categories whose expected count ``n·π_i`` is below :data:`MIN_EXPECTED` are pooled into
   one. By Bonferroni's inequality the chance that a correct sampler fails any of the
   ``m`` tests of an example is ``≤ m·a``; with ``a = α/(E·m)`` the chance that it fails
   a check of up to ``E`` = :data:`EXAMPLES` examples is ``≤ α`` = :data:`FALSE_ALARM`
   (10⁻⁶). A χ² or G statistic would need its asymptotic law at tail probabilities of
   10⁻¹¹, where that law is not reliable for small counts; binomial tails are exact at any
   count, so the stated rate is a bound, not an approximation.
3. **Independence** (``draw_tokens``): for two rows ``a, b`` the number of positions where
   their draws agree is ``Binomial(n, Σ_v π_a(v)·π_b(v))`` under independence; a generator
   that is not advanced between rows makes identical rows agree everywhere.
4. **Power.** The draw count ``n`` is chosen per example from :data:`DRAWS`: the smallest
   that gives power ``≥`` :data:`POWER` against every documented alternative (the
   ``*_ALTERNATIVES`` below, each a known sampler bug computed exactly for this example)
   that some ``n`` in :data:`DRAWS` can detect. Power is computed exactly as a lower bound:
   ``1 − (1 − m)^n`` for an alternative with mass ``m`` outside the support, and the
   probability that the most affected category alone crosses its critical value.

Every verdict is seeded by the example (:func:`example_seed`), so a rerun reproduces it.
The stated rates and the measured power are recorded in the check's result as its
``statistics`` (:func:`record`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

import lmspec
from lmspec.sampling import SAMPLERS

from .declare import Holds

FALSE_ALARM = 1e-6
"""Bound on the probability that a correct sampler fails one check (CONTRACT §2)."""
EXAMPLES = 1000
"""Examples per check the Bonferroni correction covers (the ``thorough`` profile's count);
fewer examples only lower the false-alarm rate."""
POWER = 0.99
"""Power aimed at against each documented alternative an example can reveal."""
DRAWS = (1024, 4096, 16384, 32768)
"""Draw counts (per row, or draft chains per row) an example may choose from."""
MIN_EXPECTED = 5.0
"""Categories with a smaller expected count are pooled into one."""


# -- the exact distributions and the documented alternatives --------------------------

def _norm(w: np.ndarray) -> np.ndarray:
    s = w.sum(axis=-1, keepdims=True)
    return np.where(s > 0, w / np.where(s > 0, s, 1), 0.0)


def _keep(probs: np.ndarray, keep: np.ndarray) -> np.ndarray:
    return _norm(np.where(keep, probs, 0.0))


def _top_p_before_temperature(x, t, k, p, mp):
    """Nucleus (and top-k) chosen on ``softmax(x)``, the temperature applied afterwards."""
    if t in (0.0, 1.0):
        return None
    kept = lmspec.sampling_probs(x, 1.0, k, p, 0.0) > 0
    return _min_p(_keep(lmspec.sampling_probs(x, t), kept), mp)


def _min_p(probs: np.ndarray, mp: float) -> np.ndarray:
    return probs if mp <= 0 else _keep(probs, probs >= mp * probs.max(-1, keepdims=True))


def _top_k_shift(shift: int):
    def alt(x, t, k, p, mp):
        """Top-k off by one (``top_k ± 1`` tokens kept)."""
        if t == 0 or k == 0 or k + shift < 1:
            return None
        return lmspec.sampling_probs(x, t, k + shift, p, mp)
    return alt


def _min_p_absolute(x, t, k, p, mp):
    """Min-p as an absolute threshold: keep ``p_i ≥ min_p`` (not ``min_p · max p``)."""
    if t == 0 or mp <= 0:
        return None
    probs = lmspec.sampling_probs(x, t, k, p, 0.0)
    keep = (probs >= mp) | (probs == probs.max(-1, keepdims=True))
    return _keep(probs, keep)


def _top_p_unrenormalised(x, t, k, p, mp):
    """Renormalising after both filters: the top-p mass is measured on ``softmax(x/T)``
    before top-k's renormalisation (so the nucleus comes out too long)."""
    if t == 0 or p >= 1 or k == 0:
        return None
    from lmspec.training import sorted_probs

    order, ps = sorted_probs(x, t)
    rank = np.arange(ps.shape[-1])
    ps = np.where(rank < k, ps, 0.0)
    before = np.cumsum(ps, -1) - ps
    ps = _keep(ps, (before < p) | (rank == 0))
    ps = _min_p(ps, mp)
    out = np.zeros_like(ps)
    np.put_along_axis(out, order, ps, axis=-1)
    return out


TOKEN_ALTERNATIVES: dict[str, Callable[..., np.ndarray | None]] = {
    "top-p before temperature": _top_p_before_temperature,
    "top-k off by one (k+1)": _top_k_shift(1),
    "top-k off by one (k-1)": _top_k_shift(-1),
    "min-p as an absolute threshold": _min_p_absolute,
    "renormalising after both filters": _top_p_unrenormalised,
}
"""Sampler bugs ``draw_tokens`` is sized to reveal: ``alt(x, T, top_k, top_p, min_p)``
gives the distribution the bug draws from (``None`` where it equals the exact one by
construction). "generator not advanced between rows" is the independence test's."""


def _exact_accept(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(q > 0, np.minimum(1.0, p / np.where(q > 0, q, 1)), 0.0)


def _exact_residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    r = np.maximum(p - q, 0.0)
    return _norm(r) if r.sum() > 0 else _norm(p)


@dataclass(frozen=True)
class ChainRule:
    """A rejection sampler, as the law of its outputs: the acceptance probability of a
    draft ``x`` (``accept(p_k, q_k)[x]``), what is drawn after a rejection, the bonus
    distribution, and whether a rejected position keeps its draft."""

    accept: Callable[[np.ndarray, np.ndarray], np.ndarray] = _exact_accept
    residual: Callable[[np.ndarray, np.ndarray], np.ndarray] = _exact_residual
    bonus: Callable[[np.ndarray, np.ndarray], np.ndarray] = lambda p, q: _norm(p[-1])
    keep_draft: bool = False

    def law(self, p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For one row (``p[K+1, V]``, ``q[K, V]``, drafts ``x_k ~ q_k``): the law of each
        output position over ``V + 1`` outcomes (the last: −1, no token) and the law of the
        number of accepted drafts over ``0 … K``."""
        kk, vocab = q.shape[0], p.shape[1]
        pos, count, alive = np.zeros((kk + 1, vocab + 1)), np.zeros(kk + 1), 1.0
        for k in range(kk):
            qn = _norm(q[k])
            acc = qn * self.accept(p[k], q[k])
            rej = qn - acc
            out = rej if self.keep_draft else rej.sum() * self.residual(p[k], q[k])
            pos[k, :vocab], pos[k, vocab] = alive * (acc + out), 1 - alive
            count[k] = alive * rej.sum()
            alive *= acc.sum()
        pos[kk, :vocab], pos[kk, vocab], count[kk] = alive * self.bonus(p, q), 1 - alive, alive
        return pos, count


def _unnormalised_residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Inverse CDF on ``max(p − q, 0)`` not renormalised: a draw past its mass lands on the
    last token (``searchsorted`` clamped)."""
    r = np.maximum(p - q, 0.0)
    if r.sum() <= 0:
        return _norm(p)
    r = r.copy()
    r[-1] += max(0.0, 1.0 - r.sum())
    return r


def _bf16_accept(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (p / np.where(q > 0, q, 1)).astype(np.float32).astype(ml_dtypes.bfloat16)
    return np.where(q > 0, np.minimum(1.0, ratio.astype(np.float64)), 0.0)


EXACT_CHAIN = ChainRule()
CHAIN_ALTERNATIVES: dict[str, ChainRule] = {
    "residual not renormalised": ChainRule(residual=_unnormalised_residual),
    "bonus token drawn from the draft": ChainRule(bonus=lambda p, q: _norm(q[-1]) if len(q)
                                                  else _norm(p[-1])),
    "acceptance u < p/q in bfloat16": ChainRule(accept=_bf16_accept),
    "rejected position keeps the draft token": ChainRule(keep_draft=True),
}
"""Rejection-sampler bugs ``draw_speculative`` is sized to reveal, each as its exact law."""


# -- binomial tests ------------------------------------------------------------------

def _pool(expected: np.ndarray, n: int) -> np.ndarray:
    """Category → test index: categories with ``n·π < MIN_EXPECTED`` share one test."""
    small = expected * n < MIN_EXPECTED
    idx = np.cumsum(~small) - 1
    return np.where(small, int((~small).sum()), idx)


def _pooled(probs: np.ndarray, groups: np.ndarray) -> np.ndarray:
    return np.bincount(groups, weights=probs, minlength=int(groups.max(initial=0)) + 1)


@dataclass
class Family:
    """One categorical law under test (a row's tokens, a speculative position, …): the
    exact probabilities and those of each alternative (same categories)."""

    name: str
    exact: np.ndarray
    alternatives: dict[str, np.ndarray] = field(default_factory=dict)


def _special() -> Any:
    """``scipy.special``, imported on first use (``pip install 'lmspec[test]'``): its
    binomial tails ``bdtr``/``bdtrc`` are exact (regularised incomplete beta)."""
    from scipy import special

    return special


def binom_cdf(k: Any, n: int, p: Any) -> np.ndarray:
    """``P(X ≤ k)`` for ``X ~ Binomial(n, p)``."""
    k, p = np.floor(np.asarray(k, dtype=np.float64)), np.asarray(p, dtype=np.float64)
    inside = _special().bdtr(np.clip(k, 0, n), n, p)
    return np.where(k < 0, 0.0, np.where(k >= n, 1.0, inside))


def binom_sf(k: Any, n: int, p: Any) -> np.ndarray:
    """``P(X > k)`` for ``X ~ Binomial(n, p)``."""
    k, p = np.floor(np.asarray(k, dtype=np.float64)), np.asarray(p, dtype=np.float64)
    inside = _special().bdtrc(np.clip(k, 0, n), n, p)
    return np.where(k < 0, 1.0, np.where(k >= n, 0.0, inside))


def _smallest(ok: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...],
              n: int) -> np.ndarray:
    """The smallest ``k ∈ [0, n]`` with ``ok(k)`` (monotone in ``k``, true at ``n``)."""
    lo, hi = np.full(shape, -1.0), np.full(shape, float(n))
    while np.any(hi - lo > 1):
        mid = np.floor((lo + hi) / 2)
        good = ok(mid)
        hi, lo = np.where(good, mid, hi), np.where(good, lo, mid)
    return hi


def _limits(n: int, probs: np.ndarray, a: float) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided binomial critical values: reject ``X < lo`` or ``X > hi``, where ``lo`` is
    the smallest ``k`` with ``P(X ≤ k) ≥ a/2`` and ``hi`` the smallest with
    ``P(X > k) ≤ a/2`` (each side's chance under the null is at most ``a/2``)."""
    probs = np.asarray(probs, dtype=np.float64)
    lo = _smallest(lambda k: binom_cdf(k, n, probs) >= a / 2, probs.shape, n)
    hi = _smallest(lambda k: binom_sf(k, n, probs) <= a / 2, probs.shape, n)
    return lo, hi


def _differs(fam: Family, alt: np.ndarray) -> bool:
    return float(np.abs(alt - fam.exact).sum()) > 1e-6


def _powers(n: int, families: Sequence[Family], names: Sequence[str], a: float) -> np.ndarray:
    """Lower bounds on the chance that an example of ``families`` is rejected at ``n`` draws
    when alternative ``names[j]`` is the truth: ``1 − (1 − m)^n`` for its mass ``m``
    outside the support, or the chance that one category alone crosses its critical value,
    whichever is larger."""
    exact, alts, outside = [], [], np.zeros(len(names))
    for fam in families:
        groups = _pool(fam.exact, n)
        e = _pooled(fam.exact, groups)
        exact.append(e)
        row = []
        for j, name in enumerate(names):
            alt = fam.alternatives.get(name)
            if alt is None or not _differs(fam, alt):
                row.append(e)
                continue
            m = float(alt[fam.exact <= 0].sum())
            outside[j] = max(outside[j], 1 - (1 - m) ** n if m > 0 else 0.0)
            row.append(_pooled(alt, groups))
        alts.append(np.stack(row))
    e, f = np.concatenate(exact), np.concatenate(alts, axis=1)
    lo, hi = _limits(n, e, a)
    single = binom_cdf(lo - 1, n, f) + binom_sf(hi, n, f)
    return np.maximum(outside, single.max(axis=1))


@dataclass
class Plan:
    """The draw count of one example and what it is sized for."""

    n: int
    alpha_test: float
    tests: int
    power: dict[str, float]
    """Each documented alternative that differs here: its power at ``n``."""


def plan(families: Sequence[Family], extra_tests: int = 0) -> Plan:
    """The smallest ``n`` in :data:`DRAWS` with power ≥ :data:`POWER` against every
    alternative some ``n`` can reach; the per-test level ``a = α/(E·m)``."""
    tests = sum(f.exact.size for f in families) + extra_tests
    a = FALSE_ALARM / (EXAMPLES * max(tests, 1))
    names = sorted({name for f in families for name, alt in f.alternatives.items()
                    if _differs(f, alt)})
    if not names:
        return Plan(DRAWS[0], a, tests, {})
    top = _powers(DRAWS[-1], families, names, a)
    reach = top >= POWER
    for n in DRAWS[:-1]:
        pw = _powers(n, families, names, a)
        if np.all(pw[reach] >= POWER):
            return Plan(n, a, tests, dict(zip(names, pw.tolist())))
    return Plan(DRAWS[-1], a, tests, dict(zip(names, top.tolist())))


def judge(families: Sequence[Family], outcomes: Sequence[np.ndarray], n: int,
          a: float) -> tuple[bool, str]:
    """Support, then per-category binomial tests; ``outcomes[i]`` holds the ``n`` category
    indices drawn for ``families[i]``. The message names the worst categories."""
    for fam, out in zip(families, outcomes):
        counts = np.bincount(out, minlength=fam.exact.size)
        bad = np.flatnonzero((counts > 0) & (fam.exact <= 0))
        if bad.size:
            return False, (f"{fam.name}: category {int(bad[0])} was drawn {int(counts[bad[0]])}"
                           f" times but has probability 0 (outside the support)")
    worst: tuple[float, str] | None = None
    for fam, out in zip(families, outcomes):
        counts = np.bincount(out, minlength=fam.exact.size)
        groups = _pool(fam.exact, n)
        e, c = _pooled(fam.exact, groups), np.bincount(groups, weights=counts,
                                                       minlength=groups.max(initial=0) + 1)
        tail = np.minimum(binom_cdf(c, n, e), binom_sf(c - 1, n, e))
        j = int(np.argmin(tail))
        if worst is None or tail[j] < worst[0]:
            rows = sorted(range(e.size), key=lambda i: tail[i])[:3]
            shown = "; ".join(
                f"{_category(groups, i)}: observed {int(c[i])}, expected {n * e[i]:.1f}"
                for i in rows)
            worst = (float(tail[j]), f"{fam.name}: {shown}")
    if worst is not None and worst[0] <= a / 2:
        return False, (f"{worst[1]} (one-sided binomial tail {worst[0]:.2g} ≤ a/2 = "
                       f"{a / 2:.2g}, n = {n})")
    return True, ""


def _category(groups: np.ndarray, i: int) -> str:
    members = np.flatnonzero(groups == i).tolist()
    return f"category {members[0]}" if len(members) == 1 else f"pooled categories {members}"


def identical_rows_power(n: int, pa: np.ndarray, a: float) -> float:
    """Power against a generator that is not advanced between two identical rows (their
    draws then agree at all ``n`` positions): 1 if ``n`` agreements are rejected, else 0."""
    s = float(np.sum(pa * pa))
    return 1.0 if s < 1 - 1e-12 and _limits(n, np.array(s), a)[1] < n else 0.0


def agreement(a_ids: np.ndarray, b_ids: np.ndarray, pa: np.ndarray, pb: np.ndarray,
              a: float) -> tuple[bool, str]:
    """Independence of two rows' draws: their agreement count against
    ``Binomial(n, Σ π_a π_b)`` (skipped where that is 1: two one-hot rows must agree)."""
    n, s = a_ids.size, float(np.clip(np.sum(pa * pb), 0, 1))
    if s >= 1 - 1e-12:
        return True, ""
    c = int(np.sum(a_ids == b_ids))
    lo, hi = _limits(n, np.array(s), a)
    if c < lo or c > hi:
        return False, (f"the draws of two rows agree at {c} of {n} positions; independent "
                       f"draws agree at {n * s:.1f} on average (critical values {lo:g}, "
                       f"{hi:g}): the rows do not draw independently")
    return True, ""


# -- seeds and the record of stated rates ---------------------------------------------

def example_seed(*parts: Any) -> int:
    """A seed determined by the example (array bytes and options)."""
    h = 0
    for p in parts:
        data = np.ascontiguousarray(p).tobytes() if isinstance(p, np.ndarray) else repr(
            p).encode()
        h = zlib.crc32(data, h)
    return h


_SINK: ContextVar[dict[str, Any] | None] = ContextVar("lmspec_statistics_sink", default=None)


def sampler_call(backend: Any, name: str, fn: Any, kwargs: Mapping[str, Any],
                 result: dict[str, Any]) -> tuple[Any, tuple[str, ...], dict[str, Any]]:
    """For the harness: ``(method, parameter names, kwargs)`` of a sampler method
    (:data:`lmspec.sampling.SAMPLERS`), and ``result`` becomes the record that this
    check's statistics go to (:func:`record`). A backend served by a host process lists
    only catalogue ops; its sampler method is called through the host, and a host's
    "no such attribute" answer means unsupported."""
    if name not in SAMPLERS:
        raise KeyError(f"{name} is neither a catalogue op nor a sampler method")
    _SINK.set(result)
    if fn is None and callable(getattr(backend, "_method", None)):
        fn = _HostSampler(backend._method(name), name)
    return fn, SAMPLERS[name], dict(kwargs)


class _HostSampler:
    """A sampler method called through a backend's host process."""

    def __init__(self, call: Callable[..., Any], name: str):
        self.call, self.name, self.remote = call, name, True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.call(*args, **kwargs)
        except Exception as exc:
            text = str(exc)
            if text.startswith("AttributeError") and self.name in text:
                raise NotImplementedError(f"the backend has no {self.name}") from None
            raise


def record(p: Plan, draws: int) -> None:
    """Add one judged example to the current check's ``statistics``."""
    sink = _SINK.get()
    if sink is None:
        return
    st = sink.setdefault("statistics", {
        "test": "support, then exact two-sided binomial test per category (categories with "
                f"expected count < {MIN_EXPECTED:g} pooled), Bonferroni over categories, rows "
                f"and up to {EXAMPLES} examples",
        "false_alarm_per_check": FALSE_ALARM, "power_target": POWER, "examples": 0,
        "draws": 0, "min_alpha_per_test": 1.0, "alternatives": {}})
    st["examples"] += 1
    st["draws"] += draws
    st["min_alpha_per_test"] = min(st["min_alpha_per_test"], p.alpha_test)
    for name, pw in p.power.items():
        a = st["alternatives"].setdefault(name, {"examples_differing": 0,
                                                 "examples_with_power": 0, "max_power": 0.0})
        a["examples_differing"] += 1
        a["examples_with_power"] += pw >= POWER
        a["max_power"] = max(a["max_power"], round(pw, 6))
    st["power_statement"] = (
        f"power ≥ {POWER} against each documented alternative in every example where a "
        f"draw count ≤ {DRAWS[-1]} reaches it (per alternative: examples_with_power of "
        "examples_differing)")


def claims(ok: bool, what: str, message: str, seed: int) -> Iterator[Holds]:
    """The verdict as a property's claim (its detail names the draw seed and the level)."""
    yield Holds(what, ok, f"{message}; draw seed {seed}, false alarm ≤ {FALSE_ALARM:g} "
                f"per check")
