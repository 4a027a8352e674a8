"""Hand-written torch kernels: tensors in, tensors out, lmspec's catalogue signatures.

torch is imported inside each kernel, so that importing the plugin stays cheap.
"""

from __future__ import annotations


def softmax(x, axis=-1):
    """p_i = exp(x_i − m) / Σ_j exp(x_j − m) with m = max_j x_j (Goodfellow et al.,
    *Deep Learning*, §4.1). float16/bfloat16 inputs are accumulated in float32 and the
    result rounded once to the input dtype, as fused GPU kernels do."""
    import torch

    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    m = work.amax(dim=axis, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all −inf rows: NaN as spec
    e = torch.exp(work - m)
    return (e / e.sum(dim=axis, keepdim=True)).to(x.dtype)
