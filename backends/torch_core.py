"""Core family on torch's own kernels (``torch.softmax``, ``F.cross_entropy``, ``F.nll_loss``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lmspec import Deviation
from lmspec.backends.declared import one_element_deviations
from lmspec.backends.torch_attention import (
    call_arguments,
    half_intermediates,
    with_broader_predicates,
)


def softmax(x, axis=-1):
    return torch.softmax(x, dim=axis)


def log_softmax(x, axis=-1):
    return torch.log_softmax(x, dim=axis)


def logsumexp(x, axis=-1):
    return torch.logsumexp(x, dim=axis)


def cross_entropy(logits, targets, ignore_index=-100, label_smoothing=0.0):
    return F.cross_entropy(logits, targets, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)


def _token_log_probs(log_probs, tokens):
    """``log_probs[b, t, tokens[b, t]]`` through ``F.nll_loss`` (``[B, V, T]`` layout)."""
    return -F.nll_loss(log_probs.transpose(1, 2), tokens, reduction="none")


def sequence_log_prob(log_probs, tokens, mask=None):
    picked = _token_log_probs(log_probs, tokens)
    if mask is not None:
        picked = torch.where(mask, picked, torch.zeros_like(picked))
    return picked.sum(dim=1)


def perplexity(log_probs, tokens, mask=None):
    if mask is not None:
        tokens = torch.where(mask, tokens, torch.full_like(tokens, -100))
    return torch.exp(F.nll_loss(log_probs.transpose(1, 2), tokens, ignore_index=-100))


def smoothing_sum(logits, targets, ignore_index: int) -> float:
    """``Σ_rows Σ_c −log p[c]`` over the rows whose target is kept, in float64: the
    smoothing term that F.cross_entropy sums in the input dtype."""
    z = np.asarray(logits).astype(np.float64)
    z = z.reshape(-1, z.shape[-1]) if z.ndim > 1 else z[None]
    keep = np.asarray(targets).reshape(-1) != ignore_index
    with np.errstate(all="ignore"):
        lse = np.log(np.exp(z - z.max(axis=-1, keepdims=True)).sum(axis=-1)) + z.max(axis=-1)
        terms = (lse[:, None] - z).sum(axis=-1)
    return float(terms[keep].sum())


def smoothing_overflows(args, kwargs) -> bool:
    """label_smoothing > 0 and the smoothing sum reaches 6.0e4, where its float16 sum
    rounds to inf (measured: 57652 is finite, 65492 gives inf)."""
    a = call_arguments("cross_entropy", args, kwargs)
    return float(a["label_smoothing"]) > 0 and smoothing_sum(
        a["logits"], a["targets"], int(a["ignore_index"])) >= 6.0e4


SMOOTHING_OVERFLOW = (
    "F.cross_entropy with label_smoothing > 0 on the CPU sums the smoothing term "
    "Σ_rows Σ_c −log p[c] in float16, which overflows to inf although the mean and the loss "
    "fit: logits [9320, −36 × 7], target 0, ε = 0.1 give inf where the spec gives 818.65 "
    "(sum 65492), three rows [6000, −30 × 7] give inf (sum 126630; 528 when two of them are "
    "ignored), [8200, −36 × 7] (sum 57652) conforms: the sum over the kept rows overflows "
    "from about 6.0e4 (smoothing_overflows); the unsmoothed loss conforms.")


def DEVIATIONS(device: str) -> dict[str, Deviation]:  # noqa: N802 - the backend's DEVIATIONS hook
    """Known differences of torch's own kernels from the spec, per device (measured)."""
    devs = one_element_deviations("torch.softmax / torch.log_softmax / torch.logsumexp") | {
        key.format(op=op): dev
        for op, ratios in (("softmax", {"float16": 1.6, "bfloat16": 5.85}),
                           ("logsumexp", {"float16": 1.33, "bfloat16": 1.98}))
        for key, dev in half_intermediates(
            "{{op}}/vjp/{dtype}", "The backward of torch.softmax / torch.logsumexp is "
            "computed from the forward's output, a tensor of the input dtype: the "
            "probabilities it uses are rounded to it (measured: float16 softmax over [3, 0] "
            "with cotangent [1, 0] gives 0.0451050 where the spec gives 0.0451767, = y(1 − y) "
            "of the float16-rounded y = 0.952637). A one-element axis holding ±inf (NaN, "
            "declared for the op) keeps its predicate beside this bound.", ratios).items()
    } | half_intermediates(
        "log_softmax/vjp/{dtype}",
        "The backward of torch.log_softmax is g − exp(y)·Σg from the forward's output y, a "
        "tensor of the input dtype (measured at 100 examples: bfloat16 grad 0.632813 where "
        "the spec gives 0.629182). A one-element axis holding ±inf (NaN, declared for the "
        "op) keeps its predicate beside this bound.",
        {"float16": 1.06, "bfloat16": 2.20}) | half_intermediates(
        "logsumexp/forward/{dtype}",
        "torch.logsumexp's CPU kernel for half tensors sums exp(x − max) in the input dtype: "
        "measured float16 0 where the spec gives −0.000212 (the sum 1 + 1e-4 rounds to 1).",
        {"float16": 477, "bfloat16": 259}) | half_intermediates(
        "cross_entropy/*/{dtype}",
        "F.cross_entropy is nll_loss(log_softmax(z)) on the CPU: the log-probabilities are a "
        "tensor of the input dtype (rounded to it) before the pick and the mean, and the "
        "backward works from them.", {"float16": 135, "bfloat16": 182}) | half_intermediates(
        "perplexity/*/{dtype}",
        "F.nll_loss returns the mean negative log-likelihood as a tensor of the input dtype, "
        "and torch.exp of that rounded mean amplifies its rounding by the perplexity's "
        "magnitude.", {"float16": 8.16, "bfloat16": 4.76})
    if device != "cpu":
        return with_broader_predicates(devs)
    # float16's forward: the half-precision bound beside the smoothing overflow's predicate
    ce = devs["cross_entropy/*/float16"]
    return with_broader_predicates({**devs, "cross_entropy/forward/float16": (
        ce, Deviation(SMOOTHING_OVERFLOW, applies=smoothing_overflows))})
