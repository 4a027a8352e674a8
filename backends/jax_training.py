"""Training family in JAX. JAX itself has none of these as library functions (they live in
Optax and Flax); each is composed from ``jax.nn`` / ``jnp`` as JAX code writes it, with
the composition stated in ``NOTES``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from lmspec import Deviation
from lmspec.backends.declared import kl_backward_overflows, merged
from lmspec.backends.jax_attention import AT_30, OTHERWISE, half_findings, half_intermediates

IGNORE = -100

NOTES = {
    "kl_divergence": "Σ p·(log_p − log_q) / N with p = jnp.exp(log_p), terms with p = 0 "
    "set to 0 by jnp.where (their inputs replaced by 0 first, so that no NaN reaches the "
    "gradient).",
    "distillation_loss": "jax.nn.log_softmax of the logits over T, kl_divergence as above, "
    "cross-entropy from jax.nn.log_softmax. The logits are shifted by their row maximum "
    "(a constant to jax.vjp, as the shift cancels) before the division by T: float16 "
    "logits/T overflows once |logits|/T > 65504.",
    "clip_grad_norm": "jnp.linalg.norm(ord=p) of each flattened gradient, jnp.linalg.norm of "
    "those norms, then g·(max_norm/total) where total > max_norm (jnp.where).",
    "mlm_mask": "jnp.where on the comparisons of the given uniform draws.",
    "sample_token": "inverse-CDF sampling composed from jax.nn.softmax of (logits − max)/T, "
    "a stable descending jnp.argsort, jnp.cumsum and jnp.where; temperature 0 is "
    "jnp.argmax.",
}


def _power_sum_leaves_range(args, kwargs) -> bool:
    """Some nonzero ``|g|^p`` (finite ``p``) overflows the dtype's range once summed, or
    underflows below its smallest normal number."""
    p = kwargs.get("norm_type", 2.0)
    if np.isinf(p):
        return False
    for g in args[0]:
        a = np.abs(np.asarray(g, dtype=np.float64))
        a = a[a > 0]
        if a.size == 0:
            continue
        info = ml_dtypes.finfo(np.asarray(g).dtype)
        logs = p * np.log(a)
        if (logs.max() + np.log(sum(x.size for x in args[0])) >= np.log(float(info.max))
                or logs.min() <= np.log(float(info.tiny))):
            return True
    return False


DEVIATIONS = {
    "clip_grad_norm/forward": Deviation(
        "jnp.linalg.norm(ord=p) sums |g|^p without rescaling, so the total norm is inf (all "
        "gradients clipped to 0) or 0 (nothing clipped) where |g|^p over- or underflows "
        "although the norm is representable; measured: float32, p = 2, gradients of "
        "magnitude ≈ 1e19 come back 0 where the spec gives 2.88e17 after clipping; float64 "
        "|g| ≈ 1e-154 gives total_norm 0 where the spec gives 1.05e-154. Covered: examples "
        "with some nonzero |g|^p outside the dtype's normal range.",
        applies=_power_sum_leaves_range),
    "distillation_loss/vjp/float16": Deviation(
        "jax.vjp of the KL term p·(log p − log q) multiplies the cotangent by (log p − log q) "
        "before the factor p; in float16 that product overflows to inf once "
        "|cot|·(1 − α)·T²/N·|ln p − ln q| > 65504, although the gradient is representable. "
        "Measured: grad teacher_logits −inf where the spec gives −2186 (the same example and "
        "mechanism as torch's F.kl_div backward). Covered: examples where the product can "
        "pass 65504 for a drawn cotangent (|cot| ≤ 2).", applies=kl_backward_overflows),
} | half_intermediates(
    "kl_divergence/forward/{dtype}",
    "Σ p·(log_p − log_q) / N is evaluated in the input dtype (p = jnp.exp(log_p), the "
    "products and the sum are arrays of it; XLA CPU keeps half reductions in half).",
    {"float16": 1.50, "bfloat16": 2.11}, AT_30, "0.326") | half_intermediates(
    "kl_divergence/vjp/{dtype}",
    "jax.vjp of the same composition: the gradient terms are arrays of the input dtype.",
    {"bfloat16": 1.08}, AT_30, "0.320") | half_intermediates(
    "clip_grad_norm/forward/{dtype}",
    "jnp.linalg.norm sums |g|^p in the input dtype, and the clipping factor and the "
    "clipped gradients are arrays of it.", {"float16": 1.58, "bfloat16": 2.00}, AT_30,
    OTHERWISE)
DEVIATIONS = merged(DEVIATIONS, half_findings({
    "distillation_loss/forward": {"float16": 44.7, "bfloat16": 17.1},
    "distillation_loss/vjp": {"float16": 19.1, "bfloat16": 342},
}, "jax.nn.log_softmax of the logits over T, the KL and cross-entropy terms and their sums "
    "are arrays of the input dtype (rounded to it), and jax.vjp's backward likewise; the "
    "float16 KL-backward overflow keeps its predicate beside this bound."))

STATIC = {
    "clip_grad_norm": ("norm_type",),
    "sample_token": ("temperature", "top_p", "min_p"),
}
DYNAMIC = {"mlm_mask": ("mask_token_id",)}


def _scaled(logits, temperature):
    """``(logits − max)/T`` per row: what ``softmax``/``log_softmax`` of ``logits/T`` sees,
    without the float16 overflow of ``logits/T`` itself; the maximum is a constant to
    ``jax.vjp`` (the shift cancels mathematically)."""
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    return (logits - top) / temperature


def kl_divergence(log_p, log_q):
    p = jnp.exp(log_p)
    present = p > 0
    zero = jnp.zeros_like(log_p)
    lp, lq = jnp.where(present, log_p, zero), jnp.where(present, log_q, zero)
    terms = jnp.where(present, jnp.exp(lp) * (lp - lq), zero)
    return jnp.sum(terms) / log_p.shape[0]


def distillation_loss(student_logits, teacher_logits, targets, temperature=1.0, alpha=0.5):
    soft = kl_divergence(jax.nn.log_softmax(_scaled(teacher_logits, temperature), axis=-1),
                         jax.nn.log_softmax(_scaled(student_logits, temperature), axis=-1))
    lp = jax.nn.log_softmax(student_logits, axis=-1)
    hard = -jnp.mean(jnp.take_along_axis(lp, targets[:, None], axis=-1))
    return alpha * hard + (1 - alpha) * temperature**2 * soft


def clip_grad_norm(grads, max_norm, norm_type=2.0):
    norms = jnp.stack([jnp.linalg.norm(g.ravel(), ord=norm_type) for g in grads])
    total = jnp.linalg.norm(norms, ord=norm_type)
    coef = jnp.where(total > max_norm, max_norm / total, jnp.ones_like(total))
    return tuple(g * coef.astype(g.dtype) for g in grads), total


def mlm_mask(tokens, select_u, action_u, random_tokens, mask_token_id, mask_prob=0.15,
             maskable=None):
    selected = select_u < mask_prob
    if maskable is not None:
        selected = selected & maskable
    labels = jnp.where(selected, tokens, IGNORE)
    inputs = jnp.where(selected & (action_u < 0.8), mask_token_id, tokens)
    swap = selected & (action_u >= 0.8) & (action_u < 0.9)
    return jnp.where(swap, random_tokens, inputs), labels


def _renormalised(p, keep):
    p = jnp.where(keep, p, jnp.zeros_like(p))
    return p / jnp.sum(p, axis=-1, keepdims=True)


def sample_token(logits, u, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    probs = jax.nn.softmax(_scaled(logits, temperature), axis=-1)
    order = jnp.argsort(probs, axis=-1, stable=True, descending=True)
    p = jnp.take_along_axis(probs, order, axis=-1)
    rank = jnp.arange(p.shape[-1])
    p = _renormalised(p, rank < (top_k or p.shape[-1]))
    if top_p < 1:
        cum = jnp.cumsum(p, axis=-1)
        before = jnp.concatenate([jnp.zeros_like(p[..., :1]), cum[..., :-1]], axis=-1)
        p = _renormalised(p, (before < top_p) | (rank == 0))
    if min_p > 0:
        p = _renormalised(p, (p >= min_p * p[..., :1]) | (rank == 0))
    cum = jnp.cumsum(p, axis=-1)
    first = jnp.sum(cum <= u[:, None].astype(cum.dtype), axis=-1)
    last = jnp.sum(p > 0, axis=-1) - 1
    pick = jnp.minimum(first, last)
    return jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0]
