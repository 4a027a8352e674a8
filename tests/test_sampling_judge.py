"""The statistical judge of samplers, and the engines' samplers behind it."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("scipy")

import lmspec
from lmspec.conformance import cases_sampling as cs
from lmspec.conformance import statistical as stat
from lmspec.conformance.declare import Call

P = np.array([[[0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]]])
Q = np.array([[[0.5, 0.2, 0.3], [0.2, 0.2, 0.6]]])


def exact_tokens(name, logits, n, seed, **kw):
    """An ideal draw_tokens: NumPy's multinomial on the exact distribution."""
    probs = lmspec.sampling_probs(logits.astype(np.float64), **kw)
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(probs.shape[1], size=n, p=row) for row in probs])


def test_exact_draws_pass_and_a_wrong_distribution_fails():
    probs = np.array([0.5, 0.3, 0.2, 0.0])
    fam = stat.Family("row 0", probs, {"shifted": np.array([0.4, 0.4, 0.2, 0.0])})
    plan = stat.plan([fam])
    assert plan.n in stat.DRAWS and plan.power["shifted"] >= stat.POWER
    rng = np.random.default_rng(1)
    ok, _ = stat.judge([fam], [rng.choice(4, plan.n, p=probs)], plan.n, plan.alpha_test)
    assert ok
    bad = rng.choice(4, plan.n, p=[0.4, 0.4, 0.2, 0.0])
    ok, msg = stat.judge([fam], [bad], plan.n, plan.alpha_test)
    assert not ok and "observed" in msg and "expected" in msg
    ok, msg = stat.judge([fam], [np.full(plan.n, 3)], plan.n, plan.alpha_test)
    assert not ok and "outside the support" in msg


def test_the_critical_values_hold_the_level():
    """Each side of a test rejects with probability at most a/2 under the null."""
    n, a = 1024, 1e-3
    probs = np.array([1e-4, 0.01, 0.3, 0.5, 0.97])
    lo, hi = stat._limits(n, probs, a)
    assert np.all(stat.binom_cdf(lo - 1, n, probs) <= a / 2)
    assert np.all(stat.binom_sf(hi, n, probs) <= a / 2)
    assert np.all(stat.binom_cdf(lo, n, probs) >= a / 2)  # the smallest such values


def test_agreement_catches_rows_drawn_with_the_same_random_numbers():
    p = np.array([0.5, 0.5])
    rng = np.random.default_rng(0)
    a = rng.choice(2, 1024, p=p)
    assert stat.agreement(a, rng.choice(2, 1024, p=p), p, p, 1e-9)[0]
    ok, msg = stat.agreement(a, a.copy(), p, p, 1e-9)
    assert not ok and "independently" in msg


def test_an_ideal_sampler_passes_many_examples():
    """No false alarm over 60 drawn examples of draws_fit (an ideal NumPy sampler)."""
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=60, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(cs._draw_call("float32"))
    def check(call):
        claims = list(cs.draws_fit(exact_tokens, call, "float32"))
        assert all(c.ok for c in claims), [c.detail for c in claims]

    check()


def test_the_laws_of_the_chain():
    pos, count = stat.EXACT_CHAIN.law(P[0], Q[0])
    assert np.allclose(pos[0, :3], P[0, 0])  # Leviathan et al.: the first token is p_0
    assert np.allclose(count, cs._closed_form_count(P[0], Q[0]))
    alive = 1 - pos[:, 3]
    assert np.allclose(pos[1, :3], alive[1] * P[0, 1])  # a reached position follows p_k
    keep = stat.CHAIN_ALTERNATIVES["rejected position keeps the draft token"].law(P[0], Q[0])
    assert np.allclose(keep[0][0, :3], Q[0, 0])


def test_the_strategies_reach_each_documented_alternative():
    """Over draws_fit's inputs every documented alternative changes some distribution."""
    from hypothesis import HealthCheck, given, settings

    seen: set[str] = set()

    @settings(max_examples=150, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(cs._draw_call("float32"))
    def collect(call):
        x, kw = call.args[0].astype(np.float64), call.kwargs
        exact = lmspec.sampling_probs(x, **kw)
        opts = [kw[k] for k in ("temperature", "top_k", "top_p", "min_p")]
        for name, fn in stat.TOKEN_ALTERNATIVES.items():
            alt = fn(x, *opts)
            if alt is not None and np.abs(alt - exact).sum() > 1e-6:
                seen.add(name)

    collect()
    assert seen == set(stat.TOKEN_ALTERNATIVES)


def test_a_host_without_the_sampler_is_unsupported():
    class Remote:
        def _method(self, name):
            def call(*a, **k):
                raise RuntimeError(f"AttributeError: {name}")
            return call

    fn, names, _ = stat.sampler_call(Remote(), "draw_tokens", None, {}, {})
    assert names == lmspec.sampling.SAMPLERS["draw_tokens"]
    with pytest.raises(NotImplementedError):
        fn(np.zeros((1, 2)), 4, 0)


# -- the engines' samplers ---------------------------------------------------------------

def _run(backend):
    return lambda name, *a, **k: getattr(backend, name)(*a, **k)


def test_torch_samplers_fit_on_a_fixed_example():
    pytest.importorskip("torch")
    from lmspec.backends.torch_backend import TorchBackend

    run = _run(TorchBackend("torch-cpu", "cpu", ("float32",)))
    call = Call((P.astype(np.float32), Q.astype(np.float32)))
    for prop in (cs.draws_fit_target, cs.first_token_is_target, cs.accepted_count_closed_form):
        assert all(c.ok for c in prop(run, call, "float32"))


def test_transformers_keeps_the_highest_ids_among_ties_at_the_nucleus_cut():
    """Pins the upstream behaviour behind transformers-cpu's declared deviation."""
    pytest.importorskip("transformers")
    from lmspec.backends.transformers_backend import TransformersBackend, _tie_at_a_cut

    b = TransformersBackend()
    x = np.zeros((1, 3), np.float32)
    kw = {"temperature": 0.5, "top_k": 0, "top_p": 0.5, "min_p": 0.0}
    assert np.allclose(b.sampling_probs(x, **kw), [[0, 0.5, 0.5]])
    assert np.allclose(lmspec.sampling_probs(x, **kw), [[0.5, 0.5, 0]])
    assert _tie_at_a_cut((x,), kw)
    assert not _tie_at_a_cut((np.array([[0.0, 1.0, 2.0]]),), kw)


@pytest.mark.slow
def test_transformers_speculative_sampling_fits():
    pytest.importorskip("transformers")
    from lmspec.backends.transformers_backend import TransformersBackend

    run = _run(TransformersBackend())
    call = Call((P.astype(np.float32), Q.astype(np.float32)))
    for prop in (cs.draws_fit_target, cs.accepted_count_closed_form):
        assert all(c.ok for c in prop(run, call, "float32"))


@pytest.mark.slow
def test_jax_samplers_fit():
    pytest.importorskip("jax")
    from lmspec.backends.jax_backend import JaxBackend
    from lmspec.backends.jax_sampling import sampler_backend

    from .conftest import run_checks

    backend = sampler_backend(JaxBackend("jax-cpu", "cpu", ("float32",)))
    for op, check in (("sampling_probs", "draws_fit"), ("speculative_accept",
                                                       "draws_fit_target")):
        results = run_checks(backend, op, ("float32",), (check,), max_examples=10)
        assert [r["status"] for r in results] == ["pass"], results[0]["message"]
