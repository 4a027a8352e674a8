"""Core family on JAX's own functions: ``jax.nn.softmax``, ``jax.nn.log_softmax``,
``jax.scipy.special.logsumexp``; the losses are composed from ``jax.nn.log_softmax`` as
JAX code writes them (JAX has no cross-entropy function; see ``NOTES``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp as _logsumexp

from lmspec.backends.declared import one_element_deviations
from lmspec.backends.jax_attention import AT_30, OTHERWISE, half_findings, half_intermediates

NOTES = {
    "softmax": "jax.nn.softmax.",
    "log_softmax": "jax.nn.log_softmax.",
    "logsumexp": "jax.scipy.special.logsumexp.",
    "cross_entropy": "JAX has no cross-entropy function: composed from jax.nn.log_softmax "
    "as -take_along_axis(log_softmax(z), y) (label smoothing: (1-ε)·that + ε·mean_c "
    "-log_softmax(z)[c]), averaged over the rows whose target is not ignore_index "
    "(Σ/count, NaN when every row is ignored).",
    "sequence_log_prob": "jnp.take_along_axis of the log-probabilities, masked with "
    "jnp.where, summed over time.",
    "perplexity": "jnp.exp of minus the masked mean of jnp.take_along_axis(log_probs, "
    "tokens).",
}

STATIC = {"cross_entropy": ("label_smoothing",)}


DEVIATIONS = one_element_deviations(
    "jax.nn.softmax / jax.nn.log_softmax / jax.scipy.special.logsumexp (jax 0.10.2)") | \
    half_intermediates(
        "softmax/vjp/{dtype}",
        "jax.nn.softmax's derivative is computed from its output y, an array of the input "
        "dtype (rounded to it): y·(g − Σ g·y).",
        {"float16": 1.90, "bfloat16": 15.6}) | half_intermediates(
        "cross_entropy/*/{dtype}",
        "composed from jax.nn.log_softmax as JAX code writes it: the log-probabilities are an "
        "array of the input dtype (rounded to it) before the pick and the mean.",
        {"float16": 135, "bfloat16": 182}) | half_intermediates(
        "softmax/forward/{dtype}",
        "jax.nn.softmax evaluates exp(x − max), its sum and the quotient as arrays of the "
        "input dtype (XLA CPU keeps float16 reductions in float16).", {"float16": 1.02},
        AT_30, "1") | half_intermediates(
        "log_softmax/vjp/{dtype}",
        "jax.nn.log_softmax's derivative g − exp(y)·Σg is formed from its output y, an "
        "array of the input dtype: measured float16 gradient 0 where the spec gives 3.35e-4 "
        "(p ≈ 1 rounds to 1).", {"float16": 23.1, "bfloat16": 14.3}, AT_30,
        OTHERWISE) | half_intermediates(
        "logsumexp/forward/{dtype}",
        "jax.scipy.special.logsumexp sums exp(x − max) in the input dtype: measured float16 "
        "0 where the spec gives −0.000212 (the sum 1 + 1e-4 rounds to 1).",
        {"float16": 476, "bfloat16": 439}, AT_30, "0.311") | half_findings({
    "perplexity/forward": {"float16": 1.7, "bfloat16": 1.63},
    "perplexity/vjp": {"float16": 3.32, "bfloat16": 2.68},
    }, "jnp.exp of minus the masked mean of the picked log-probabilities: the log-probabilities "
        "and the mean are arrays of the input dtype (the sum accumulated in it), and jax.vjp's "
        "backward likewise.")


def softmax(x, axis=-1):
    return jax.nn.softmax(x, axis=axis)


def log_softmax(x, axis=-1):
    return jax.nn.log_softmax(x, axis=axis)


def logsumexp(x, axis=-1):
    return _logsumexp(x, axis=axis)


def _picked(log_probs, tokens):
    """``log_probs[..., tokens]`` along the last axis (ids outside the vocabulary, such as
    an ignore_index, are clamped: those rows are masked out by the caller)."""
    safe = jnp.clip(tokens, 0, log_probs.shape[-1] - 1)
    return jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]


def cross_entropy(logits, targets, ignore_index=-100, label_smoothing=0.0):
    lp = jax.nn.log_softmax(logits, axis=-1)
    loss = -_picked(lp, targets)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * jnp.mean(lp, axis=-1)
    keep = targets != ignore_index
    total = jnp.sum(jnp.where(keep, loss, jnp.zeros_like(loss)))
    return total / jnp.sum(keep).astype(loss.dtype)


def sequence_log_prob(log_probs, tokens, mask=None):
    picked = _picked(log_probs, tokens)
    if mask is not None:
        picked = jnp.where(mask, picked, jnp.zeros_like(picked))
    return jnp.sum(picked, axis=1)


def perplexity(log_probs, tokens, mask=None):
    picked = _picked(log_probs, tokens)
    if mask is None:
        return jnp.exp(-jnp.mean(picked))
    total = jnp.sum(jnp.where(mask, picked, jnp.zeros_like(picked)))
    return jnp.exp(-total / jnp.sum(mask).astype(picked.dtype))
