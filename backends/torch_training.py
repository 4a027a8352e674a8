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
    "sample_token": (
        "inverse-CDF sampling composed from torch.softmax, a stable descending torch.sort, "
        "cumsum, torch.where and torch.searchsorted, in the dtype under test."),
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
        "float64 p = 3 from |g| ≈ 6e102 or below ≈ 1e-103); (3) for p other than 1, 2, inf "
        "the per-tensor norms and their norm each raise a power sum S to fl(1/p), off by "
        "|1/p − fl(1/p)|·|ln S| relatively: measured 6.5 ulp at total 0.005 (float64), "
        "14 ulp at 1e11 (float32), 17 ulp at 1e30 (float64). total_norm and the clipped "
        "values otherwise conform (p = 1, 2, inf at ordinary magnitudes)."),
}


def kl_divergence(log_p, log_q):
    absent = torch.exp(log_p) == 0
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    terms = F.kl_div(torch.where(absent, zero, log_q), torch.where(absent, zero, log_p),
                     reduction="none", log_target=True)
    return torch.where(absent, zero, terms).sum() / log_p.shape[0]


def distillation_loss(student_logits, teacher_logits, targets, temperature=1.0, alpha=0.5):
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                    F.log_softmax(teacher_logits / temperature, dim=-1),
                    reduction="batchmean", log_target=True)
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


def sample_token(logits, u, temperature=1.0, top_k=0, top_p=1.0):
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    p, order = torch.sort(torch.softmax(logits / temperature, dim=-1), dim=-1,
                          descending=True, stable=True)
    rank = torch.arange(p.shape[-1], device=p.device)
    p = _renormalised(p, rank < (top_k or p.shape[-1]))
    if top_p < 1:
        before = torch.cumsum(p, dim=-1) - p
        p = _renormalised(p, (before < top_p) | (rank == 0))
    cum = torch.cumsum(p, dim=-1)
    first = torch.searchsorted(cum, u[:, None].to(cum.dtype), right=True)[:, 0]
    last = (p > 0).sum(dim=-1) - 1
    pick = torch.minimum(first, last)
    return order.gather(-1, pick[:, None])[:, 0]
