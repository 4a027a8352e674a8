"""Sampling family on torch: filters as torch users write them (``torch.sort`` with
``stable=True``, ``cumsum``, ``torch.where``), ``torch.multinomial`` with a
``torch.Generator`` seeded per call for the samplers with their own random numbers, and the
chain rejection sampler of speculative decoding in vectorised torch (the form of vLLM's
``RejectionSampler``: ``u·q(x) < p(x)``, then a draw from ``max(p − q, 0)``).

Half-precision inputs are computed in float32, as production samplers do (vLLM casts the
logits to float32 before sampling): CONTRACT §6's model of half precision.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NOTES = {
    "sampling_probs": (
        "torch.softmax of (logits − max)/T in float32 for half inputs, a stable descending "
        "torch.sort (ties by id), top-k by rank, top-p on cumsum, min-p against the "
        "largest renormalised probability, each renormalised; scattered back to id order."),
    "draw_tokens": (
        "torch.multinomial(sampling_probs, n, replacement=True) with a torch.Generator "
        "seeded with the call's seed; temperature 0 repeats torch.argmax."),
    "speculative_accept": (
        "vectorised chain rejection: accept while u·q(x) < p(x) (q(x) = 0 rejects), the first "
        "rejection draws from max(p − q, 0) (p if all zero), the bonus from p_K; draws are "
        "torch.searchsorted on the cumulative mass times u."),
    "draw_speculative": (
        "the same chain, one per draft chain, with torch.rand and torch.multinomial from a "
        "torch.Generator seeded with the call's seed."),
}


def _work(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _renormalised(p: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    p = torch.where(keep, p, torch.zeros_like(p))
    return p / p.sum(dim=-1, keepdim=True)


def _probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    x = _work(logits)
    if temperature == 0:
        return torch.nn.functional.one_hot(torch.argmax(x, dim=-1), x.shape[-1]).to(x.dtype)
    z = (x - x.max(dim=-1, keepdim=True).values) / temperature
    p, order = torch.sort(torch.softmax(z, dim=-1), dim=-1, descending=True, stable=True)
    rank = torch.arange(p.shape[-1], device=p.device)
    p = _renormalised(p, rank < (top_k or p.shape[-1]))
    if top_p < 1:
        before = torch.cumsum(p, dim=-1) - p
        p = _renormalised(p, (before < top_p) | (rank == 0))
    if min_p > 0:
        p = _renormalised(p, (p >= min_p * p[..., :1]) | (rank == 0))
    return torch.zeros_like(p).scatter(-1, order, p)


def sampling_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    return _probs(logits, temperature, top_k, top_p, min_p)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed) % 2**63)


def draw_tokens(logits, n, seed, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    p = _probs(logits, temperature, top_k, top_p, min_p)
    if temperature == 0:
        return torch.argmax(p, dim=-1, keepdim=True).expand(-1, int(n))
    return torch.multinomial(p, int(n), replacement=True, generator=_generator(seed, p.device))


Pick = Callable[[torch.Tensor], torch.Tensor]
"""``pick(weights[N, V]) -> ids[N]``: one draw per row from unnormalised weights."""


def chain(p: torch.Tensor, q: torch.Tensor, ids: torch.Tensor, accept_u: torch.Tensor,
          pick: Pick) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain rejection sampler on ``N`` chains: ``p[N, K+1, V]``, ``q[N, K, V]``,
    ``ids[N, K]``, ``accept_u[N, K]`` → ``(out[N, K+1], n_accepted[N])``."""
    n, kk = ids.shape
    rows = torch.arange(n, device=p.device)[:, None]
    cols = torch.arange(kk, device=p.device)[None, :]
    px, qx = p[rows, cols, ids], q[rows, cols, ids]
    accept = (qx > 0) & (accept_u * qx < px)
    n_acc = torch.cumprod(accept.to(torch.int64), dim=-1).sum(dim=-1)
    at = torch.clamp(n_acc, max=max(kk - 1, 0))
    if kk:
        resid = torch.clamp(p[rows[:, 0], at] - q[rows[:, 0], at], min=0)
        resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p[rows[:, 0], at])
        weights = torch.where((n_acc < kk)[:, None], resid, p[:, kk])
    else:
        weights = p[:, 0]
    drawn = pick(weights)
    pos = torch.arange(kk + 1, device=p.device)[None, :]
    padded = torch.cat([ids, torch.full((n, 1), -1, dtype=ids.dtype, device=ids.device)], -1)
    out = torch.where(pos < n_acc[:, None], padded, torch.full_like(padded, -1))
    out = torch.where(pos == n_acc[:, None], drawn[:, None], out)
    return out, n_acc


def speculative_accept(target_probs, draft_probs, draft_ids, accept_u, resample_u):
    p, q, u = _work(target_probs), _work(draft_probs), _work(resample_u)

    def inverse_cdf(w: torch.Tensor) -> torch.Tensor:
        cum = torch.cumsum(w, dim=-1)
        first = torch.searchsorted(cum, (u.to(cum.dtype) * cum[:, -1])[:, None], right=True)
        last = w.shape[-1] - 1 - torch.argmax((w.flip(-1) > 0).to(torch.int64), dim=-1)
        return torch.minimum(first[:, 0], last)

    return chain(p, q, draft_ids, _work(accept_u).to(p.dtype), inverse_cdf)


def draw_speculative(target_probs, draft_probs, draft_ids, seed):
    p, q = _work(target_probs), _work(draft_probs)
    b, n, kk = draft_ids.shape
    gen = _generator(seed, p.device)
    u = torch.rand((b * n, kk), generator=gen, dtype=p.dtype, device=p.device)
    out, _ = chain(p.repeat_interleave(n, 0), q.repeat_interleave(n, 0),
                   draft_ids.reshape(b * n, kk), u,
                   lambda w: torch.multinomial(w, 1, generator=gen)[:, 0])
    return out.reshape(b, n, kk + 1)
