"""Recurrent family: Elman RNN, LSTM and GRU cells and sequences, neural language models.

Sources: seed 001 (window-based neural LM, the Elman RNN and its BPTT derivation with
``σ = tanh``, the RNN-LM cross-entropy ``J = (1/T) Σ_t J_t``, GRU and LSTM equations);
seed 003 (the RNN-LM loss ``J_t = −ln ŷ_t[x_{t+1}]``, LSTM with biases, a second GRU
form, the averaged-embedding text classifier); Elman (1990); Hochreiter & Schmidhuber
(1997) with the forget gate of Gers et al. (2000); Cho et al. (2014) for the GRU;
Bengio et al. (2003) for the window LM; Williams & Peng (1990) for truncated BPTT.

Gate layout and flat weight order are those of CONTRACT §2 (and of cuDNN/torch):
LSTM blocks ``i, f, g, o``; GRU blocks ``r, z, n``; ``weights`` layer by layer, the
forward direction before the reverse one, each ``(W_ih, W_hh, b_ih, b_hh)``.

Where the seeds disagree the catalogue chooses as follows.

* GRU reset placement. Seed 001 writes the candidate as ``tanh(r ∘ (U h) + W x)``: the
  reset gate multiplies the *result* of the hidden matmul. That is
  ``linear_before_reset=True``, the form cuDNN and torch implement, hence the default.
  Seed 003 writes ``tanh(W_h (r ∘ h) + U_h x + b_h)``: the reset gate multiplies ``h``
  *before* the matmul, the original form of Cho et al. (2014); it is
  ``linear_before_reset=False`` (ONNX's default). The two are different functions.
* GRU update. Seed 003 writes ``h_t = (1 − u_t) h_{t−1} + z_t h̃_t`` (with a stray ``u``
  for ``z``): the same model with ``z`` relabelled as ``1 − z``. The catalogue follows
  seed 001 and torch: ``h' = (1 − z) ⊙ n + z ⊙ h``, so ``z → 1`` keeps the state.
* Binary cross-entropy. Seed 003 writes ``J = −y ln ŷ + (1 − y) ln(1 − ŷ)``; the second
  term's sign is a typo (as written, J is unbounded below as ``ŷ → 1`` for ``y = 0``).
  The catalogue uses the Bernoulli negative log-likelihood
  ``J = −[y ln ŷ + (1 − y) ln(1 − ŷ)]``, evaluated stably as ``softplus(s) − y s``.

Sequence ops need at least one time step (``T ≥ 1``), and every cell and sequence op a
batch row (``B ≥ 1``) and a hidden unit (``H ≥ 1``); an empty one is a ``ValueError``.
(``I = 0``, an input of no features, is allowed: the input projection is then 0.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _validate as v
from ._catalogue import reference, vjp_rule
from ._precision import activation, fl
from ._recurrence import GRU as _GRU
from ._recurrence import LSTM as _LSTM
from ._recurrence import RNN as _RNN
from ._recurrence import Cell as _Cell
from ._recurrence import Layer, State, Weights, layer_bwd, layer_fwd
from .blocks import sigmoid
from .core import _cross_entropy_vjp, cross_entropy

WNAMES = ("W_ih", "W_hh", "b_ih", "b_hh")


def _affine(x: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``x Wᵀ + b`` (CONTRACT §1 convention)."""
    return x @ W.T + b


def _affine_back(dy: np.ndarray, x: np.ndarray, W: np.ndarray):
    """Gradients of ``y = x Wᵀ + b``: ``(∂x, ∂W, ∂b) = (dy W, dyᵀ x, Σ_batch dy)``."""
    return dy @ W, dy.T @ x, np.sum(dy, axis=0)


# -- validation -----------------------------------------------------------------------------

def _check_options(op: str, opts: dict[str, Any]) -> dict[str, Any]:
    if "nonlinearity" in opts:
        v.one_of(op, "nonlinearity", opts["nonlinearity"], ("tanh", "relu"))
    if "linear_before_reset" in opts:
        v.flag(op, "linear_before_reset", opts["linear_before_reset"])
    return opts



def _check_cell_weights(op: str, w: Sequence[Any], gates: int, in_size: int, H: int,
                        names: Sequence[str] = WNAMES) -> Weights:
    shapes = ((gates * H, in_size), (gates * H, H), (gates * H,), (gates * H,))
    return tuple(v.floats(op, nm, a, shape=s) for nm, a, s in zip(names, w, shapes, strict=True))  # type: ignore[return-value]


def _check_cell(op: str, cell: _Cell, x, states: Sequence[tuple[str, Any]], w):
    xa = v.floats(op, "x", x, ndim=2)
    v.positive_dims(op, "x", xa, {0: "B"})
    B = xa.shape[0]
    first = v.floats(op, states[0][0], states[0][1], ndim=2, shape=(B, None))
    v.positive_dims(op, states[0][0], first, {1: "H"})
    H = first.shape[1]
    st = (first,) + tuple(v.floats(op, nm, s, shape=(B, H)) for nm, s in states[1:])
    return xa, st, _check_cell_weights(op, w, cell.gates, xa.shape[1], H)


@dataclass(frozen=True)
class _Seq:
    """A validated sequence call: input, initial states ``[L·D, B, H]``, weights per
    ``(layer, direction)`` in the flat order."""

    x: np.ndarray
    states: State
    weights: tuple[Weights, ...]
    L: int
    D: int

    @property
    def H(self) -> int:
        return self.states[0].shape[2]


def _check_seq(op: str, cell: _Cell, x, states: Sequence[tuple[str, Any]], weights,
               num_layers, bidirectional) -> _Seq:
    L = v.integer(op, "num_layers", num_layers, low=1)
    D = 2 if v.flag(op, "bidirectional", bidirectional) else 1
    xa = v.floats(op, "x", x, ndim=3)
    B, T, I = xa.shape
    if T < 1:
        v.fail(op, "x", "at least one time step (T >= 1)", f"shape {xa.shape}")
    v.positive_dims(op, "x", xa, {0: "B"})
    first = v.floats(op, states[0][0], states[0][1], ndim=3, shape=(L * D, B, None))
    v.positive_dims(op, states[0][0], first, {2: "H"})
    H = first.shape[2]
    st = (first,) + tuple(v.floats(op, nm, s, shape=(L * D, B, H)) for nm, s in states[1:])
    if not isinstance(weights, (tuple, list)) or len(weights) != 4 * L * D:
        got = f"{type(weights).__name__} of length {len(weights)}" if isinstance(
            weights, (tuple, list)) else type(weights).__name__
        v.fail(op, "weights", f"a tuple of 4·L·D = {4 * L * D} arrays", got)
    ws = []
    for idx in range(L * D):
        layer, d = divmod(idx, D)
        names = [f"weights[{4 * idx + j}] ({nm}, layer {layer}{', reverse' if d else ''})"
                 for j, nm in enumerate(WNAMES)]
        ws.append(_check_cell_weights(op, weights[4 * idx:4 * idx + 4], cell.gates,
                                      I if layer == 0 else D * H, H, names))
    return _Seq(xa, st, tuple(ws), L, D)


# -- unrolling over layers and directions ----------------------------------------------------

def _unroll(cell: _Cell, s: _Seq, opts: dict[str, Any]):
    """Run every (layer, direction); returns ``(out, final states, layers)``.

    Layer ``ℓ`` reads ``[forward, reverse]`` outputs of layer ``ℓ−1`` (``x`` for ℓ = 0);
    output ``t`` of the reverse direction is written at index ``t``;
    ``h_n[ℓ·D + d]`` is the state after the last step that direction processed. Inside,
    sequences are time-major ``[T, B, ·]`` (see :mod:`lmspec._recurrence`)."""
    inp = np.ascontiguousarray(s.x.transpose(1, 0, 2))
    finals: list[list[np.ndarray]] = [[] for _ in range(cell.n_state)]
    layers: list[Layer] = []
    for layer in range(s.L):
        for d in range(s.D):
            idx = layer * s.D + d
            layers.append(layer_fwd(cell, inp, tuple(st[idx] for st in s.states),
                                    s.weights[idx], opts, reverse=bool(d)))
            for k, st in enumerate(layers[-1].finals):
                finals[k].append(st)
        outs = [lay.ys for lay in layers[-s.D:]]
        inp = outs[0] if s.D == 1 else np.concatenate(outs, axis=-1)
    out = np.ascontiguousarray(inp.transpose(1, 0, 2))
    return out, tuple(np.stack(f) for f in finals), layers


def _unroll_back(cell: _Cell, s: _Seq, opts: dict[str, Any], layers: list[Layer], d_out,
                 d_finals):
    """BPTT through time, directions and layers (top layer first).

    Each direction steps backwards through its processing order (:func:`layer_bwd`): the
    state gradient gains the output cotangent of that step, the step's backward maps it
    to the previous state, and the weight gradients are sums over steps. The input
    gradient of layer ``ℓ`` (summed over its directions) is the output cotangent of layer
    ``ℓ−1``. What is left at the start of each direction is the gradient of its initial
    state."""
    H = s.H
    d_init = [np.zeros_like(st) for st in s.states]
    dweights: list[Any] = [None] * (s.L * s.D)
    dy = d_out.transpose(1, 0, 2)
    for layer in reversed(range(s.L)):
        dx = None
        for d in range(s.D):
            idx = layer * s.D + d
            dxd, dstate, dweights[idx] = layer_bwd(
                cell, layers[idx], dy[..., d * H:(d + 1) * H], [df[idx] for df in d_finals],
                opts)
            dx = dxd if dx is None else dx + dxd
            for k, ds in enumerate(dstate):
                d_init[k][idx] = ds
        dy = dx
    return (np.ascontiguousarray(dy.transpose(1, 0, 2)), tuple(d_init),
            tuple(a for w in dweights for a in w))


def _cots(cot, like: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The cotangent of a tuple output, member by member (``None`` = zeros)."""
    return [np.zeros_like(a) if c is None else fl(c) for c, a in zip(cot, like, strict=True)]


# -- cells ----------------------------------------------------------------------------------

@reference("recurrent", diff=("x", "h", "W_ih", "W_hh", "b_ih", "b_hh"))
def rnn_cell(x, h, W_ih, W_hh, b_ih, b_hh, nonlinearity="tanh"):
    """``h' = f(x W_ihᵀ + b_ih + h W_hhᵀ + b_hh)``, ``f ∈ {tanh, relu}``.

    Elman (1990); seed 001 writes ``h_t = σ(W^{hh} h_{t−1} + W^{hx} x_t)`` and derives
    BPTT with ``σ = tanh``. Shapes ``x[B,I]``, ``h[B,H]``, ``W_ih[H,I]``, ``W_hh[H,H]``.
    """
    opts = _check_options("rnn_cell", {"nonlinearity": nonlinearity})
    xa, st, w = _check_cell("rnn_cell", _RNN, x, [("h", h)], (W_ih, W_hh, b_ih, b_hh))
    return layer_fwd(_RNN, xa[None], st, w, opts).ys[0]


@vjp_rule(rnn_cell)
def _rnn_cell_vjp(cot, x, h, W_ih, W_hh, b_ih, b_hh, nonlinearity="tanh"):
    """``∂a = c ⊙ f'(a)``; ``∂x = ∂a W_ih``, ``∂h = ∂a W_hh``, ``∂W_ih = ∂aᵀ x``,
    ``∂W_hh = ∂aᵀ h``, ``∂b_ih = ∂b_hh = Σ_batch ∂a``."""
    opts = _check_options("rnn_cell", {"nonlinearity": nonlinearity})
    xa, st, w = _check_cell("rnn_cell", _RNN, x, [("h", h)], (W_ih, W_hh, b_ih, b_hh))
    lay = layer_fwd(_RNN, xa[None], st, w, opts)
    dx, (dh,), dw = layer_bwd(_RNN, lay, None, (fl(cot),), opts)
    return {"x": dx[0], "h": dh, **dict(zip(WNAMES, dw, strict=True))}


@reference("recurrent", diff=("x", "h", "c", "W_ih", "W_hh", "b_ih", "b_hh"))
def lstm_cell(x, h, c, W_ih, W_hh, b_ih, b_hh):
    """``(h', c')`` of one LSTM step, gate blocks **i, f, g, o** (rows of ``W_ih[4H,I]``):

    ``[i f g o] = x W_ihᵀ + b_ih + h W_hhᵀ + b_hh``,
    ``c' = σ(f) ⊙ c + σ(i) ⊙ tanh(g)``, ``h' = σ(o) ⊙ tanh(c')``.

    Seed 001 (input/forget/output gates, new memory ``c̃``, no biases), seed 003 (with
    biases); Hochreiter & Schmidhuber (1997), forget gate of Gers et al. (2000). The block
    order is cuDNN's and torch's.
    """
    xa, st, w = _check_cell("lstm_cell", _LSTM, x, [("h", h), ("c", c)],
                            (W_ih, W_hh, b_ih, b_hh))
    return layer_fwd(_LSTM, xa[None], st, w, {}).finals


@vjp_rule(lstm_cell)
def _lstm_cell_vjp(cot, x, h, c, W_ih, W_hh, b_ih, b_hh):
    """BPTT of one step (:func:`lmspec._recurrence._lstm_back`); ``cot = (∂h', ∂c')``."""
    xa, st, w = _check_cell("lstm_cell", _LSTM, x, [("h", h), ("c", c)],
                            (W_ih, W_hh, b_ih, b_hh))
    lay = layer_fwd(_LSTM, xa[None], st, w, {})
    dx, (dh, dc), dw = layer_bwd(_LSTM, lay, None, _cots(cot, lay.finals), {})
    return {"x": dx[0], "h": dh, "c": dc, **dict(zip(WNAMES, dw, strict=True))}


@reference("recurrent", diff=("x", "h", "W_ih", "W_hh", "b_ih", "b_hh"))
def gru_cell(x, h, W_ih, W_hh, b_ih, b_hh, linear_before_reset=True):
    """``h'`` of one GRU step, gate blocks **r, z, n** (rows of ``W_ih[3H,I]``, ``W_hh[3H,H]``):

    ``r = σ(W_ir x + b_ir + W_hr h + b_hr)``, ``z = σ(W_iz x + b_iz + W_hz h + b_hz)``,
    ``n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))`` if ``linear_before_reset``
    (seed 001's ``tanh(r ∘ U h + W x)``; cuDNN/torch), else
    ``n = tanh(W_in x + b_in + W_hn (r ⊙ h) + b_hn)`` (seed 003; Cho et al. 2014),
    ``h' = (1 − z) ⊙ n + z ⊙ h`` (seed 001; seed 003's update is the same with ``z``
    relabelled ``1 − z``, see the module docstring).
    """
    opts = _check_options("gru_cell", {"linear_before_reset": linear_before_reset})
    xa, st, w = _check_cell("gru_cell", _GRU, x, [("h", h)], (W_ih, W_hh, b_ih, b_hh))
    return layer_fwd(_GRU, xa[None], st, w, opts).ys[0]


@vjp_rule(gru_cell)
def _gru_cell_vjp(cot, x, h, W_ih, W_hh, b_ih, b_hh, linear_before_reset=True):
    """BPTT of one step (:func:`lmspec._recurrence._gru_back`)."""
    opts = _check_options("gru_cell", {"linear_before_reset": linear_before_reset})
    xa, st, w = _check_cell("gru_cell", _GRU, x, [("h", h)], (W_ih, W_hh, b_ih, b_hh))
    lay = layer_fwd(_GRU, xa[None], st, w, opts)
    dx, (dh,), dw = layer_bwd(_GRU, lay, None, (fl(cot),), opts)
    return {"x": dx[0], "h": dh, **dict(zip(WNAMES, dw, strict=True))}


# -- sequences ------------------------------------------------------------------------------

def _seq_forward(op: str, cell: _Cell, x, states, weights, num_layers, bidirectional, opts):
    opts = _check_options(op, opts)
    s = _check_seq(op, cell, x, states, weights, num_layers, bidirectional)
    out, finals, _ = _unroll(cell, s, opts)
    return (out, *finals)


def _seq_vjp(op: str, cell: _Cell, cot, x, states, weights, num_layers, bidirectional, opts):
    opts = _check_options(op, opts)
    s = _check_seq(op, cell, x, states, weights, num_layers, bidirectional)
    out, finals, tape = _unroll(cell, s, opts)
    d_out, *d_finals = _cots(cot, (out, *finals))
    dx, d_init, dw = _unroll_back(cell, s, opts, tape, d_out, d_finals)
    return {"x": dx, **{nm: g for (nm, _), g in zip(states, d_init, strict=True)}, "weights": dw}


_SEQ_DOC = """

    ``x[B,T,I]``; initial states ``[L·D, B, H]``; ``weights`` the flat tuple
    ``(W_ih, W_hh, b_ih, b_hh)`` per layer, forward direction before reverse; layers above
    the first take input size ``D·H``. The reverse direction reads the sequence backwards
    and writes output ``t`` at index ``t``; ``out[B,T,D·H]`` concatenates
    ``[forward, reverse]``; final states are indexed ``layer·D + direction``. Multi-layer
    (stacked) RNNs: seed 001 and seed 003; bidirectional: seed 003 (Schuster & Paliwal 1997).
    """


def _seq_doc(fn):
    fn.__doc__ = (fn.__doc__ or "").rstrip() + _SEQ_DOC
    return fn


@reference("recurrent", diff=("x", "h0", "weights"))
@_seq_doc
def rnn(x, h0, weights, num_layers=1, bidirectional=False, nonlinearity="tanh"):
    """``(out, h_n)``: :func:`rnn_cell` unrolled over time, layers and directions."""
    return _seq_forward("rnn", _RNN, x, [("h0", h0)], weights, num_layers, bidirectional,
                        {"nonlinearity": nonlinearity})


@vjp_rule(rnn)
def _rnn_vjp(cot, x, h0, weights, num_layers=1, bidirectional=False, nonlinearity="tanh"):
    """BPTT (see :func:`_unroll_back`); ``cot = (∂out, ∂h_n)``."""
    return _seq_vjp("rnn", _RNN, cot, x, [("h0", h0)], weights, num_layers, bidirectional,
                    {"nonlinearity": nonlinearity})


@reference("recurrent", diff=("x", "h0", "c0", "weights"))
@_seq_doc
def lstm(x, h0, c0, weights, num_layers=1, bidirectional=False):
    """``(out, h_n, c_n)``: :func:`lstm_cell` unrolled over time, layers and directions."""
    return _seq_forward("lstm", _LSTM, x, [("h0", h0), ("c0", c0)], weights, num_layers,
                        bidirectional, {})


@vjp_rule(lstm)
def _lstm_vjp(cot, x, h0, c0, weights, num_layers=1, bidirectional=False):
    """BPTT (see :func:`_unroll_back`); ``cot = (∂out, ∂h_n, ∂c_n)``."""
    return _seq_vjp("lstm", _LSTM, cot, x, [("h0", h0), ("c0", c0)], weights, num_layers,
                    bidirectional, {})


@reference("recurrent", diff=("x", "h0", "weights"))
@_seq_doc
def gru(x, h0, weights, num_layers=1, bidirectional=False, linear_before_reset=True):
    """``(out, h_n)``: :func:`gru_cell` unrolled over time, layers and directions."""
    return _seq_forward("gru", _GRU, x, [("h0", h0)], weights, num_layers, bidirectional,
                        {"linear_before_reset": linear_before_reset})


@vjp_rule(gru)
def _gru_vjp(cot, x, h0, weights, num_layers=1, bidirectional=False, linear_before_reset=True):
    """BPTT (see :func:`_unroll_back`); ``cot = (∂out, ∂h_n)``."""
    return _seq_vjp("gru", _GRU, cot, x, [("h0", h0)], weights, num_layers, bidirectional,
                    {"linear_before_reset": linear_before_reset})


# -- neural language models -----------------------------------------------------------------

def _scatter_rows(ids: np.ndarray, rows: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``∂E`` of an embedding lookup ``E[ids]``: each row's gradient added to ``E[id]``."""
    g = np.zeros_like(like)
    np.add.at(g, ids.ravel(), rows.reshape(-1, like.shape[1]))
    return g


def _check_window(context, E, W1, b1, W2, W3, b3):
    op = "window_lm"
    Ea = v.floats(op, "E", E, ndim=2)
    v.positive_dims(op, "E", Ea, {0: "V", 1: "d"})
    V, d = Ea.shape
    ctx = v.ints(op, "context", context, ndim=2, low=0, high=V)
    v.positive_dims(op, "context", ctx, {0: "B", 1: "n-1"})
    n1d = ctx.shape[1] * d
    W1a = v.floats(op, "W1", W1, ndim=2, shape=(None, n1d))
    Hd = W1a.shape[0]
    b1a = v.floats(op, "b1", b1, shape=(Hd,))
    W2a = v.floats(op, "W2", W2, shape=(V, Hd))
    W3a = None if W3 is None else v.floats(op, "W3", W3, shape=(V, n1d))
    b3a = v.floats(op, "b3", b3, shape=(V,))
    return ctx, Ea, W1a, b1a, W2a, W3a, b3a


def _window_forward(ctx, E, W1, b1, W2, W3, b3):
    x = E[ctx].reshape(ctx.shape[0], -1)
    hid = activation(np.tanh(_affine(x, W1, b1)))
    logits = _affine(hid, W2, b3) + (0 if W3 is None else x @ W3.T)
    return x, hid, logits


@reference("recurrent", diff=("E", "W1", "b1", "W2", "W3", "b3"))
def window_lm(context, E, W1, b1, W2, W3, b3):
    """``logits = W2 tanh(W1 x + b1) + W3 x + b3`` (the ``W3 x`` term dropped when ``W3`` is
    ``None``), ``x = [E[w_1]; …; E[w_{n−1}]]`` the concatenated context embeddings.

    Bengio et al. (2003); seed 001 writes ``ŷ = softmax(W⁽²⁾ tanh(W⁽¹⁾x + b⁽¹⁾) + W⁽³⁾x + b⁽³⁾)``
    (the op returns the logits before the softmax). Shapes ``context[B,n−1]``, ``E[V,d]``,
    ``W1[Hd,(n−1)d]``, ``W2[V,Hd]``, ``W3[V,(n−1)d]``, ``b3[V]``; returns ``[B,V]``.
    ``B``, ``n − 1``, ``V`` and ``d`` are at least 1 (an empty one is a ``ValueError``).
    """
    return _window_forward(*_check_window(context, E, W1, b1, W2, W3, b3))[2]


@vjp_rule(window_lm)
def _window_lm_vjp(cot, context, E, W1, b1, W2, W3, b3):
    """With ``c = ∂logits``: ``∂W2 = cᵀ hid``, ``∂b3 = Σ c``, ``∂W3 = cᵀ x``,
    ``∂a = (c W2) ⊙ (1 − hid²)``, ``∂W1 = ∂aᵀ x``, ``∂b1 = Σ ∂a``,
    ``∂x = ∂a W1 + c W3``, and ``∂E[w] = Σ`` of the slices of ``∂x`` where ``w`` occurs."""
    ctx, Ea, W1a, b1a, W2a, W3a, b3a = _check_window(context, E, W1, b1, W2, W3, b3)
    x, hid, _ = _window_forward(ctx, Ea, W1a, b1a, W2a, W3a, b3a)
    c = fl(cot)
    dhid, dW2, db3 = _affine_back(c, hid, W2a)
    dx, dW1, db1 = _affine_back(dhid * (1 - hid * hid), x, W1a)
    grads = {"E": None, "W1": dW1, "b1": db1, "W2": dW2, "b3": db3}
    if W3a is not None:
        dx = dx + c @ W3a
        grads["W3"] = c.T @ x
    grads["E"] = _scatter_rows(ctx, dx, Ea)
    return grads


def _check_lm(tokens, E, h0, W_ih, W_hh, b_ih, b_hh, W_out, b_out, bptt_truncation):
    op = "rnn_lm_loss"
    Ea = v.floats(op, "E", E, ndim=2)
    v.positive_dims(op, "E", Ea, {0: "V", 1: "I"})
    V, I = Ea.shape
    tok = v.ints(op, "tokens", tokens, ndim=2, low=0, high=V)
    v.positive_dims(op, "tokens", tok, {0: "B"})
    B = tok.shape[0]
    if tok.shape[1] < 2:
        v.fail(op, "tokens", "shape [B, T+1] with T >= 1", f"shape {tok.shape}")
    h = v.floats(op, "h0", h0, ndim=2, shape=(B, None))
    v.positive_dims(op, "h0", h, {1: "H"})
    H = h.shape[1]
    w = _check_cell_weights(op, (W_ih, W_hh, b_ih, b_hh), 1, I, H)
    Wo = v.floats(op, "W_out", W_out, shape=(V, H))
    bo = v.floats(op, "b_out", b_out, shape=(V,))
    k = None if bptt_truncation is None else v.integer(op, "bptt_truncation",
                                                        bptt_truncation, low=1)
    return tok, Ea, h, w, Wo, bo, k


def _lm_forward(tok, E, h0, w, W_out, b_out):
    """Teacher forcing: step ``t`` reads ``E[tokens[:, t]]`` and predicts ``tokens[:, t+1]``."""
    lay = layer_fwd(_RNN, E[tok[:, :-1].T], (h0,), w, {})  # time-major [T, B, I]
    hidden = np.ascontiguousarray(lay.ys.transpose(1, 0, 2))
    logits = _affine(hidden, W_out, b_out)
    return hidden, logits, lay


@reference("recurrent", diff=("E", "h0", "W_ih", "W_hh", "b_ih", "b_hh", "W_out", "b_out"))
def rnn_lm_loss(tokens, E, h0, W_ih, W_hh, b_ih, b_hh, W_out, b_out, bptt_truncation=None):
    """``J = (1/(B·T)) Σ_{b,t} −ln softmax(h_t W_outᵀ + b_out)[tokens[b, t+1]]`` with
    ``h_t = tanh(E[tokens[:, t]] W_ihᵀ + b_ih + h_{t−1} W_hhᵀ + b_hh)``, ``h_{−1} = h0``.

    Seed 001 (``J = (1/T) Σ_t J_t``, ``J_t`` the cross-entropy of step ``t``) and seed 003
    (``J_t = −ln ŷ_t[x_{t+1}]``): a tanh Elman LM with teacher forcing, averaged over the
    batch too. ``bptt_truncation=k`` leaves the value unchanged and changes only the
    gradient (see the vjp). ``tokens[B,T+1]``, ``T ≥ 1``; ``B``, ``V``, ``I`` and ``H`` are at
    least 1 (an empty one is a ``ValueError``).
    """
    tok, Ea, h, w, Wo, bo, _ = _check_lm(tokens, E, h0, W_ih, W_hh, b_ih, b_hh, W_out, b_out,
                                         bptt_truncation)
    _, logits, _ = _lm_forward(tok, Ea, h, w, Wo, bo)
    return cross_entropy(logits.reshape(-1, Wo.shape[0]), tok[:, 1:].reshape(-1))


@vjp_rule(rnn_lm_loss)
def _rnn_lm_loss_vjp(cot, tokens, E, h0, W_ih, W_hh, b_ih, b_hh, W_out, b_out,
                     bptt_truncation=None):
    """BPTT from ``∂logits = c (softmax − onehot)/(B·T)`` (seed 001's ``ŷ − y``):
    ``∂W_out = Σ ∂logitsᵀ h_t``, ``∂b_out = Σ ∂logits``, ``∂h_t ∋ ∂logits_t W_out``, then
    backwards through the steps as in :func:`rnn_cell`.

    Truncated BPTT (CONTRACT §2, Williams & Peng 1990): with ``k`` the steps form blocks
    ``[0, k), [k, 2k), …`` (the last may be shorter). The state handed from one block to
    the next, ``h_{jk−1}``, is a constant for the step ``jk`` that reads it: the gradient
    that step ``jk`` would pass back to it is dropped. ``h_{jk−1}`` still gets the gradient
    of its own loss term, and ``h0`` its gradient through the first block.
    """
    tok, Ea, h, w, Wo, bo, k = _check_lm(tokens, E, h0, W_ih, W_hh, b_ih, b_hh, W_out, b_out,
                                         bptt_truncation)
    V = Wo.shape[0]
    hidden, logits, lay = _lm_forward(tok, Ea, h, w, Wo, bo)
    dlogits = _cross_entropy_vjp(cot, logits.reshape(-1, V), tok[:, 1:].reshape(-1))["logits"]
    dlogits = dlogits.reshape(logits.shape)
    dhidden, dW_out, db_out = _affine_back(dlogits.reshape(-1, V), hidden.reshape(
        -1, hidden.shape[-1]), Wo)
    dhidden = dhidden.reshape(hidden.shape)
    # block boundaries: the handed-over state is a constant (layer_bwd's ``trunc``)
    dX, (dh,), dw = layer_bwd(_RNN, lay, dhidden.transpose(1, 0, 2), (np.zeros_like(h),), {},
                              trunc=k)
    return {"E": _scatter_rows(tok[:, :-1].T, dX, Ea), "h0": dh,
            **dict(zip(WNAMES, dw, strict=True)), "W_out": dW_out, "b_out": db_out}


def _check_classifier(tokens, mask, labels, E, W, b, u):
    op = "text_classifier_loss"
    Ea = v.floats(op, "E", E, ndim=2)
    v.positive_dims(op, "E", Ea, {0: "V", 1: "d"})
    V, d = Ea.shape
    tok = v.ints(op, "tokens", tokens, ndim=2, low=0, high=V)
    v.positive_dims(op, "tokens", tok, {0: "B"})
    B, T = tok.shape
    m = v.mask(op, "mask", mask, shape=(B, T))
    m = np.ones((B, T), dtype=bool) if m is None else m
    y = v.floats(op, "labels", labels, shape=(B,))
    if np.any((y < 0) | (y > 1)) or np.any(np.isnan(y)):
        v.fail(op, "labels", "values in [0, 1]", f"{y.tolist()}")
    Wa = v.floats(op, "W", W, ndim=2, shape=(None, d))
    H = Wa.shape[0]
    return tok, m, y, Ea, Wa, v.floats(op, "b", b, shape=(H,)), v.floats(op, "u", u, shape=(H,))


def _classifier_forward(tok, m, E, W, b, u):
    count = np.maximum(np.sum(m, axis=1), 1).astype(E.dtype)
    xbar = np.sum(E[tok] * m[..., None], axis=1) / count[:, None]
    hid = activation(np.tanh(_affine(xbar, W, b)))
    return count, xbar, hid, hid @ u


@reference("recurrent", diff=("E", "W", "b", "u"))
def text_classifier_loss(tokens, mask, labels, E, W, b, u):
    """``J = (1/B) Σ_b −[y_b ln ŷ_b + (1 − y_b) ln(1 − ŷ_b)]`` with ``ŷ = σ(s)``,
    ``s = u · tanh(W x̄ + b)``, ``x̄ = Σ_t mask_t E[w_t] / Σ_t mask_t`` (0 for a row with
    no token); evaluated as ``softplus(s) − y s``, which is exact for any ``s``.

    Seed 003 (averaged word vectors, ``h = f(Wx + b)``, ``s = uᵀh``, ``ŷ = σ(s)``, with
    ``f = tanh``); its loss has a sign typo, corrected here (module docstring).
    ``mask=None`` means every token counts. ``B``, ``V`` and ``d`` are at least 1 (an
    empty one is a ``ValueError``); ``T = 0`` is allowed (every ``x̄`` is 0).
    """
    tok, m, y, Ea, Wa, ba, ua = _check_classifier(tokens, mask, labels, E, W, b, u)
    s = _classifier_forward(tok, m, Ea, Wa, ba, ua)[3]
    return np.mean(np.logaddexp(0, s) - y * s)


@vjp_rule(text_classifier_loss)
def _text_classifier_loss_vjp(cot, tokens, mask, labels, E, W, b, u):
    """``∂s = c (σ(s) − y)/B``; ``∂u = Σ ∂s hid``; ``∂a = ∂s u ⊙ (1 − hid²)``;
    ``∂W = ∂aᵀ x̄``, ``∂b = Σ ∂a``; ``∂x̄ = ∂a W``; each counted token ``w_t`` of row ``b``
    adds ``∂x̄_b / Σ_t mask_t`` to ``∂E[w_t]``."""
    tok, m, y, Ea, Wa, ba, ua = _check_classifier(tokens, mask, labels, E, W, b, u)
    count, xbar, hid, s = _classifier_forward(tok, m, Ea, Wa, ba, ua)
    ds = fl(cot) * (sigmoid(s) - y) / fl(len(s))
    dxbar, dW, db = _affine_back(np.outer(ds, ua) * (1 - hid * hid), xbar, Wa)
    per_token = (dxbar / count[:, None])[:, None, :] * m[..., None]
    return {"E": _scatter_rows(tok, per_token, Ea), "W": dW, "b": db, "u": ds @ hid}
