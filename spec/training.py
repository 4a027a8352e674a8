"""Training family: distillation, gradient clipping, masked-LM corruption, sampling.

Sources: seed 000 (masked language models; knowledge distillation, where the student's
loss mixes the hard-label loss with a loss against the teacher), Hinton, Vinyals & Dean
(2015) "Distilling the Knowledge in a Neural Network" (softened softmax, ``T²`` factor);
seeds 001 and 003 (gradient clipping against exploding gradients) with Pascanu, Mikolov
& Bengio (2013) for the rule ``g ← min(1, θ/‖g‖)·g``; Devlin et al. (2019) "BERT" for
the 80/10/10 corruption; Holtzman et al. (2020) for nucleus (top-p) sampling and Fan et
al. (2018) for top-k sampling.

Choices where the contract is silent (also stated in each docstring):

- ``distillation_loss``: ``targets`` are class ids in ``[0, V)`` (no ``ignore_index``),
  ``temperature`` is finite and ``> 0``, ``alpha`` lies in ``[0, 1]``.
- ``clip_grad_norm``: ``norm_type`` is any ``p > 0`` or ``inf``; ``max_norm ≥ 0``;
  ``grads`` is a tuple (or list) of float arrays, returned as a tuple.
- ``mlm_mask`` and ``sample_token``: the uniform draws lie in ``[0, 1)``; token ids
  are ``≥ 0``. The thresholds (``mask_prob``, 0.8, 0.9, ``top_p``) are real numbers:
  the draws, exact in their dtype, are compared with them exactly.
- ``sample_token``: ``top_p = 1`` disables the nucleus filter and ``top_p = 0`` keeps
  one token; if rounding leaves the cumulative mass of the kept tokens at or below
  ``u``, the last kept token with nonzero probability is returned (mathematically the
  mass reaches 1 > u, so this only settles rounding).
"""

from __future__ import annotations

import math

import numpy as np

from . import _validate as v
from ._catalogue import reference, vjp_rule
from ._precision import fl
from .core import _cross_entropy_vjp, _log_softmax_vjp, cross_entropy, log_softmax, softmax

IGNORE = -100
"""Label of a position that takes no part in the masked-LM loss (CONTRACT §1)."""


# -- KL divergence ----------------------------------------------------------------

def _check_kl(log_p, log_q):
    lp = v.floats("kl_divergence", "log_p", log_p, ndim=2)
    lq = v.floats("kl_divergence", "log_q", log_q, shape=lp.shape)
    return lp, lq


def _kl_terms(lp: np.ndarray, lq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(p, p·(ln p − ln q))`` with the terms where ``p = 0`` set to exactly 0."""
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        return p, np.where(p == 0, 0, p * (lp - lq))


@reference("training", diff=("log_p", "log_q"))
def kl_divergence(log_p, log_q):
    """``KL(p ‖ q) = (1/N) Σ_n Σ_v p_nv (ln p_nv − ln q_nv)``, ``p = exp(log_p)``.

    Terms with ``p = 0`` count 0 (the limit ``p ln p → 0``), even where ``ln q = −∞``;
    a term with ``p > 0`` and ``q = 0`` makes the divergence ``+∞``. Inputs are
    log-probabilities of rows ``n`` over ``V`` classes; they are not renormalised.
    """
    lp, lq = _check_kl(log_p, log_q)
    _, terms = _kl_terms(lp, lq)
    return np.sum(terms) / fl(lp.shape[0])


@vjp_rule(kl_divergence)
def _kl_divergence_vjp(cot, log_p, log_q):
    """``∂KL/∂log_p = c·p(ln p − ln q + 1)/N`` and ``∂KL/∂log_q = −c·p/N`` (0 where p = 0)."""
    lp, lq = _check_kl(log_p, log_q)
    p, terms = _kl_terms(lp, lq)
    c = fl(cot) / fl(lp.shape[0])
    return {"log_p": c * np.where(p == 0, 0, terms + p), "log_q": -c * p}


# -- knowledge distillation --------------------------------------------------------

def _check_distill(student_logits, teacher_logits, targets, temperature, alpha):
    op = "distillation_loss"
    s = v.floats(op, "student_logits", student_logits, ndim=2)
    n, vocab = s.shape
    if vocab < 1:
        v.fail(op, "student_logits", "at least one class (V >= 1)", f"shape {s.shape}")
    t = v.floats(op, "teacher_logits", teacher_logits, shape=(n, vocab))
    y = v.ints(op, "targets", targets, shape=(n,), low=0, high=vocab)
    temp = v.real(op, "temperature", temperature, low=0.0, low_open=True)
    if not math.isfinite(temp):
        v.fail(op, "temperature", "a finite number > 0", repr(temperature))
    a = v.real(op, "alpha", alpha, low=0.0, high=1.0)
    return s, t, y, fl(temp), fl(a)


@reference("training", diff=("student_logits", "teacher_logits"))
def distillation_loss(student_logits, teacher_logits, targets, temperature=1.0, alpha=0.5):
    """``L = α·CE(s, y) + (1 − α)·T²·KL(softmax(t/T) ‖ softmax(s/T))``.

    Hinton et al. (2015): the student ``s`` matches the teacher's softened distribution
    at temperature ``T``; the ``T²`` factor keeps the soft term's gradient, which
    shrinks like ``1/T²``, on the scale of the hard term's (seed 000: the student's
    loss combines the true labels with the teacher's outputs). ``CE`` is
    :func:`lmspec.cross_entropy` (mean over rows, no smoothing) and ``KL`` is
    :func:`kl_divergence`, averaged over the ``N`` rows. ``targets`` are class ids in
    ``[0, V)``; ``temperature`` is finite and ``> 0``; ``alpha ∈ [0, 1]``.
    """
    s, t, y, temp, a = _check_distill(student_logits, teacher_logits, targets, temperature,
                                      alpha)
    soft = kl_divergence(log_softmax(t / temp), log_softmax(s / temp))
    return a * cross_entropy(s, y) + (1 - a) * temp**2 * soft


@vjp_rule(distillation_loss)
def _distillation_loss_vjp(cot, student_logits, teacher_logits, targets, temperature=1.0,
                           alpha=0.5):
    """Chain rule through the pieces: the CE gradient ``α(ŷ − y)/N``, and the KL vjp pulled
    back through ``log_softmax(·/T)`` (the ``1/T`` of the inner division included)."""
    s, t, y, temp, a = _check_distill(student_logits, teacher_logits, targets, temperature,
                                      alpha)
    c = fl(cot)
    zs, zt = s / temp, t / temp
    g_kl = _kl_divergence_vjp((1 - a) * temp**2 * c, log_softmax(zt), log_softmax(zs))
    hard = _cross_entropy_vjp(a * c, s, y)["logits"]
    g_s = hard + _log_softmax_vjp(g_kl["log_q"], zs)["x"] / temp
    g_t = _log_softmax_vjp(g_kl["log_p"], zt)["x"] / temp
    return {"student_logits": g_s, "teacher_logits": g_t}


# -- gradient clipping -------------------------------------------------------------

def _check_clip(grads, max_norm, norm_type):
    op = "clip_grad_norm"
    if not isinstance(grads, (tuple, list)):
        v.fail(op, "grads", "a tuple of float arrays", type(grads).__name__)
    gs = tuple(v.floats(op, f"grads[{i}]", g) for i, g in enumerate(grads))
    mx = v.real(op, "max_norm", max_norm, low=0.0)
    p = v.real(op, "norm_type", norm_type, low=0.0, low_open=True)
    return gs, mx, p


def global_norm(grads: tuple[np.ndarray, ...], p: float) -> np.ndarray:
    """``‖g‖_p = (Σ_arrays Σ_i |g_i|^p)^(1/p)`` over every array at once (``max|g|`` for
    ``p = ∞``).

    Evaluated as ``m·‖g/m‖_p`` with ``m = max|g|``: the power sum then lies in
    ``[1, n]``, so it neither overflows nor underflows and the rounding of the exponent
    ``1/p`` costs nothing (``S^(1/p)`` is off by ``|1/p − fl(1/p)|·|ln S|`` relatively).
    """
    flat = np.concatenate([np.abs(g).ravel() for g in grads] + [fl(np.zeros(0))])
    m = np.max(flat, initial=fl(0))
    if p == math.inf or m == 0 or not np.isfinite(m):
        return m
    return m * np.sum((flat / m) ** fl(p)) ** fl(1 / p)


@reference("training")
def clip_grad_norm(grads, max_norm, norm_type=2.0):
    """``g ← min(1, θ/‖g‖)·g`` with one global norm ``‖g‖`` over all arrays.

    Seeds 001 and 003 (gradient clipping against exploding gradients, Pascanu et al.
    2013): when the norm exceeds the threshold ``θ = max_norm`` every array is scaled
    by the same factor. ``norm_type`` is ``p > 0`` or ``inf`` (max abs). A zero total
    leaves the gradients unchanged (also when ``max_norm = 0``). Returns
    ``(clipped tuple, total_norm)``.
    """
    gs, mx, p = _check_clip(grads, max_norm, norm_type)
    total = global_norm(gs, p)
    with np.errstate(divide="ignore", invalid="ignore"):
        coef = np.where(total == 0, fl(1), np.minimum(fl(1), fl(mx) / total))
    return tuple(g * coef for g in gs), total


# -- masked-LM corruption ----------------------------------------------------------

def _unit_draws(op: str, name: str, x: object, shape) -> np.ndarray:
    """Uniform draws: floats of ``shape`` with values in ``[0, 1)``."""
    a = v.floats(op, name, x, shape=shape)
    bad = ~((a >= 0) & (a < 1))
    if bad.any():
        v.fail(op, name, "values in [0, 1)", f"{a[bad].ravel()[0]} at index "
               f"{np.argwhere(bad)[0].tolist()}")
    return a


def _check_mlm(tokens, select_u, action_u, random_tokens, mask_token_id, mask_prob, maskable):
    op = "mlm_mask"
    tok = v.ints(op, "tokens", tokens, ndim=2, low=0)
    su = _unit_draws(op, "select_u", select_u, tok.shape)
    au = _unit_draws(op, "action_u", action_u, tok.shape)
    rnd = v.ints(op, "random_tokens", random_tokens, shape=tok.shape, low=0)
    mid = v.integer(op, "mask_token_id", mask_token_id, low=0)
    prob = v.real(op, "mask_prob", mask_prob, low=0.0, high=1.0)
    able = v.mask(op, "maskable", maskable, shape=tok.shape)
    return tok, su, au, rnd, mid, prob, np.ones(tok.shape, bool) if able is None else able


MLM_MASK_BELOW = 0.8
MLM_RANDOM_BELOW = 0.9
"""BERT's 80/10/10 split of the selected positions: ``action_u < 0.8`` → mask token,
``0.8 ≤ action_u < 0.9`` → random token, otherwise unchanged."""


@reference("training")
def mlm_mask(tokens, select_u, action_u, random_tokens, mask_token_id, mask_prob=0.15,
             maskable=None):
    """BERT corruption (Devlin et al. 2019; seed 000: hide part of the input and train
    the model to predict it), driven by given uniform draws in ``[0, 1)``:

    ``selected = maskable ∧ (select_u < mask_prob)``;
    ``labels = tokens`` where selected, else −100;
    ``inputs = mask_token_id`` where selected ∧ ``action_u < 0.8``, ``random_tokens``
    where selected ∧ ``0.8 ≤ action_u < 0.9``, else ``tokens``.

    The draws are compared exactly (as given, in their dtype) with the real thresholds.
    Returns ``(inputs, labels)``, both int64 ``[B, T]``.
    """
    tok, su, au, rnd, mid, prob, able = _check_mlm(tokens, select_u, action_u, random_tokens,
                                                   mask_token_id, mask_prob, maskable)
    selected = able & (su < prob)
    labels = np.where(selected, tok, IGNORE)
    inputs = np.where(selected & (au < MLM_MASK_BELOW), mid,
                      np.where(selected & (au >= MLM_MASK_BELOW) & (au < MLM_RANDOM_BELOW),
                               rnd, tok))
    return inputs.astype(np.int64), labels.astype(np.int64)


# -- sampling ----------------------------------------------------------------------

def _check_sample_logits(op: str, x: np.ndarray, temp: float) -> None:
    """No NaN or ``+inf`` logit, at least one logit above ``−inf`` per row (``−inf`` = a
    token that is never drawn), and every finite logit still finite after ``/ T``:
    otherwise there is no distribution to sample from."""
    with np.errstate(over="ignore", invalid="ignore"):
        bad = np.isnan(x) | np.isposinf(x) | (np.isfinite(x) & ~np.isfinite(
            x / (temp or 1.0)))
    if bad.any():
        v.fail(op, "logits", "no NaN or +inf, and finite after division by the temperature",
               f"{x[bad].ravel()[0]} at index {np.argwhere(bad)[0].tolist()}")
    empty = ~np.any(x > -np.inf, axis=1)
    if empty.any():
        v.fail(op, "logits", "at least one logit above -inf per row",
               f"row {int(np.argmax(empty))} all -inf")


def _check_sample(logits, u, temperature, top_k, top_p, min_p=0.0):
    op = "sample_token"
    x = v.floats(op, "logits", logits, ndim=2)
    if x.shape[1] < 1:
        v.fail(op, "logits", "at least one token (V >= 1)", f"shape {x.shape}")
    uu = _unit_draws(op, "u", u, (x.shape[0],))
    temp = v.real(op, "temperature", temperature, low=0.0)
    if not math.isfinite(temp):
        v.fail(op, "temperature", "a finite number >= 0", repr(temperature))
    _check_sample_logits(op, x, temp)
    k = v.integer(op, "top_k", top_k, low=0)
    pp = v.real(op, "top_p", top_p, low=0.0, high=1.0)
    mp = v.real(op, "min_p", min_p, low=0.0, high=1.0)
    return x, uu, temp, k, pp, mp


def sorted_probs(logits: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """``(order, p[order])``: ``p = softmax(logits/T)`` sorted by probability descending,
    ties by token id ascending (a stable sort of ``−p``)."""
    p = softmax(logits / fl(temperature), -1)
    order = np.argsort(-p, axis=-1, kind="stable")
    return order, np.take_along_axis(p, order, axis=-1)


def _renormalised(ps: np.ndarray, keep: np.ndarray) -> np.ndarray:
    kept = np.where(keep, ps, 0)
    return kept / np.sum(kept, axis=-1, keepdims=True)


def filter_sorted(ps: np.ndarray, top_k: int, top_p: float, min_p: float = 0.0) -> np.ndarray:
    """Top-k, top-p, then min-p on sorted probabilities ``ps`` (rows descending), each
    renormalised.

    Top-k keeps ranks ``< top_k`` (all for 0); top-p keeps the shortest prefix whose
    mass reaches ``top_p``: rank ``j`` stays iff the mass strictly before it is
    ``< top_p``, rank 0 always. ``top_p = 1`` keeps everything. Min-p (Nguyen et al.
    2024) then keeps the tokens whose renormalised probability is ``≥ min_p ×`` the
    largest (rank 0); ``min_p = 0`` keeps everything.
    """
    rank = np.arange(ps.shape[-1])
    ps = _renormalised(ps, rank < (top_k or ps.shape[-1]))
    if top_p < 1:
        before = np.concatenate([np.zeros_like(ps[..., :1]), np.cumsum(ps, axis=-1)[..., :-1]],
                                axis=-1)
        ps = _renormalised(ps, (before < top_p) | (rank == 0))
    if min_p > 0:
        ps = _renormalised(ps, (ps >= fl(min_p) * ps[..., :1]) | (rank == 0))
    return ps


def _inverse_cdf(ps: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Per row, the first rank whose cumulative mass exceeds ``u`` (at most the last rank
    with nonzero mass, should rounding keep the total at or below ``u``)."""
    cum = np.cumsum(ps, axis=-1)
    first = np.sum(cum <= u[:, None], axis=-1)
    last = np.sum(ps > 0, axis=-1) - 1
    return np.minimum(first, last)


@reference("training")
def sample_token(logits, u, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """Inverse-CDF sampling from the filtered ``p = softmax(logits/T)``, one token per row.

    Order the tokens by ``p`` descending, then id ascending; keep the first ``top_k``
    (0 = all, Fan et al. 2018) and renormalise; keep the shortest prefix whose mass is
    ``≥ top_p`` (at least one; Holtzman et al. 2020) and renormalise; return the first
    token in that order whose cumulative mass exceeds the given draw ``u ∈ [0, 1)``.
    ``temperature = 0`` is greedy: the arg max of the logits, lowest id among ties.
    The filtered distribution is ``sampling_probs`` (sampling family), computed by the
    same function (``lmspec.sampling.sorted_filtered``).
    ``top_p = 1`` disables the nucleus filter; ``top_p = 0`` keeps one token. Then min-p
    (Nguyen et al. 2024): keep the tokens whose renormalised probability is ``≥ min_p ×``
    the largest and renormalise (``min_p ∈ [0, 1]``; 0 changes nothing).
    Logits may hold ``−inf`` (a token never drawn) but not NaN or ``+inf``; each row needs
    one logit above ``−inf``, and ``logits/T`` must not overflow (``ValueError``). ``B = 0``
    gives an empty result.
    """
    x, uu, temp, k, pp, mp = _check_sample(logits, u, temperature, top_k, top_p, min_p)
    # the very distribution of sampling_probs (sampling family, declared after this one)
    from .sampling import sorted_filtered

    order, ps = sorted_filtered(x, temp, k, pp, mp)
    rank = _inverse_cdf(ps, uu)
    return np.take_along_axis(order, rank[:, None], axis=-1)[:, 0].astype(np.int64)
