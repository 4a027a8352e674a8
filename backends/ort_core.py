"""Core family as ONNX graphs: ``Softmax``, ``LogSoftmax``, ``ReduceLogSumExp``,
``SoftmaxCrossEntropyLoss`` and ``NegativeLogLikelihoodLoss`` (ONNX operator specs,
opset 13–23), run by ONNX Runtime's own kernels.

``cross_entropy`` with ``label_smoothing > 0`` is unsupported: ONNX's
``SoftmaxCrossEntropyLoss`` has no smoothing attribute, and composing the smoothed loss
from other nodes would no longer test the runtime's loss kernel.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import lmspec
from lmspec.backends.declared import one_element_deviations
from lmspec.backends.onnxruntime_backend import Runtime, as_int64, scalar_out

NOTES = {
    "softmax": "ONNX Softmax (opset 13, any axis).",
    "log_softmax": "ONNX LogSoftmax (opset 13, any axis).",
    "logsumexp": "ONNX ReduceLogSumExp (opset 18, axes as an input, keepdims=0).",
    "cross_entropy": "ONNX SoftmaxCrossEntropyLoss (reduction='mean', ignore_index). "
                     "label_smoothing > 0 is unsupported: the ONNX op has no smoothing. "
                     "onnxruntime's inference build has no kernel for it (nor for "
                     "NegativeLogLikelihoodLoss: both are in its training build) and runs "
                     "ONNX's function body of the op (LogSoftmax, GatherElements, Where, "
                     "ReduceSum, Div).",
    "sequence_log_prob": "ONNX GatherElements on the vocabulary axis, Where (mask), ReduceSum "
                         "over time.",
    "perplexity": "ONNX NegativeLogLikelihoodLoss (reduction='mean', ignore_index=-100 on "
                  "the tokens the mask leaves out, [B,V,T] layout via Transpose; run as "
                  "ONNX's function body of the op, see cross_entropy), then Exp.",
}


def _inf_beside_negatives(args: Any, kwargs: Any) -> bool:
    """Some reduced slice holds an infinity and its finite elements are all negative."""
    x = np.asarray(args[0], dtype=np.float64)
    axis = kwargs.get("axis", args[1] if len(args) > 1 else -1)
    if x.ndim == 0:
        return False
    finite_max = np.max(np.where(np.isfinite(x), x, -np.inf), axis=axis)
    return bool((np.isinf(x).any(axis=axis) & (finite_max < 0)).any())


_LSE_WHY = (
    "ONNX Runtime's CPU ReduceLogSumExp (ReduceAggregatorLogSumExp, reduction_ops.h) starts "
    "its running max at 0 when the first element of a slice is infinite and skips infinite "
    "elements when updating it, so a slice holding -inf whose finite elements are all "
    "negative is summed unshifted, log(sum(exp(x))), which underflows: [-inf, -718] gives "
    "-718 + 1.6e-12 (float64), [-inf, -745] gives -744.44 (error 0.56), and in float32 "
    "[-inf, -700] gives -inf. Slices without an infinity conform.")


def DEVIATIONS(provider: str) -> dict[str, Any]:  # noqa: N802 - the backend's DEVIATIONS hook
    """Known differences of ONNX Runtime's kernels from the spec (measured)."""
    if provider != "CPUExecutionProvider":
        return {}
    return {f"logsumexp/forward/{dt}": lmspec.Deviation(_LSE_WHY, _inf_beside_negatives)
            for dt in ("float32", "float64")} | one_element_deviations(
                "ONNX Runtime 1.32's CPU Softmax / LogSoftmax", vjp=False)


def softmax(rt: Runtime, x: np.ndarray, axis: int = -1) -> np.ndarray:
    return rt.run(("Softmax", axis), [("x", x)],
                  lambda b, n: b.op("Softmax", n[0], axis=axis))[0]


def log_softmax(rt: Runtime, x: np.ndarray, axis: int = -1) -> np.ndarray:
    return rt.run(("LogSoftmax", axis), [("x", x)],
                  lambda b, n: b.op("LogSoftmax", n[0], axis=axis))[0]


def logsumexp(rt: Runtime, x: np.ndarray, axis: int = -1) -> np.ndarray:
    ax = axis % x.ndim if x.ndim else 0
    return rt.run(("ReduceLogSumExp", ax), [("x", x)],
                  lambda b, n: b.op("ReduceLogSumExp", n[0], b.ints(ax), keepdims=0))[0]


def cross_entropy(rt: Runtime, logits: np.ndarray, targets: np.ndarray,
                  ignore_index: int = -100, label_smoothing: float = 0.0) -> np.ndarray:
    if label_smoothing:
        raise NotImplementedError("ONNX SoftmaxCrossEntropyLoss has no label smoothing")
    ii = int(ignore_index)
    return scalar_out(rt.run(
        ("SoftmaxCrossEntropyLoss", ii), [("logits", logits), ("targets", as_int64(targets))],
        lambda b, n: b.op("SoftmaxCrossEntropyLoss", *n, reduction="mean", ignore_index=ii)))


def sequence_log_prob(rt: Runtime, log_probs: np.ndarray, tokens: np.ndarray,
                      mask: np.ndarray | None = None) -> np.ndarray:
    feeds = [("log_probs", log_probs), ("tokens", as_int64(tokens))]
    if mask is not None:
        feeds.append(("mask", np.asarray(mask, dtype=bool)))

    def build(b: Any, n: list[str]) -> str:
        idx = b.op("Unsqueeze", n[1], b.ints(2))
        picked = b.op("Squeeze", b.op("GatherElements", n[0], idx, axis=2), b.ints(2))
        if mask is not None:
            picked = b.op("Where", n[2], picked, b.const(0.0))
        return b.op("ReduceSum", picked, b.ints(1), keepdims=0)

    return rt.run(("sequence_log_prob", mask is not None), feeds, build)[0]


def perplexity(rt: Runtime, log_probs: np.ndarray, tokens: np.ndarray,
               mask: np.ndarray | None = None) -> np.ndarray:
    feeds = [("log_probs", log_probs), ("tokens", as_int64(tokens))]
    if mask is not None:
        feeds.append(("mask", np.asarray(mask, dtype=bool)))

    def build(b: Any, n: list[str]) -> str:
        tok = n[1] if mask is None else b.op("Where", n[2], n[1], b.const(-100, "int64"))
        nll = b.op("NegativeLogLikelihoodLoss", b.op("Transpose", n[0], perm=[0, 2, 1]), tok,
                   reduction="mean", ignore_index=-100)
        return b.op("Exp", nll)

    return scalar_out(rt.run(("perplexity", mask is not None), feeds, build))
