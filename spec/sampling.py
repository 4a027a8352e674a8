"""Sampling family: the distributions samplers draw from, and speculative decoding.

Sources: Fan et al. (2018) top-k, Holtzman et al. (2020) nucleus (top-p), Nguyen et al.
(2024) min-p sampling; Leviathan, Kalman & Matias (2023) "Fast Inference from Transformers
via Speculative Decoding" and Chen et al. (2023) "Accelerating Large Language Model
Decoding with Speculative Sampling" for the rejection rule (Theorem 1 of Leviathan et al.:
accepting ``x ~ q`` with probability ``min(1, p(x)/q(x))`` and otherwise drawing from
``r ∝ max(p − q, 0)`` yields exactly ``x ~ p``); the chain form is vLLM's and FlashInfer's
``chain_speculative_sampling``.

- :func:`sampling_probs` is the distribution ``sample_token`` (training family) draws from;
  both are built on :func:`sorted_filtered`, so they cannot drift apart.
- :func:`speculative_accept` is exact: the acceptance test ``u·q < p`` and the inverse-CDF
  comparisons are decided in integer arithmetic on the exact values of the float inputs
  (no rounding at all), so the reference is the rule itself, not one rounding of it.
- :data:`SAMPLERS` names the optional backend methods that draw with the engine's own
  random numbers (CONTRACT §2, "Samplers with their own random numbers"); the conformance
  harness judges them statistically (``lmspec.conformance.statistical``).

Choices where the contract is silent: the probability rows of ``speculative_accept`` must
be finite, ``≥ 0`` and sum to 1 within :data:`SUM_SLACK` (a distribution stored in a half
precision dtype sums to 1 only up to its rounding); the residual and the bonus draw are
normalised by their exact sums.
"""

from __future__ import annotations

import math

import numpy as np

from . import _validate as v
from ._catalogue import reference
from .training import _check_sample_logits, _unit_draws, filter_sorted, sorted_probs

SAMPLERS: dict[str, tuple[str, ...]] = {
    "draw_tokens": ("logits", "n", "seed", "temperature", "top_k", "top_p", "min_p"),
    "draw_speculative": ("target_probs", "draft_probs", "draft_ids", "seed"),
}
"""The optional sampler methods of a backend and their parameters (CONTRACT §2):
``draw_tokens(...) -> ids[B, n]`` draws ``n`` tokens per row from ``sampling_probs``;
``draw_speculative(...) -> ids[B, n, K+1]`` runs the rejection sampler once per draft chain."""

SUM_SLACK = 1e-2
"""How far from 1 a probability row of ``speculative_accept`` may sum (rounding of a
distribution stored in bfloat16 is at most ``V·2⁻⁹`` relative; larger is not a distribution)."""


def _check_options(op: str, logits, temperature, top_k, top_p, min_p):
    x = v.floats(op, "logits", logits, ndim=2)
    if x.shape[1] < 1:
        v.fail(op, "logits", "at least one token (V >= 1)", f"shape {x.shape}")
    temp = v.real(op, "temperature", temperature, low=0.0)
    if not math.isfinite(temp):
        v.fail(op, "temperature", "a finite number >= 0", repr(temperature))
    _check_sample_logits(op, x, temp)
    k = v.integer(op, "top_k", top_k, low=0)
    pp = v.real(op, "top_p", top_p, low=0.0, high=1.0)
    mp = v.real(op, "min_p", min_p, low=0.0, high=1.0)
    return x, temp, k, pp, mp


def sorted_filtered(x: np.ndarray, temperature: float, top_k: int, top_p: float,
                    min_p: float) -> tuple[np.ndarray, np.ndarray]:
    """``(order, ps)``: token ids sorted by ``p = softmax(x/T)`` descending, ties by id
    ascending, and the filtered, renormalised probabilities in that order (CONTRACT §2
    ``sample_token``: top-k, renormalise, top-p, renormalise, min-p, renormalise).
    ``T = 0``: the order of the logits (lowest id first among equal maxima) and a one-hot
    ``ps`` on rank 0. Inputs are assumed valid."""
    if temperature == 0:
        order = np.argsort(-x, axis=-1, kind="stable")
        ps = np.zeros(x.shape, dtype=np.float64)
        ps[:, :1] = 1.0
        return order, ps
    order, ps = sorted_probs(x, temperature)
    return order, filter_sorted(ps, top_k, top_p, min_p)


@reference("sampling")
def sampling_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The distribution ``sample_token`` draws from, ``[B, V]`` in token-id order.

    With ``p = softmax(logits/T)`` ordered by ``p`` descending then id ascending: keep the
    first ``top_k`` (0 = all) and renormalise; keep the shortest prefix whose mass is
    ``≥ top_p`` (at least one) and renormalise; keep ``p_i ≥ min_p · max p`` and
    renormalise. Filtered tokens get 0. ``temperature = 0``: one-hot on the lowest id
    among the maximal logits. Same input rules as ``sample_token`` (``ValueError`` naming
    this op).
    """
    x, temp, k, pp, mp = _check_options("sampling_probs", logits, temperature, top_k, top_p,
                                        min_p)
    order, ps = sorted_filtered(x, temp, k, pp, mp)
    out = np.zeros(x.shape, dtype=ps.dtype)
    np.put_along_axis(out, order, ps, axis=-1)
    return out


# -- speculative decoding ------------------------------------------------------------

_SHIFT = 1130
"""Every float64 (subnormals included) times ``2**_SHIFT`` is an integer."""


def _exact(a: np.ndarray) -> list:
    """The values of a float array as exact integers ``a·2**_SHIFT`` (nested lists)."""
    m, e = np.frexp(np.asarray(a, dtype=np.float64))
    mant = (m * 2.0**53).astype(np.int64)
    shift = (e.astype(np.int64) - 53 + _SHIFT)
    flat = [int(q) << int(s) if q else 0 for q, s in zip(mant.ravel(), shift.ravel())]
    return np.array(flat, dtype=object).reshape(a.shape).tolist()


def _inverse_cdf_exact(weights: list, u: int) -> int:
    """The first index whose cumulative weight exceeds ``u·total`` (``u`` scaled by
    ``2**_SHIFT``); the last positive weight should the total be reached before that."""
    total = sum(weights)
    cum, last = 0, 0
    for i, w in enumerate(weights):
        if w > 0:
            last = i
        cum += w
        if cum << _SHIFT > u * total:
            return i
    return last


def _probability_rows(op: str, name: str, x: object, shape) -> np.ndarray:
    a = v.floats(op, name, x, shape=shape).astype(np.float64)
    bad = ~(np.isfinite(a) & (a >= 0))
    if bad.any():
        v.fail(op, name, "finite probabilities >= 0",
               f"{a[bad].ravel()[0]} at index {np.argwhere(bad)[0].tolist()}")
    sums = a.sum(axis=-1)
    off = np.abs(sums - 1) > SUM_SLACK
    if off.any():
        v.fail(op, name, f"rows that sum to 1 (within {SUM_SLACK})",
               f"sum {sums[off].ravel()[0]} at row {np.argwhere(off)[0].tolist()}")
    return a


def _check_speculative(target_probs, draft_probs, draft_ids, accept_u, resample_u):
    op = "speculative_accept"
    p = _probability_rows(op, "target_probs", target_probs, (None, None, None))
    b, k1, vocab = p.shape
    if k1 < 1 or vocab < 1:
        v.fail(op, "target_probs", "shape [B, K+1, V] with K+1 >= 1 and V >= 1",
               f"shape {p.shape}")
    q = _probability_rows(op, "draft_probs", draft_probs, (b, k1 - 1, vocab))
    ids = v.ints(op, "draft_ids", draft_ids, shape=(b, k1 - 1), low=0, high=vocab)
    au = _unit_draws(op, "accept_u", accept_u, (b, k1 - 1)).astype(np.float64)
    ru = _unit_draws(op, "resample_u", resample_u, (b,)).astype(np.float64)
    return p, q, ids, au, ru


@reference("sampling")
def speculative_accept(target_probs, draft_probs, draft_ids, accept_u, resample_u):
    """The chain rejection sampler of speculative decoding, with given uniforms.

    Per row: draft ``k = 0, 1, …`` is accepted while ``accept_u[k]·q_k(x_k) < p_k(x_k)``
    (``p_k = target_probs[k]``, ``q_k = draft_probs[k]``, ``x_k = draft_ids[k]``; a draft
    with ``q_k(x_k) = 0`` is rejected). At the first rejection ``k`` the next token is
    drawn from ``r ∝ max(p_k − q_k, 0)`` (from ``p_k`` if that is all zero); if all ``K``
    are accepted the bonus token is drawn from ``p_K``. A draw is the inverse CDF in id
    order: the first token whose cumulative mass exceeds ``resample_u·(total mass)``.
    Returns ``(ids[B, K+1], n_accepted[B])``: the accepted drafts, the drawn token, then
    −1. Every comparison is exact (integer arithmetic on the inputs' exact values).
    """
    p, q, ids, au, ru = _check_speculative(target_probs, draft_probs, draft_ids, accept_u,
                                           resample_u)
    b, k1, _ = p.shape
    out = np.full((b, k1), -1, dtype=np.int64)
    accepted = np.zeros(b, dtype=np.int64)
    if b == 0:
        return out, accepted
    P, Q, U, R = _exact(p), _exact(q), _exact(au), _exact(ru)
    for row in range(b):
        k = 0
        while k < k1 - 1:
            x = int(ids[row, k])
            # u·q < p  ⇔  U·Q < P·2**_SHIFT (both sides scaled by 2**(2·_SHIFT))
            if not (Q[row][k][x] > 0 and U[row][k] * Q[row][k][x] < P[row][k][x] << _SHIFT):
                break
            out[row, k] = x
            k += 1
        accepted[row] = k
        if k < k1 - 1:
            resid = [max(pp - qq, 0) for pp, qq in zip(P[row][k], Q[row][k])]
            weights = resid if any(resid) else P[row][k]
        else:
            weights = P[row][k]
        out[row, k] = _inverse_cdf_exact(weights, R[row])
    return out, accepted
