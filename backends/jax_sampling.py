"""Sampling family on JAX: ``jax.nn.softmax``, ``jax.lax.top_k`` (ties: lower index
first, as the spec orders them) and a stable ``jnp.argsort`` for the nucleus,
``jax.random.categorical`` with a key made from the call's seed for the samplers with
their own random numbers, and the chain rejection sampler in ``jnp``.

Half-precision inputs are computed in float32 (CONTRACT §6's model, as production samplers
do). ``draw_tokens``/``draw_speculative`` are plain functions of this module: the JAX
backend exposes catalogue ops only, so a harness reaches them through
:func:`sampler_backend` until the backend exposes sampler methods.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NOTES = {
    "sampling_probs": (
        "jax.nn.softmax of (logits − max)/T (float32 for half inputs), top-k kept by "
        "jax.lax.top_k, the nucleus on a stable descending jnp.argsort, min-p against the "
        "largest renormalised probability."),
    "speculative_accept": (
        "vectorised chain rejection in jnp: accept while u·q(x) < p(x) (q(x) = 0 rejects), "
        "the first rejection draws from max(p − q, 0) (p if all zero), the bonus from p_K; "
        "the draw is the inverse CDF (cumulative mass against u times the total)."),
}

STATIC = {"sampling_probs": ("temperature", "top_k", "top_p", "min_p")}
"""Options that pick code paths (Python ``if``): compiled per value."""


def _work(x):
    return x.astype(jnp.float32) if x.dtype in (jnp.float16, jnp.bfloat16) else x


def _renormalised(p, keep):
    p = jnp.where(keep, p, 0)
    return p / jnp.sum(p, axis=-1, keepdims=True)


def sampling_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    x = _work(logits)
    vocab = x.shape[-1]
    if temperature == 0:
        return jax.nn.one_hot(jnp.argmax(x, axis=-1), vocab, dtype=x.dtype)
    probs = jax.nn.softmax((x - jnp.max(x, axis=-1, keepdims=True)) / temperature, axis=-1)
    if top_k and top_k < vocab:
        _, idx = jax.lax.top_k(probs, top_k)
        kept = jnp.zeros(probs.shape, bool).at[jnp.arange(x.shape[0])[:, None], idx].set(True)
        probs = _renormalised(probs, kept)
    order = jnp.argsort(probs, axis=-1, stable=True, descending=True)
    p = jnp.take_along_axis(probs, order, axis=-1)
    rank = jnp.arange(vocab)
    if top_p < 1:
        before = jnp.cumsum(p, axis=-1) - p
        p = _renormalised(p, (before < top_p) | (rank == 0))
    if min_p > 0:
        p = _renormalised(p, (p >= min_p * p[..., :1]) | (rank == 0))
    return jnp.zeros_like(p).at[jnp.arange(x.shape[0])[:, None], order].set(p)


def _chain(p, q, ids, accept_u, pick):
    """``p[N, K+1, V]``, ``q[N, K, V]``, ``ids[N, K]``, ``accept_u[N, K]`` →
    ``(out[N, K+1], n_accepted[N])``; ``pick(weights[N, V]) -> ids[N]``."""
    n, kk = ids.shape
    rows = jnp.arange(n)[:, None]
    cols = jnp.arange(kk)[None, :]
    px, qx = p[rows, cols, ids], q[rows, cols, ids]
    accept = (qx > 0) & (accept_u * qx < px)
    n_acc = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=-1), axis=-1)
    if kk:
        at = jnp.minimum(n_acc, kk - 1)
        pa, qa = p[jnp.arange(n), at], q[jnp.arange(n), at]
        resid = jnp.maximum(pa - qa, 0)
        resid = jnp.where(jnp.sum(resid, -1, keepdims=True) > 0, resid, pa)
        weights = jnp.where((n_acc < kk)[:, None], resid, p[:, kk])
    else:
        weights = p[:, 0]
    drawn = pick(weights)
    pos = jnp.arange(kk + 1)[None, :]
    padded = jnp.concatenate([ids, jnp.full((n, 1), -1, ids.dtype)], axis=-1)
    out = jnp.where(pos < n_acc[:, None], padded, -1)
    return jnp.where(pos == n_acc[:, None], drawn[:, None].astype(out.dtype), out), n_acc


def speculative_accept(target_probs, draft_probs, draft_ids, accept_u, resample_u):
    p, q = _work(target_probs), _work(draft_probs)
    u = _work(resample_u).astype(p.dtype)

    def inverse_cdf(w):
        cum = jnp.cumsum(w, axis=-1)
        first = jnp.sum(cum <= (u * cum[:, -1])[:, None], axis=-1)
        last = w.shape[-1] - 1 - jnp.argmax(w[:, ::-1] > 0, axis=-1)
        return jnp.minimum(first, last)

    return _chain(p, q, draft_ids, _work(accept_u).astype(p.dtype), inverse_cdf)


def _log(w):
    return jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1)), -jnp.inf)


def draw_tokens(logits, n, seed, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """``jax.random.categorical`` on the log of ``sampling_probs``, ``n`` draws per row
    (``seed``: an unsigned 32-bit integer, traced)."""
    p = sampling_probs(logits, temperature, top_k, top_p, min_p)
    key = jax.random.key(seed)
    return jax.random.categorical(key, _log(p), axis=-1, shape=(int(n), p.shape[0])).T


def draw_speculative(target_probs, draft_probs, draft_ids, seed):
    """The chain once per draft chain: ``jax.random.uniform`` for the acceptances,
    ``jax.random.categorical`` for the drawn token (one key split in two)."""
    p, q = _work(target_probs), _work(draft_probs)
    b, n, kk = draft_ids.shape
    k_accept, k_draw = jax.random.split(jax.random.key(seed))
    u = jax.random.uniform(k_accept, (b * n, kk), dtype=p.dtype)
    out, _ = _chain(jnp.repeat(p, n, axis=0), jnp.repeat(q, n, axis=0),
                    draft_ids.reshape(b * n, kk), u,
                    lambda w: jax.random.categorical(k_draw, _log(w), axis=-1))
    return out.reshape(b, n, kk + 1)


_DRAW_TOKENS = jax.jit(draw_tokens, static_argnames=("n", "temperature", "top_k", "top_p",
                                                     "min_p"))
_DRAW_SPECULATIVE = jax.jit(draw_speculative)


class _Samplers:
    """An in-process backend of JAX's sampler methods (NumPy in, NumPy out)."""

    def __init__(self, base: Any):
        self._base = base

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)

    def draw_tokens(self, logits, n, seed, **kw):
        return np.asarray(_DRAW_TOKENS(jnp.asarray(logits), n=int(n),
                                       seed=np.uint32(int(seed) % 2**32), **kw))

    def draw_speculative(self, target_probs, draft_probs, draft_ids, seed):
        return np.asarray(_DRAW_SPECULATIVE(jnp.asarray(target_probs), jnp.asarray(draft_probs),
                                            jnp.asarray(draft_ids), np.uint32(int(seed) % 2**32)))


def sampler_backend(base: Any) -> Any:
    """``base`` (a JAX backend) with this module's ``draw_tokens``/``draw_speculative``."""
    return _Samplers(base)
