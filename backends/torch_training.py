"""Training family on torch's own functions: ``F.kl_div``, ``F.cross_entropy``,
``torch.nn.utils.clip_grad_norm_``, and ``torch.sort``/``cumsum``/``searchsorted``/``where``
for masking and inverse-CDF sampling (no ``torch.multinomial``: the draws are given)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100

NOTES = {
    "kl_divergence": (
        "F.kl_div(log_target=True) computes exp(t)·(t − input), which is NaN for a term "
        "with log_p = −inf (0·−inf) or with p = 0 and log_q = −inf; the spec counts such "
        "terms as 0. The backend zeroes those inputs and terms around F.kl_div "
        "(reduction='none', then sum/N) so that value and gradient follow the spec."),
    "distillation_loss": (
        "F.log_softmax of the logits over T, F.kl_div (with the kl_divergence fix-up above, "
        "as a teacher probability can underflow to 0) and F.cross_entropy. The logits are "
        "shifted by their row maximum before the division by T (log_softmax does not see "
        "the shift): float16 logits/T overflows to inf, and the loss to NaN, once "
        "|logits|/T > 65504 (3276/0.05), where the shifted form stays finite."),
    "sample_token": (
        "inverse-CDF sampling composed from torch.softmax, a stable descending torch.sort, "
        "cumsum, torch.where and torch.searchsorted, in the dtype under test; softmax of "
        "(logits − max)/T, as float16 logits/T overflows (66/0.001) and softmax of inf "
        "is NaN. min_p: a torch.where against min_p × the largest filtered probability."),
}

DEVIATIONS = {
    "clip_grad_norm/forward": (
        "torch.nn.utils.clip_grad_norm_ differs from the spec in three measured ways: "
        "(1) it scales by min(1, max_norm/(total + 1e-6)), not min(1, max_norm/total): "
        "clipped gradients are smaller by the relative amount 1e-6/(total + 1e-6) (1e-6 at "
        "total = 1), and a total in (max_norm − 1e-6, max_norm] is clipped although the "
        "spec leaves it unchanged; (2) the norm sums |g|^p without rescaling, so it is "
        "inf (all gradients zeroed) or 0 (nothing clipped) where |g|^p over- or underflows "
        "although the norm itself is representable (float32 p = 3 from |g| ≈ 7e12; "
        "float64 p = 3 from |g| ≈ 6e102 or below ≈ 1e-103); total_norm and the clipped "
        "values otherwise conform; (3) in float16 "
        "the coefficient max_norm/(total + 1e-6) is computed as max_norm·reciprocal(total "
        "+ 1e-6) (torch's Python-scalar division), and the reciprocal overflows to inf for "
        "total < 1.43e-5 (measured): all-zero gradients with max_norm = 0 come back NaN "
        "(0·inf), and 0 < max_norm < total < 1.43e-5 is not clipped at all (coefficient 1)."),
    "distillation_loss/vjp/float16": (
        "F.kl_div's backward (log_target=True: exp(t)·(t − input) under autograd) multiplies "
        "the cotangent by (t − input) before exp(t); in float16 that product overflows to "
        "inf once |cot|·(1 − α)·T²/N·|ln p − ln q| > 65504, although the gradient (times p, "
        "then through log_softmax and 1/T) is representable. Measured: grad teacher_logits "
        "−inf where the spec gives −2186 (s = [8744, 0], t = [0, 0], T = 7.5, α = 0, "
        "cot = 1) and −416.5 (s = [1666, 0], T = 40); all 45 float16 vjp failures in 3000 "
        "drawn examples were of this kind, none in bfloat16."),
    "clip_grad_norm/one_common_factor/float16": (
        "torch.nn.utils.clip_grad_norm_ in float16 turns all-zero gradients into NaN when "
        "max_norm = 0: its coefficient max_norm/(total + 1e-6) is max_norm·reciprocal(1e-6), "
        "and that reciprocal (≈ 9.9e5) overflows float16 to inf, 0·inf = NaN (deviation (3) "
        "of clip_grad_norm/forward)."),
}


def _scaled(logits, temperature):
    """``(logits − max)/T`` per row: what ``softmax``/``log_softmax`` of ``logits/T`` sees
    (both are shift-invariant), without the overflow of ``logits/T`` itself (float16:
    ``|logits|/T > 65504`` is ``inf``, and ``softmax`` of it NaN). The maximum is a
    constant to autograd, as the shift cancels mathematically."""
    return (logits - logits.amax(dim=-1, keepdim=True).detach()) / temperature


def kl_divergence(log_p, log_q):
    absent = torch.exp(log_p) == 0
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    terms = F.kl_div(torch.where(absent, zero, log_q), torch.where(absent, zero, log_p),
                     reduction="none", log_target=True)
    return torch.where(absent, zero, terms).sum() / log_p.shape[0]


def distillation_loss(student_logits, teacher_logits, targets, temperature=1.0, alpha=0.5):
    soft = kl_divergence(F.log_softmax(_scaled(teacher_logits, temperature), dim=-1),
                         F.log_softmax(_scaled(student_logits, temperature), dim=-1))
    hard = F.cross_entropy(student_logits, targets)
    return alpha * hard + (1 - alpha) * temperature**2 * soft


def clip_grad_norm(grads, max_norm, norm_type=2.0):
    params = [torch.zeros_like(g) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
    return tuple(p.grad for p in params), total


def mlm_mask(tokens, select_u, action_u, random_tokens, mask_token_id, mask_prob=0.15,
             maskable=None):
    selected = select_u < mask_prob
    if maskable is not None:
        selected = selected & maskable
    labels = torch.where(selected, tokens, torch.full_like(tokens, IGNORE))
    inputs = torch.where(selected & (action_u < 0.8), torch.full_like(tokens, mask_token_id),
                         tokens)
    swap = selected & (action_u >= 0.8) & (action_u < 0.9)
    return torch.where(swap, random_tokens, inputs), labels


def _renormalised(p, keep):
    p = torch.where(keep, p, torch.zeros_like(p))
    return p / p.sum(dim=-1, keepdim=True)


def sample_token(logits, u, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    p, order = torch.sort(torch.softmax(_scaled(logits, temperature), dim=-1), dim=-1,
                          descending=True, stable=True)
    rank = torch.arange(p.shape[-1], device=p.device)
    p = _renormalised(p, rank < (top_k or p.shape[-1]))
    if top_p < 1:
        before = torch.cumsum(p, dim=-1) - p
        p = _renormalised(p, (before < top_p) | (rank == 0))
    if min_p > 0:  # min-p (Nguyen et al. 2024) against the largest renormalised probability
        p = _renormalised(p, (p >= min_p * p[..., :1]) | (rank == 0))
    cum = torch.cumsum(p, dim=-1)
    first = torch.searchsorted(cum, u[:, None].to(cum.dtype), right=True)[:, 0]
    last = (p > 0).sum(dim=-1) - 1
    pick = torch.minimum(first, last)
    return order.gather(-1, pick[:, None])[:, 0]
