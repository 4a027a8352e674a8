"""Recurrent family on torch's own kernels.

Cells: ``torch.rnn_tanh_cell`` / ``torch.rnn_relu_cell``, ``torch.lstm_cell``,
``torch.gru_cell``. Sequences: ``torch._VF.rnn_tanh`` / ``rnn_relu`` / ``lstm`` / ``gru``,
the functions ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` call with their ``_flat_weights``,
whose order (layer by layer, forward before reverse, ``(w_ih, w_hh, b_ih, b_hh)``) is
exactly the contract's flat ``weights`` order; on a CUDA device they run cuDNN. The
language models go through ``F.embedding``, ``F.linear``, ``F.cross_entropy`` and
``F.binary_cross_entropy_with_logits``.

torch has no kernel for the GRU with the reset gate applied before the hidden matmul
(``linear_before_reset=False``): that variant is composed from ``F.linear``,
``torch.sigmoid`` and ``torch.tanh`` (see ``NOTES``), never answered with the other one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmspec.backends.torch_attention import AT_100, half_intermediates

NOTES = {
    "gru_cell": "linear_before_reset=False has no torch kernel: composed from F.linear, "
                "torch.sigmoid and torch.tanh (n = tanh(W_in x + b_in + W_hn(r*h) + b_hn)); "
                "linear_before_reset=True is torch.gru_cell.",
    "gru": "linear_before_reset=False has no torch kernel (cuDNN and nn.GRU apply the reset "
           "after the hidden matmul): unrolled in Python over the composed cell of gru_cell; "
           "linear_before_reset=True is torch._VF.gru (nn.GRU's kernel, cuDNN on CUDA).",
    "rnn_lm_loss": "nn.RNN's kernel (torch._VF.rnn_tanh) run block by block with the hidden "
                   "state detached between blocks of bptt_truncation steps; F.cross_entropy.",
}

_CELL_WHY = (
    "torch's CPU recurrent kernels for half tensors (torch.rnn_tanh_cell / lstm_cell / "
    "gru_cell, and torch._VF.rnn_* / lstm / gru, which nn.RNN / nn.LSTM / nn.GRU call) run "
    "each gate's matmuls as half GEMMs: the gate pre-activations x·W_ihᵀ + b_ih and "
    "h·W_hhᵀ + b_hh, the gates, the cell state and the hidden state between steps are "
    "tensors of the input dtype (rounded to it); the backward likewise.")
_LM_WHY = (
    "composed of torch's kernels in the input dtype (F.embedding, the recurrent or linear "
    "layers, torch.tanh, F.cross_entropy / F.binary_cross_entropy_with_logits): every "
    "sub-op's output, hidden states and logits included, is a tensor of the input dtype "
    "(rounded to it), and the backward likewise.")

def DEVIATIONS(device: str) -> dict:  # noqa: N802 - the backend's DEVIATIONS hook
    """torch's CPU kernels in float16/bfloat16 (measured on the CPU only)."""
    return _CPU_HALF if device == "cpu" else {}


_CPU_HALF = (
    half_intermediates("rnn_cell/*/{dtype}", _CELL_WHY, {"float16": 3.61, "bfloat16": 102})
    | half_intermediates("lstm_cell/*/{dtype}", _CELL_WHY, {"float16": 3.34, "bfloat16": 3.49})
    | half_intermediates("gru_cell/*/{dtype}", _CELL_WHY, {"float16": 5.87, "bfloat16": 2.39})
    | half_intermediates("rnn/*/{dtype}", _CELL_WHY, {"float16": 34.1, "bfloat16": 4.26})
    | half_intermediates("lstm/*/{dtype}", _CELL_WHY, {"float16": 1.66, "bfloat16": 12.0})
    | half_intermediates("gru/*/{dtype}", _CELL_WHY, {"float16": 3.43, "bfloat16": 15.8})
    | half_intermediates("window_lm/vjp/{dtype}", _LM_WHY, {"float16": 68.3, "bfloat16": 5.30})
    | half_intermediates("window_lm/forward/{dtype}", _LM_WHY, {"bfloat16": 78.0})
    | half_intermediates("window_lm/forward/{dtype}", _LM_WHY, {"float16": 16.3}, AT_100, "0.321")
    | half_intermediates("rnn_lm_loss/*/{dtype}", _LM_WHY, {"float16": 2.64, "bfloat16": 88.5})
    | half_intermediates("text_classifier_loss/*/{dtype}", _LM_WHY,
                         {"float16": 128, "bfloat16": 118})
)

_CELLS = {"tanh": torch.rnn_tanh_cell, "relu": torch.rnn_relu_cell}
_SEQS = {"tanh": torch._VF.rnn_tanh, "relu": torch._VF.rnn_relu}


def rnn_cell(x, h, W_ih, W_hh, b_ih, b_hh, nonlinearity="tanh"):
    return _CELLS[nonlinearity](x, h, W_ih, W_hh, b_ih, b_hh)


def lstm_cell(x, h, c, W_ih, W_hh, b_ih, b_hh):
    return torch.lstm_cell(x, (h, c), W_ih, W_hh, b_ih, b_hh)


def _gru_cell_reset_first(x, h, W_ih, W_hh, b_ih, b_hh):
    """``n = tanh(W_in x + b_in + W_hn(r ⊙ h) + b_hn)``: composed, torch has no kernel."""
    H = h.shape[-1]
    xr, xz, xn = F.linear(x, W_ih, b_ih).chunk(3, dim=-1)
    hr, hz = F.linear(h, W_hh[:2 * H], b_hh[:2 * H]).chunk(2, dim=-1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + F.linear(r * h, W_hh[2 * H:], b_hh[2 * H:]))
    return torch.lerp(n, h, z)


def gru_cell(x, h, W_ih, W_hh, b_ih, b_hh, linear_before_reset=True):
    if linear_before_reset:
        return torch.gru_cell(x, h, W_ih, W_hh, b_ih, b_hh)
    return _gru_cell_reset_first(x, h, W_ih, W_hh, b_ih, b_hh)


def _vf(kernel, x, hx, weights, num_layers, bidirectional):
    """``kernel(input, hx, flat weights, has_biases, num_layers, dropout, train,
    bidirectional, batch_first)``: the call ``nn.RNNBase.forward`` makes."""
    return kernel(x, hx, list(weights), True, num_layers, 0.0, False, bidirectional, True)


def rnn(x, h0, weights, num_layers=1, bidirectional=False, nonlinearity="tanh"):
    out, h_n = _vf(_SEQS[nonlinearity], x, h0, weights, num_layers, bidirectional)
    return out, h_n


def lstm(x, h0, c0, weights, num_layers=1, bidirectional=False):
    out, h_n, c_n = _vf(torch._VF.lstm, x, (h0, c0), weights, num_layers, bidirectional)
    return out, h_n, c_n


def _gru_unrolled(x, h0, weights, num_layers, bidirectional):
    """The reset-before-matmul GRU over time, layers and directions (no torch kernel)."""
    D = 2 if bidirectional else 1
    T = x.shape[1]
    inp, finals = x, []
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            idx = layer * D + d
            h, ys = h0[idx], [None] * T
            for t in (reversed(range(T)) if d else range(T)):
                h = ys[t] = _gru_cell_reset_first(inp[:, t], h, *weights[4 * idx:4 * idx + 4])
            finals.append(h)
            outs.append(torch.stack(ys, dim=1))
        inp = torch.cat(outs, dim=-1)
    return inp, torch.stack(finals)


def gru(x, h0, weights, num_layers=1, bidirectional=False, linear_before_reset=True):
    if linear_before_reset:
        out, h_n = _vf(torch._VF.gru, x, h0, weights, num_layers, bidirectional)
        return out, h_n
    return _gru_unrolled(x, h0, weights, num_layers, bidirectional)


def window_lm(context, E, W1, b1, W2, W3, b3):
    x = F.embedding(context, E).flatten(1)
    logits = F.linear(torch.tanh(F.linear(x, W1, b1)), W2, b3)
    return logits if W3 is None else logits + F.linear(x, W3)


def rnn_lm_loss(tokens, E, h0, W_ih, W_hh, b_ih, b_hh, W_out, b_out, bptt_truncation=None):
    x = F.embedding(tokens[:, :-1], E)
    T = x.shape[1]
    k = bptt_truncation or T
    h, outs = h0[None], []
    for start in range(0, T, k):
        if start:
            h = h.detach()  # truncated BPTT: the state handed to the next block is a constant
        out, h = _vf(torch._VF.rnn_tanh, x[:, start:start + k], h, (W_ih, W_hh, b_ih, b_hh),
                     1, False)
        outs.append(out)
    logits = F.linear(torch.cat(outs, dim=1), W_out, b_out)
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def text_classifier_loss(tokens, mask, labels, E, W, b, u):
    emb = F.embedding(tokens, E)
    m = torch.ones(tokens.shape, dtype=E.dtype, device=E.device) if mask is None else \
        mask.to(E.dtype)
    xbar = (emb * m[..., None]).sum(dim=1) / m.sum(dim=1).clamp(min=1)[:, None]
    s = F.linear(torch.tanh(F.linear(xbar, W, b)), u[None])[:, 0]
    return F.binary_cross_entropy_with_logits(s, labels.to(s.dtype))
