"""The sampling family's reference (sampling_probs, speculative_accept) and its judge."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

import lmspec
from lmspec.sampling import sorted_filtered

LOGITS = np.array([[1.0, 2.0, 2.0, 0.0, -1.0], [0.5, -0.5, 3.0, 3.0, 1.0]])


def test_sampling_probs_is_a_distribution_with_the_filters_zeros():
    p = lmspec.sampling_probs(LOGITS, temperature=0.7, top_k=3, top_p=0.9, min_p=0.1)
    assert np.allclose(p.sum(-1), 1) and np.all(p >= 0)
    assert np.all(np.sum(p > 0, axis=-1) <= 3)
    full = lmspec.sampling_probs(LOGITS)
    assert np.allclose(full, np.exp(LOGITS) / np.exp(LOGITS).sum(-1, keepdims=True))


def test_temperature_zero_is_one_hot_on_the_lowest_id_maximum():
    p = lmspec.sampling_probs(LOGITS, temperature=0.0, top_k=1, top_p=0.1)
    assert p.tolist() == [[0, 1, 0, 0, 0], [0, 0, 1, 0, 0]]


def test_ties_are_kept_by_id():
    p = lmspec.sampling_probs(LOGITS, top_k=1)  # 2.0 at ids 1 and 2: id 1 stays
    assert p[0].tolist() == [0, 1, 0, 0, 0] and p[1].tolist() == [0, 0, 1, 0, 0]


@pytest.mark.parametrize("kw", [{}, {"top_k": 2}, {"top_p": 0.6}, {"min_p": 0.3},
                                {"temperature": 2.0, "top_k": 4, "top_p": 0.8, "min_p": 0.05}])
def test_sample_token_draws_from_sampling_probs(kw):
    """Over a grid of G values of u, sample_token gives each token G·p of them (±1)."""
    grid = 2000
    u = (np.arange(grid) + 0.5) / grid
    for row in LOGITS:
        ids = lmspec.sample_token(np.repeat(row[None], grid, 0), u, **kw)
        counts = np.bincount(ids, minlength=row.size)
        assert np.all(np.abs(counts - grid * lmspec.sampling_probs(row[None], **kw)[0]) <= 1)


def test_sample_token_and_sampling_probs_share_one_function():
    order, ps = sorted_filtered(LOGITS, 1.0, 2, 1.0, 0.0)
    probs = lmspec.sampling_probs(LOGITS, top_k=2)
    assert np.array_equal(np.take_along_axis(probs, order, -1), ps)


@pytest.mark.parametrize("bad, match", [
    ({"temperature": -1.0}, "sampling_probs: argument 'temperature'"),
    ({"top_p": 1.5}, "sampling_probs: argument 'top_p'"),
    ({"top_k": -1}, "sampling_probs: argument 'top_k'"),
    ({"min_p": 2.0}, "sampling_probs: argument 'min_p'"),
    ({"logits": np.array([[np.nan, 1.0]])}, "sampling_probs: argument 'logits'"),
    ({"logits": np.zeros(3)}, "sampling_probs: argument 'logits'"),
])
def test_sampling_probs_names_bad_arguments(bad, match):
    kw = {"logits": LOGITS, **bad}
    with pytest.raises(ValueError, match=match):
        lmspec.sampling_probs(**kw)


# -- speculative_accept ----------------------------------------------------------------

P = np.array([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]])
Q = np.array([[[0.25, 0.25, 0.5]]])


def spec(ids, au, ru, p=P, q=Q):
    return lmspec.speculative_accept(p, q, np.array(ids), np.array(au), np.array(ru))


def test_accepted_draft_then_bonus_from_the_last_target():
    ids, n = spec([[0]], [[0.3]], [0.6])
    assert ids.tolist() == [[0, 2]] and n.tolist() == [1]  # bonus: cum 0.2, 0.5, 1.0 > 0.6


def test_rejected_draft_draws_from_the_residual():
    ids, n = spec([[2]], [[0.3]], [0.6])  # p(2) = 0: rejected; r ∝ (0.25, 0.25, 0)
    assert ids.tolist() == [[1, -1]] and n.tolist() == [0]


def test_acceptance_is_strict_and_zero_draft_probability_rejects():
    assert spec([[0]], [[0.5 / 0.25 / 2 * 0.999]], [0.0])[1].tolist() == [1]
    p = np.array([[[0.25, 0.75, 0.0], [1.0, 0.0, 0.0]]])
    q = np.array([[[0.5, 0.5, 0.0]]])
    assert spec([[0]], [[0.5]], [0.0], p, q)[1].tolist() == [0]  # u·q = p: rejected
    q0 = np.array([[[1.0, 0.0, 0.0]]])
    assert spec([[1]], [[0.0]], [0.0], p, q0)[1].tolist() == [0]  # q(x) = 0: rejected


def test_all_zero_residual_draws_from_the_target():
    p = np.array([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]])
    ids, n = spec([[2]], [[0.0]], [0.75], p, p[:, :1].copy())  # q(2) = 0: rejected
    assert ids.tolist() == [[1, -1]] and n.tolist() == [0]  # r = 0: drawn from p_0
    q = np.array([[[0.5, 0.5, 0.0]]])
    ids, n = spec([[1]], [[0.999]], [0.75], np.array([[[0.5, 0.49, 0.01], [1, 0, 0]]]), q)
    assert ids.tolist() == [[2, -1]]  # residual (0, 0, 0.01): only token 2


def test_the_acceptance_comparison_is_exact():
    """u·q < p decided on the exact values, where float64 rounding of u·q would flip it."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        u, q = rng.random(), rng.random()
        prod = u * q
        for p in (np.nextafter(prod, 0), prod, np.nextafter(prod, 1)):
            exact = Fraction(u) * Fraction(q) < Fraction(p)
            pp = np.array([[[p, 1 - p], [1.0, 0.0]]])
            qq = np.array([[[q, 1 - q]]])
            n = lmspec.speculative_accept(pp, qq, np.array([[0]]), np.array([[u]]),
                                          np.array([0.0]))[1]
            assert bool(n[0]) == exact


def test_the_rule_preserves_the_target_over_a_grid_of_uniforms():
    """Leviathan et al.'s theorem on the reference: drafts weighted by q, uniforms on a
    grid; the first output token is distributed as p_0 (up to the grid's resolution)."""
    p = np.array([[[0.1, 0.6, 0.3], [0.3, 0.3, 0.4]]])
    q = np.array([[[0.5, 0.2, 0.3]]])
    grid = 200
    g = (np.arange(grid) + 0.5) / grid
    law = np.zeros(3)
    for x in range(3):
        au, ru = np.repeat(g, grid), np.tile(g, grid)
        b = au.size
        ids, _ = lmspec.speculative_accept(np.repeat(p, b, 0), np.repeat(q, b, 0),
                                           np.full((b, 1), x), au[:, None], ru)
        law += q[0, 0, x] * np.bincount(ids[:, 0], minlength=3) / b
    assert np.allclose(law, p[0, 0], atol=2 / grid)


@pytest.mark.parametrize("bad, match", [
    ({"target_probs": -P}, "'target_probs'"),
    ({"draft_probs": Q * 2}, "'draft_probs'"),
    ({"draft_ids": np.array([[3]])}, "'draft_ids'"),
    ({"accept_u": np.array([[1.0]])}, "'accept_u'"),
    ({"resample_u": np.array([0.5, 0.5])}, "'resample_u'"),
])
def test_speculative_accept_names_bad_arguments(bad, match):
    kw = {"target_probs": P, "draft_probs": Q, "draft_ids": np.array([[0]]),
          "accept_u": np.array([[0.5]]), "resample_u": np.array([0.5]), **bad}
    with pytest.raises(ValueError, match="speculative_accept: argument " + match):
        lmspec.speculative_accept(**kw)


def test_no_drafts_draws_the_bonus():
    ids, n = lmspec.speculative_accept(P[:, 1:], np.zeros((1, 0, 3)), np.zeros((1, 0), int),
                                       np.zeros((1, 0)), np.array([0.1]))
    assert ids.tolist() == [[0]] and n.tolist() == [0]
