"""Core family: softmax and its gradient, the chain rule, cross-entropy, perplexity.

Sources: the seeds' language-model notes (chain rule
``P(w_1..w_m) = Π_i P(w_i | w_1..w_{i-1})``, perplexity as the exponentiated mean
negative log-likelihood, the softmax gradient ``ŷ − y``); Goodfellow et al.,
*Deep Learning* (2016) §4.1 for the max-shifted softmax/logsumexp; Szegedy et al.
(2016) for label smoothing.
"""

from __future__ import annotations

import numpy as np

from . import _validate as v
from ._catalogue import reference, vjp_rule
from ._precision import fl


def _shifted(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """``(z, m)`` with ``z = x − m`` and ``m = max(x)`` along ``axis``, ``m`` replaced by 0
    where it is not finite (an all ``−inf`` slice of two or more elements then gives
    ``−inf − 0``, not ``−inf + inf``; an empty slice has ``m = −inf``, hence 0).

    A one-element axis is exact whatever its value (CONTRACT §6, 2026-12-06): ``m = x``
    and ``z = 0`` (NaN stays NaN), so that ``softmax = e⁰/e⁰ = 1``, ``log_softmax = 0 −
    ln 1 = 0`` and ``logsumexp = m + ln e⁰ = x``, ``±inf`` included.
    """
    if x.shape[axis] == 1:
        return np.where(np.isnan(x), x, np.zeros_like(x)), x
    m = np.max(x, axis=axis, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0)
    return x - m, m


@reference("core", diff=("x",))
def softmax(x, axis=-1):
    """``softmax(x)_i = exp(x_i − m) / Σ_j exp(x_j − m)``, ``m = max_j x_j``.

    Subtracting the maximum changes nothing mathematically (shift invariance) and keeps
    ``exp`` from overflowing. A slice of two or more elements that is all ``−inf`` gives
    NaN (0/0), as does one holding ``+inf``; a one-element slice gives 1 whatever its
    value (``±inf`` included; CONTRACT §6).
    """
    x = v.floats("softmax", "x", x, min_ndim=1)
    ax = v.axis("softmax", "axis", axis, x.ndim)
    z, _ = _shifted(x, ax)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(z)
        return e / np.sum(e, axis=ax, keepdims=True)


@vjp_rule(softmax)
def _softmax_vjp(cot, x, axis=-1):
    """``∂L/∂x = p ⊙ (c − Σ_j c_j p_j)`` (the Jacobian ``diag(p) − p pᵀ`` applied to ``c``)."""
    p = softmax(x, axis)
    c = fl(cot)
    return {"x": p * (c - np.sum(c * p, axis=axis, keepdims=True))}


@reference("core", diff=("x",))
def log_softmax(x, axis=-1):
    """``log_softmax(x)_i = x_i − m − ln Σ_j exp(x_j − m)`` (``m`` as in :func:`softmax`).

    NaN over a slice of two or more elements that is all ``−inf``; 0 over a one-element
    slice whatever its value (CONTRACT §6).
    """
    x = v.floats("log_softmax", "x", x, min_ndim=1)
    ax = v.axis("log_softmax", "axis", axis, x.ndim)
    z, _ = _shifted(x, ax)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        return z - np.log(np.sum(np.exp(z), axis=ax, keepdims=True))


@vjp_rule(log_softmax)
def _log_softmax_vjp(cot, x, axis=-1):
    """``∂L/∂x = c − p Σ_j c_j``."""
    p = softmax(x, axis)
    c = fl(cot)
    return {"x": c - p * np.sum(c, axis=axis, keepdims=True)}


@reference("core", diff=("x",))
def logsumexp(x, axis=-1):
    """``logsumexp(x) = m + ln Σ_j exp(x_j − m)``, reduced over ``axis``.

    A slice that is all ``−inf`` gives ``−inf`` (CONTRACT §2); one holding ``+inf``
    gives ``+inf``; a one-element slice gives its value (CONTRACT §6). An empty slice
    (``x.shape[axis] = 0``) gives ``−inf``, the log of the empty sum; empty other axes
    give an empty result (so do softmax and log_softmax).
    """
    x = v.floats("logsumexp", "x", x, min_ndim=1)
    ax = v.axis("logsumexp", "axis", axis, x.ndim)
    z, m = _shifted(x, ax)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        return np.squeeze(m + np.log(np.sum(np.exp(z), axis=ax, keepdims=True)), axis=ax)


@vjp_rule(logsumexp)
def _logsumexp_vjp(cot, x, axis=-1):
    """``∂L/∂x = c · softmax(x)`` (``c`` broadcast over the reduced axis): ``c`` itself over
    a one-element axis, whatever the value (``softmax = 1`` there)."""
    ax = axis % np.ndim(x)
    return {"x": np.expand_dims(fl(cot), ax) * softmax(x, ax)}


def _check_ce(logits, targets, ignore_index, label_smoothing):
    op = "cross_entropy"
    lg = v.floats(op, "logits", logits, ndim=2)
    n, vocab = lg.shape
    if vocab < 1:
        v.fail(op, "logits", "at least one class (V >= 1)", f"shape {lg.shape}")
    ii = v.integer(op, "ignore_index", ignore_index)
    t = v.ints(op, "targets", targets, shape=(n,), low=0, high=vocab, allow=(ii,))
    eps = v.real(op, "label_smoothing", label_smoothing, low=0.0, high=1.0)
    return lg, t, ii, eps


@reference("core", diff=("logits",))
def cross_entropy(logits, targets, ignore_index=-100, label_smoothing=0.0):
    """``CE = (1/|R|) Σ_{n∈R} [(1−ε)(−ln p_n[y_n]) + ε · (1/V) Σ_c (−ln p_n[c])]``.

    ``p_n = softmax(logits_n)``, ``R`` = rows whose target is not ``ignore_index``,
    ``ε`` = ``label_smoothing``. NaN when every row is ignored (0/0).
    """
    lg, t, ii, eps = _check_ce(logits, targets, ignore_index, label_smoothing)
    lp = log_softmax(lg, -1)
    keep = t != ii
    safe = np.where(keep, t, 0)
    nll = -np.take_along_axis(lp, safe[:, None], axis=1)[:, 0]
    smooth = -np.mean(lp, axis=1) if eps else 0.0
    row = (1 - eps) * nll + eps * smooth
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(np.where(keep, row, 0)) / fl(np.sum(keep))


@vjp_rule(cross_entropy)
def _cross_entropy_vjp(cot, logits, targets, ignore_index=-100, label_smoothing=0.0):
    """``∂CE/∂logits_n = c · [p_n − (1−ε) onehot(y_n) − ε/V] / |R|`` for kept rows, 0 for
    ignored ones (the seeds' ``ŷ − y`` with smoothing).

    When every row is ignored the loss is the constant NaN, independent of the logits,
    so its gradient is 0 everywhere (as torch's autograd also gives).
    """
    lg, t, ii, eps = _check_ce(logits, targets, ignore_index, label_smoothing)
    keep = t != ii
    p = softmax(lg, -1)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(t))[keep], t[keep]] = 1
    g = p - (1 - eps) * onehot - eps / lg.shape[1]
    return {"logits": fl(cot) * np.where(keep[:, None], g, 0) / fl(max(np.sum(keep), 1))}


def _check_seq(op, log_probs, tokens, mask):
    lp = v.floats(op, "log_probs", log_probs, ndim=3)
    b, t, vocab = lp.shape
    tok = v.ints(op, "tokens", tokens, shape=(b, t), low=0, high=vocab)
    m = v.mask(op, "mask", mask, shape=(b, t))
    return lp, tok, np.ones((b, t), dtype=bool) if m is None else m


def _picked(lp, tok, m):
    """``mask[b,t] · log_probs[b, t, tokens[b,t]]`` (masked positions contribute exactly 0,
    even where the log-probability is ``−inf``)."""
    return np.where(m, np.take_along_axis(lp, tok[..., None], axis=2)[..., 0], 0)


def _scatter(tok, m, weight, shape):
    g = np.zeros(shape, dtype=weight.dtype)
    b, t = np.nonzero(m)
    g[b, t, tok[b, t]] = np.broadcast_to(weight, m.shape)[b, t]
    return g


@reference("core", diff=("log_probs",))
def sequence_log_prob(log_probs, tokens, mask=None):
    """Chain rule: ``ln P(w_1..w_T) = Σ_t mask[b,t] · ln P(w_t | w_<t)`` per sequence.

    ``log_probs[b,t]`` is the model's conditional distribution at step ``t``; the product
    of conditionals (seeds 000–002) becomes a sum of logs. Returns ``[B]``.
    """
    lp, tok, m = _check_seq("sequence_log_prob", log_probs, tokens, mask)
    return np.sum(_picked(lp, tok, m), axis=1)


@vjp_rule(sequence_log_prob)
def _sequence_log_prob_vjp(cot, log_probs, tokens, mask=None):
    """``∂/∂log_probs[b,t,v] = c_b · mask[b,t] · [v = tokens[b,t]]``."""
    lp, tok, m = _check_seq("sequence_log_prob", log_probs, tokens, mask)
    return {"log_probs": _scatter(tok, m, fl(cot)[:, None], lp.shape)}


@reference("core", diff=("log_probs",))
def perplexity(log_probs, tokens, mask=None):
    """``PPL = exp(−(1/Σ mask) Σ_{b,t} mask · ln P(w_t | w_<t))`` (natural log).

    NaN when the mask selects no token. A uniform model over V words has PPL = V.
    """
    lp, tok, m = _check_seq("perplexity", log_probs, tokens, mask)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return np.exp(-np.sum(_picked(lp, tok, m)) / fl(np.sum(m)))


@vjp_rule(perplexity)
def _perplexity_vjp(cot, log_probs, tokens, mask=None):
    """``∂PPL/∂log_probs[b,t,tokens[b,t]] = −c · PPL · mask[b,t] / Σ mask``."""
    lp, tok, m = _check_seq("perplexity", log_probs, tokens, mask)
    with np.errstate(invalid="ignore", divide="ignore"):
        w = -fl(cot) * perplexity(lp, tok, m) / fl(np.sum(m))
    return {"log_probs": _scatter(tok, m, np.asarray(w, dtype=lp.dtype), lp.shape)}
