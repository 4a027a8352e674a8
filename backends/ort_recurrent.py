"""Recurrent family as ONNX graphs: the ``RNN``, ``LSTM`` and ``GRU`` operators (ONNX
operator specs, opset 22), one node per layer, run by ONNX Runtime's kernels.

Weights are re-packed into ONNX's layout: per layer ``W[D, G·H, I]``, ``R[D, G·H, H]``,
``B[D, 2·G·H]`` (input biases then recurrent biases), directions forward then reverse,
with the gate blocks reordered from the contract's (LSTM ``i f g o``, GRU ``r z n``) to
ONNX's (LSTM ``i o f c``, GRU ``z r h``). ONNX's sequences are time-major ``[T, B, I]`` with
``Y[T, D, B, H]``: Transposes and a Reshape give the contract's ``[B, T, D·H]``; layers
above the first read the previous layer's output. A cell is the same node run for one
step. ``linear_before_reset`` is the GRU node's attribute of that name (both values).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lmspec.backends.onnxruntime_backend import Runtime, as_int64, scalar_out

NOTES = {
    "rnn": "ONNX RNN, one node per layer (direction forward or bidirectional), activations "
           "Tanh or Relu.",
    "lstm": "ONNX LSTM, one node per layer; gate blocks re-packed i f g o → i o f c; no "
            "peepholes.",
    "gru": "ONNX GRU, one node per layer; gate blocks re-packed r z n → z r h; "
           "linear_before_reset passed as the node's attribute.",
    "rnn_cell": "ONNX RNN run for one time step.",
    "lstm_cell": "ONNX LSTM run for one time step.",
    "gru_cell": "ONNX GRU run for one time step.",
    "window_lm": "ONNX Gather (embeddings), Reshape, Gemm (transB), Tanh, Gemm, Add.",
    "rnn_lm_loss": "ONNX Gather, RNN (tanh) over the whole sequence, Gemm, "
                   "SoftmaxCrossEntropyLoss (mean). bptt_truncation changes gradients only, "
                   "not the value, so the forward graph ignores it.",
    "text_classifier_loss": "ONNX Gather, Where/ReduceSum (masked mean), Gemm, Tanh, MatMul; "
                            "binary cross-entropy with logits as mean(Softplus(s) − y·s).",
}

_GATES = {"RNN": (1, [0]), "LSTM": (4, [0, 3, 1, 2]), "GRU": (3, [1, 0, 2])}


def _pack(kind: str, weights: Sequence[np.ndarray], layer: int, D: int) -> list[np.ndarray]:
    """``W, R, B`` of one layer in ONNX's layout, gate blocks in ONNX's order."""
    G, order = _GATES[kind]

    def gates(a: np.ndarray) -> np.ndarray:
        blocks = np.split(a, G, axis=0)
        return np.concatenate([blocks[i] for i in order], axis=0)

    groups = [weights[4 * (layer * D + d):4 * (layer * D + d) + 4] for d in range(D)]
    W = np.stack([gates(g[0]) for g in groups])
    R = np.stack([gates(g[1]) for g in groups])
    B = np.stack([np.concatenate([gates(g[2]), gates(g[3])]) for g in groups])
    return [W, R, B]


def _sequence(rt: Runtime, kind: str, x: np.ndarray, states: Sequence[np.ndarray],
              weights: Sequence[np.ndarray], num_layers: int, bidirectional: bool,
              **attrs: Any) -> list[np.ndarray]:
    """``(out[B,T,D·H], state_n[L·D,B,H] for each state)`` of a stacked ``kind`` network."""
    D = 2 if bidirectional else 1
    H = states[0].shape[-1]
    feeds: list[tuple[str, np.ndarray]] = [("x", x)]
    for layer in range(num_layers):
        feeds += [(f"{w}{layer}", a) for w, a in zip("WRB", _pack(kind, weights, layer, D))]
        feeds += [(f"s{k}_{layer}", s[layer * D:(layer + 1) * D]) for k, s in enumerate(states)]
    n_states = len(states)
    key = (kind, H, num_layers, bidirectional,
           tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(attrs.items())))

    def build(b: Any, _: list[str]) -> list[str]:
        inp = b.op("Transpose", "x", perm=[1, 0, 2])  # [T, B, I]
        finals: list[list[str]] = [[] for _ in range(n_states)]
        for layer in range(num_layers):
            init = [f"s{k}_{layer}" for k in range(n_states)]
            outs = b.op(kind, inp, f"W{layer}", f"R{layer}", f"B{layer}", "", *init,
                        outputs=1 + n_states, hidden_size=H,
                        direction="bidirectional" if bidirectional else "forward", **attrs)
            for k in range(n_states):
                finals[k].append(outs[1 + k])
            y = b.op("Transpose", outs[0], perm=[0, 2, 1, 3])  # [T, B, D, H]
            inp = b.op("Reshape", y, b.ints(0, 0, -1))  # [T, B, D·H]
        out = b.op("Transpose", inp, perm=[1, 0, 2])
        return [out] + [f[0] if len(f) == 1 else b.op("Concat", *f, axis=0) for f in finals]

    return rt.run(key, feeds, build)


def _activations(nonlinearity: str, bidirectional: bool) -> list[str]:
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"rnn: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    return [nonlinearity.capitalize()] * (2 if bidirectional else 1)


def rnn(rt: Runtime, x, h0, weights, num_layers=1, bidirectional=False, nonlinearity="tanh"):
    out, h_n = _sequence(rt, "RNN", x, [h0], weights, num_layers, bidirectional,
                         activations=_activations(nonlinearity, bidirectional))
    return out, h_n


def lstm(rt: Runtime, x, h0, c0, weights, num_layers=1, bidirectional=False):
    out, h_n, c_n = _sequence(rt, "LSTM", x, [h0, c0], weights, num_layers, bidirectional)
    return out, h_n, c_n


def gru(rt: Runtime, x, h0, weights, num_layers=1, bidirectional=False,
        linear_before_reset=True):
    out, h_n = _sequence(rt, "GRU", x, [h0], weights, num_layers, bidirectional,
                         linear_before_reset=int(bool(linear_before_reset)))
    return out, h_n


def rnn_cell(rt: Runtime, x, h, W_ih, W_hh, b_ih, b_hh, nonlinearity="tanh"):
    return rnn(rt, x[:, None], h[None], (W_ih, W_hh, b_ih, b_hh),
               nonlinearity=nonlinearity)[1][0]


def lstm_cell(rt: Runtime, x, h, c, W_ih, W_hh, b_ih, b_hh):
    _, h_n, c_n = lstm(rt, x[:, None], h[None], c[None], (W_ih, W_hh, b_ih, b_hh))
    return h_n[0], c_n[0]


def gru_cell(rt: Runtime, x, h, W_ih, W_hh, b_ih, b_hh, linear_before_reset=True):
    return gru(rt, x[:, None], h[None], (W_ih, W_hh, b_ih, b_hh),
               linear_before_reset=linear_before_reset)[1][0]


def window_lm(rt: Runtime, context, E, W1, b1, W2, W3, b3):
    feeds = [("context", as_int64(context)), ("E", E), ("W1", W1), ("b1", b1), ("W2", W2),
             ("b3", b3)] + ([] if W3 is None else [("W3", W3)])

    def build(b: Any, _: list[str]) -> str:
        x = b.op("Reshape", b.op("Gather", "E", "context", axis=0), b.ints(0, -1))
        hidden = b.op("Tanh", b.op("Gemm", x, "W1", "b1", transB=1))
        logits = b.op("Gemm", hidden, "W2", "b3", transB=1)
        return logits if W3 is None else b.op("Add", logits, b.op("Gemm", x, "W3", transB=1))

    return rt.run(("window_lm", W3 is None), feeds, build)[0]


def rnn_lm_loss(rt: Runtime, tokens, E, h0, W_ih, W_hh, b_ih, b_hh, W_out, b_out,
                bptt_truncation=None):
    tokens = as_int64(tokens)
    feeds = [("inp", tokens[:, :-1]), ("tgt", tokens[:, 1:]), ("E", E), ("h0", h0[None]),
             ("W", W_ih[None]), ("R", W_hh[None]), ("B", np.concatenate([b_ih, b_hh])[None]),
             ("W_out", W_out), ("b_out", b_out)]
    H = h0.shape[-1]

    def build(b: Any, _: list[str]) -> str:
        x = b.op("Transpose", b.op("Gather", "E", "inp", axis=0), perm=[1, 0, 2])
        y = b.op("RNN", x, "W", "R", "B", "", "h0", hidden_size=H)  # [T, 1, B, H]
        y = b.op("Transpose", b.op("Squeeze", y, b.ints(1)), perm=[1, 0, 2])  # [B, T, H]
        logits = b.op("Gemm", b.op("Reshape", y, b.ints(-1, H)), "W_out", "b_out", transB=1)
        return b.op("SoftmaxCrossEntropyLoss", logits, b.op("Reshape", "tgt", b.ints(-1)),
                    reduction="mean")

    return scalar_out(rt.run(("rnn_lm_loss", H), feeds, build))


def text_classifier_loss(rt: Runtime, tokens, mask, labels, E, W, b, u):
    feeds = [("tokens", as_int64(tokens)), ("labels", labels), ("E", E), ("W", W), ("b", b),
             ("u", u)] + ([] if mask is None else [("mask", np.asarray(mask, dtype=bool))])

    def build(g: Any, _: list[str]) -> str:
        emb = g.op("Gather", "E", "tokens", axis=0)  # [B, T, d]
        if mask is None:
            total = g.op("ReduceSum", emb, g.ints(1), keepdims=0)
            count = g.op("Cast", g.op("Gather", g.op("Shape", "tokens"), g.ints(1)),
                         to=_float_elem(g))
        else:
            m = g.op("Unsqueeze", "mask", g.ints(2))
            total = g.op("ReduceSum", g.op("Where", m, emb, g.const(0.0)), g.ints(1),
                         keepdims=0)
            ones = g.op("Where", "mask", g.const(1.0), g.const(0.0))
            count = g.op("Max", g.op("ReduceSum", ones, g.ints(1), keepdims=1), g.const(1.0))
        xbar = g.op("Div", total, count)
        s = g.op("MatMul", g.op("Tanh", g.op("Gemm", xbar, "W", "b", transB=1)), "u")  # [B]
        per_row = g.op("Sub", g.op("Softplus", s), g.op("Mul", "labels", s))
        return g.op("ReduceMean", per_row, keepdims=0)

    return scalar_out(rt.run(("text_classifier_loss", mask is None), feeds, build))


def _float_elem(b: Any) -> int:
    from lmspec.backends.onnxruntime_backend import elem_type

    return elem_type(b.float_type)
