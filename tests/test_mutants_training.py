"""The suite catches realistic one-line bugs in the training family (mutation testing)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

import torch
import torch.nn.functional as F

from lmspec.backends import torch_training as good
from lmspec.backends.torch_backend import TorchBackend
from lmspec.conformance.harness import checks_of

from .conftest import run_checks


def distillation_without_t_squared(student_logits, teacher_logits, targets, temperature=1.0,
                                   alpha=0.5):
    soft = F.kl_div(F.log_softmax(student_logits / temperature, -1),
                    F.log_softmax(teacher_logits / temperature, -1),
                    reduction="batchmean", log_target=True)
    return alpha * F.cross_entropy(student_logits, targets) + (1 - alpha) * soft


def distillation_kl_reversed(student_logits, teacher_logits, targets, temperature=1.0,
                             alpha=0.5):
    """KL(student ‖ teacher): the arguments of F.kl_div swapped."""
    soft = F.kl_div(F.log_softmax(teacher_logits / temperature, -1),
                    F.log_softmax(student_logits / temperature, -1),
                    reduction="batchmean", log_target=True)
    return alpha * F.cross_entropy(student_logits, targets) + (1 - alpha) * temperature**2 * soft


def kl_reversed(log_p, log_q):
    return good.kl_divergence(log_q, log_p)


def clip_per_tensor(grads, max_norm, norm_type=2.0):
    """Each array clipped on its own norm; the total reported is still the global one."""
    params = [torch.zeros_like(g) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    total = torch.nn.utils.get_total_norm(grads, norm_type)
    for p in params:
        torch.nn.utils.clip_grad_norm_([p], max_norm, norm_type=norm_type)
    return tuple(p.grad for p in params), total


def top_p_drops_crossing_token(logits, u, temperature=1.0, top_k=0, top_p=1.0):
    """Keeps only the tokens whose cumulative mass is still below top_p (the token that
    crosses top_p is dropped; at least one is kept)."""
    if temperature == 0 or top_p >= 1:
        return good.sample_token(logits, u, temperature, top_k, top_p)
    p, order = torch.sort(torch.softmax(logits / temperature, -1), dim=-1, descending=True,
                          stable=True)
    rank = torch.arange(p.shape[-1])
    p = good._renormalised(p, rank < (top_k or p.shape[-1]))
    p = good._renormalised(p, (torch.cumsum(p, -1) < top_p) | (rank == 0))
    cum = torch.cumsum(p, -1)
    pick = torch.minimum(torch.searchsorted(cum, u[:, None].to(cum.dtype), right=True)[:, 0],
                         (p > 0).sum(-1) - 1)
    return order.gather(-1, pick[:, None])[:, 0]


def _mlm_bins(tokens, select_u, action_u, random_tokens, mask_token_id, mask_prob, maskable,
              to_mask, to_random):
    selected = select_u < mask_prob
    if maskable is not None:
        selected = selected & maskable
    labels = torch.where(selected, tokens, torch.full_like(tokens, -100))
    inputs = torch.where(selected & to_mask, torch.full_like(tokens, mask_token_id), tokens)
    return torch.where(selected & to_random, random_tokens, inputs), labels


def mlm_random_and_keep_swapped(tokens, select_u, action_u, random_tokens, mask_token_id,
                                mask_prob=0.15, maskable=None):
    """0.8 ≤ u < 0.9 keeps the token and u ≥ 0.9 draws a random one."""
    return _mlm_bins(tokens, select_u, action_u, random_tokens, mask_token_id, mask_prob,
                     maskable, action_u < 0.8, action_u >= 0.9)


def mlm_mask_and_random_swapped(tokens, select_u, action_u, random_tokens, mask_token_id,
                                mask_prob=0.15, maskable=None):
    """The random-token bin first: u < 0.1 random, 0.1 ≤ u < 0.9 mask token."""
    return _mlm_bins(tokens, select_u, action_u, random_tokens, mask_token_id, mask_prob,
                     maskable, (action_u >= 0.1) & (action_u < 0.9), action_u < 0.1)


CLIP_PROPERTIES = ("clipped_norm_at_most_max_norm", "one_common_factor")

MUTANTS = {
    "distillation without T²": ("distillation_loss", distillation_without_t_squared, None),
    "distillation with KL(student ‖ teacher)": ("distillation_loss", distillation_kl_reversed,
                                                None),
    "kl_divergence in the wrong direction": ("kl_divergence", kl_reversed, None),
    # torch's own clipping deviates in its forward values (1e-6), so the mutant must be
    # caught by the reference-free properties, not by the forward comparison
    "per-tensor clipping": ("clip_grad_norm", clip_per_tensor, CLIP_PROPERTIES),
    "top-p dropping the crossing token": ("sample_token", top_p_drops_crossing_token, None),
    "80/10/10: random and keep bins swapped": ("mlm_mask", mlm_random_and_keep_swapped, None),
    "80/10/10: mask and random bins swapped": ("mlm_mask", mlm_mask_and_random_swapped, None),
}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutant_is_caught(run_mutant, name):
    op, fn, checks = MUTANTS[name]
    results = run_mutant(op, fn, dtypes=("float32",), checks=checks, max_examples=60)
    failing = [r for r in results if r["status"] == "fail"]
    assert failing, f"{name} went unnoticed: {[(r['check'], r['status']) for r in results]}"
    assert all(r["op"] == op for r in failing)
    assert failing[0]["counterexample"] is not None and failing[0]["reproduce"]


@pytest.mark.parametrize("op", sorted({m[0] for m in MUTANTS.values()}))
def test_unmutated_backend_conforms(op):
    """The control: the same checks pass on torch-cpu itself (its declared clipping and KL
    deviations aside: clip's 1e-6, F.kl_div's NaN for p = 0), so the mutants above fail
    because of their bug."""
    backend = TorchBackend("torch-cpu", "cpu", ("float32", "float64"))
    results = run_checks(backend, op, ("float32",), checks_of(op), max_examples=60)
    bad = [(r["check"], r["status"], r["message"]) for r in results
           if r["status"] not in ("pass", "deviation")]
    assert not bad, bad
    declared = {("clip_grad_norm", "forward"), ("kl_divergence", "forward"),
                ("kl_divergence", "vjp")}
    assert all(r["status"] == "pass" for r in results if (op, r["check"]) not in declared)
