"""The time loops of the recurrent family: one layer, one direction, forward and BPTT.

Layout (as cuDNN runs an RNN layer): the input projection of every step,
``P_t = x_t W_ihᵀ + b_ih``, is one GEMM over the whole sequence before the loop; the
loop does only the recurrent GEMM ``h_{t−1} W_hhᵀ`` and the gate arithmetic, in place in
buffers of the working dtype (:func:`lmspec._precision.fl`). Backwards, the loop keeps
the pre-activation gradients ``δ_t`` of every step; after it ``∂x = δ W_ih``,
``∂W_ih = Σ_t δ_tᵀ x_t`` and ``∂W_hh = Σ_t δ_tᵀ h_{t−1}`` are one GEMM each over the
sequence. Arrays are time-major ``[T, B, ·]`` so that every step's operands are
contiguous. Each elementwise expression keeps the operation order of the step equations
in the docstrings, so a result moves only where a GEMM sums in another order.

Gate blocks are those of CONTRACT §2 (LSTM ``i, f, g, o``; GRU ``r, z, n``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._precision import activation
from .blocks import sigmoid

State = tuple[np.ndarray, ...]
Weights = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # (W_ih, W_hh, b_ih, b_hh)




def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for 2-D operands, in ``a``'s dtype (NumPy's bfloat16 matmul answers float32)."""
    return np.matmul(a, b, out=np.empty((a.shape[0], b.shape[1]), dtype=a.dtype))


def _split(a: np.ndarray, n: int) -> list[np.ndarray]:
    """The ``n`` equal gate blocks of the last axis, as views."""
    k = a.shape[-1] // n
    return [a[..., j * k:(j + 1) * k] for j in range(n)]


def _times(T: int, reverse: bool) -> range:
    """Processing order: the reverse direction reads the sequence backwards."""
    return range(T - 1, -1, -1) if reverse else range(T)


@dataclass
class Layer:
    """One (layer, direction) run forward: what its BPTT needs."""

    x: np.ndarray  # input, time-major [T, B, I]
    w: Weights
    init: State
    reverse: bool
    ys: np.ndarray  # h_t at its time index, [T, B, H]
    finals: State  # the states after the last step processed
    tape: tuple[np.ndarray, ...]  # the cell's intermediates, [T, B, ·] each

    def h_prev(self) -> np.ndarray:
        """``h_{t−1}`` (the state each step read) at every time index, ``[T, B, H]``."""
        h0 = self.init[0][None]
        return (np.concatenate([self.ys[1:], h0]) if self.reverse
                else np.concatenate([h0, self.ys[:-1]]))


def _before(k: int, seq: np.ndarray, order: range, init: np.ndarray) -> np.ndarray:
    """The state (from ``seq[T, B, H]``) that the ``k``-th processed step read."""
    return seq[order[k - 1]] if k else init


# -- Elman RNN ------------------------------------------------------------------------------

def _rnn_scan(P, init: State, w: Weights, opts: dict[str, Any], order: range):
    """``a_t = P_t + (h_{t−1} W_hhᵀ + b_hh)``, ``h_t = f(a_t)``, ``f ∈ {tanh, relu}``
    (Elman 1990; seed 001). ``P`` becomes ``a``."""
    (h,) = init
    W_hh, b_hh = w[1], w[3]
    ys = np.empty(P.shape[:2] + (W_hh.shape[1],), dtype=P.dtype)
    rec = np.empty_like(P[0])
    relu = opts.get("nonlinearity", "tanh") == "relu"
    for t in order:
        a = P[t]
        np.matmul(h, W_hh.T, out=rec)
        rec += b_hh
        a += rec
        if relu:
            np.maximum(a, 0, out=ys[t])
        else:
            activation(np.tanh(a, out=ys[t]))
        h = ys[t]
    return ys, (h,), (P,)


def _rnn_back(lay: Layer, dys, dfinal: State, opts: dict[str, Any], order: range,
              trunc: int | None):
    """``δ_t = ∂h_t ⊙ f'(a_t)`` with ``tanh' = 1 − h_t²`` and ``relu' = [a_t > 0]``
    (0 at 0); ``∂h_{t−1} = δ_t W_hh``."""
    (a_tape,) = lay.tape
    ys, W_hh = lay.ys, lay.w[1]
    dh = dfinal[0].copy()
    delta = np.empty_like(a_tape)
    tmp = np.empty_like(dh)
    relu = opts.get("nonlinearity", "tanh") == "relu"
    for k in reversed(range(len(order))):
        t = order[k]
        if dys is not None:
            dh += dys[t]
        d = delta[t]
        if relu:
            np.multiply(dh, a_tape[t] > 0, out=d)
        else:
            np.multiply(ys[t], ys[t], out=tmp)
            np.subtract(1, tmp, out=tmp)
            np.multiply(dh, tmp, out=d)
        np.matmul(d, W_hh, out=dh)
        _truncate(dh, t, trunc)
    return delta, (dh,), [(delta, lay.h_prev())]


def _truncate(dh: np.ndarray, t: int, trunc: int | None) -> None:
    """Truncated BPTT: the state handed to step ``t = jk`` is a constant for it."""
    if trunc is not None and t % trunc == 0 and t > 0:
        dh[...] = 0


# -- LSTM -----------------------------------------------------------------------------------

def _lstm_scan(P, init: State, w: Weights, opts: dict[str, Any], order: range):
    """``[i f g o] = P_t + (h W_hhᵀ + b_hh)``, ``c' = σ(f) ⊙ c + σ(i) ⊙ tanh(g)``,
    ``h' = σ(o) ⊙ tanh(c')`` (Hochreiter & Schmidhuber 1997, Gers et al. 2000; seeds
    001/003). ``P`` becomes the activations ``σ(i), σ(f), tanh(g), σ(o)``."""
    h, c = init
    W_hh, b_hh = w[1], w[3]
    T, B, G = P.shape
    H = G // 4
    ys, cs, tcs = (np.empty((T, B, H), dtype=P.dtype) for _ in range(3))
    rec = np.empty((B, G), dtype=P.dtype)
    ig = np.empty((B, H), dtype=P.dtype)
    for t in order:
        a = P[t]
        np.matmul(h, W_hh.T, out=rec)
        rec += b_hh
        a += rec
        sigmoid(a[:, :2 * H], out=a[:, :2 * H])  # i and f at once
        activation(np.tanh(a[:, 2 * H:3 * H], out=a[:, 2 * H:3 * H]))
        sigmoid(a[:, 3 * H:], out=a[:, 3 * H:])
        si, sf, tg, so = _split(a, 4)
        np.multiply(sf, c, out=cs[t])
        np.multiply(si, tg, out=ig)
        cs[t] += ig
        activation(np.tanh(cs[t], out=tcs[t]))
        np.multiply(so, tcs[t], out=ys[t])
        h, c = ys[t], cs[t]
    return ys, (h, c), (P, cs, tcs)


def _lstm_back(lay: Layer, dys, dfinal: State, opts: dict[str, Any], order: range,
               trunc: int | None):
    """``∂c'ₜₒₜ = ∂c' + ∂h' σ(o)(1 − tanh²c')``; ``∂o = ∂h' tanh(c') σ'(o)``;
    ``∂i = ∂c'ₜₒₜ tanh(g) σ'(i)``; ``∂f = ∂c'ₜₒₜ c σ'(f)``; ``∂g = ∂c'ₜₒₜ σ(i)(1 − tanh²g)``;
    ``∂c = ∂c'ₜₒₜ σ(f)``, ``∂h = δ W_hh``, with ``σ' = σ(1 − σ)``."""
    A, cs, tcs = lay.tape
    W_hh = lay.w[1]
    T, B, G = A.shape
    H = G // 4
    dh, dc = dfinal[0].copy(), dfinal[1].copy()
    delta = np.empty_like(A)
    t1, t2 = np.empty_like(dh), np.empty_like(dh)
    s_if = np.empty((B, 2 * H), dtype=A.dtype)
    for k in reversed(range(T)):
        t = order[k]
        c_prev = _before(k, cs, order, lay.init[1])
        if dys is not None:
            dh += dys[t]
        si, sf, tg, so = _split(A[t], 4)
        di, df, dg, do = _split(delta[t], 4)
        tc = tcs[t]
        np.multiply(dh, so, out=t1)
        np.multiply(tc, tc, out=t2)
        np.subtract(1, t2, out=t2)
        t1 *= t2
        dc += t1  # ∂c'ₜₒₜ
        np.multiply(dc, tg, out=di)
        np.multiply(dc, c_prev, out=df)
        d_if = delta[t][:, :2 * H]  # σ' of i and f at once
        d_if *= A[t][:, :2 * H]
        np.subtract(1, A[t][:, :2 * H], out=s_if)
        d_if *= s_if
        np.multiply(dc, si, out=dg)
        np.multiply(tg, tg, out=t2)
        np.subtract(1, t2, out=t2)
        dg *= t2
        np.multiply(dh, tc, out=do)
        do *= so
        np.subtract(1, so, out=t2)
        do *= t2
        dc *= sf
        np.matmul(delta[t], W_hh, out=dh)
        _truncate(dh, t, trunc)
        _truncate(dc, t, trunc)
    return delta, (dh, dc), [(delta, lay.h_prev())]


# -- GRU ------------------------------------------------------------------------------------

def _gru_scan(P, init: State, w: Weights, opts: dict[str, Any], order: range):
    """``r = σ(P_r + h W_hrᵀ + b_hr)``, ``z = σ(P_z + h W_hzᵀ + b_hz)``,
    ``n = tanh(P_n + r ⊙ (h W_hnᵀ + b_hn))`` (linear before reset, seed 001, cuDNN) or
    ``n = tanh(P_n + (r ⊙ h) W_hnᵀ + b_hn)`` (seed 003, Cho et al. 2014),
    ``h' = (1 − z) ⊙ n + z ⊙ h``. ``P`` becomes ``r, z, n``; the tape keeps
    ``h W_hnᵀ + b_hn`` (linear before reset) or ``r ⊙ h``."""
    (h,) = init
    W_hh, b_hh = w[1], w[3]
    T, B, G = P.shape
    H = G // 3
    lbr = opts.get("linear_before_reset", True)
    ys, hns = np.empty((T, B, H), dtype=P.dtype), np.empty((T, B, H), dtype=P.dtype)
    W_rec, b_rec = (W_hh, b_hh) if lbr else (W_hh[:2 * H], b_hh[:2 * H])
    rec = np.empty((B, W_rec.shape[0]), dtype=P.dtype)
    buf = np.empty((B, H), dtype=P.dtype)
    for t in order:
        a = P[t]
        np.matmul(h, W_rec.T, out=rec)
        rec += b_rec
        rz, n = a[:, :2 * H], a[:, 2 * H:]
        rz += rec[:, :2 * H]
        sigmoid(rz, out=rz)
        r, z = _split(rz, 2)
        if lbr:
            np.copyto(hns[t], rec[:, 2 * H:])
            np.multiply(r, hns[t], out=buf)
        else:
            np.multiply(r, h, out=hns[t])
            np.matmul(hns[t], W_hh[2 * H:].T, out=buf)
            buf += b_hh[2 * H:]
        n += buf
        activation(np.tanh(n, out=n))
        np.subtract(1, z, out=buf)
        buf *= n
        np.multiply(z, h, out=ys[t])
        ys[t] += buf
        h = ys[t]
    return ys, (h,), (P, hns)


def _gru_back(lay: Layer, dys, dfinal: State, opts: dict[str, Any], order: range,
              trunc: int | None):
    """``∂n = ∂h'(1 − z)``, ``∂z = ∂h'(h − n)``, ``∂h ∋ ∂h' z``; ``∂aₙ = ∂n (1 − n²)``.
    Linear before reset: ``∂(W_hn h + b_hn) = ∂aₙ ⊙ r``, ``∂r = ∂aₙ ⊙ (W_hn h + b_hn)``.
    Reset before the matmul: ``∂(W_hn(r⊙h) + b_hn) = ∂aₙ``; with ``∂(r⊙h) = ∂aₙ W_hn``,
    ``∂r = ∂(r⊙h) ⊙ h`` and ``∂h ∋ ∂(r⊙h) ⊙ r``. Gates: ``∂pre = ∂gate σ(1 − σ)``."""
    A, hns = lay.tape
    ys, W_hh = lay.ys, lay.w[1]
    T, B, G = A.shape
    H = G // 3
    lbr = opts.get("linear_before_reset", True)
    dh = dfinal[0].copy()
    delta = np.empty_like(A)  # ∂ of the pre-activations P_r, P_z, P_n
    dhn = np.empty((T, B, H), dtype=A.dtype) if lbr else None  # ∂(W_hn h + b_hn)
    b1, b2, rec = (np.empty_like(dh) for _ in range(3))
    for k in reversed(range(T)):
        t = order[k]
        h = _before(k, ys, order, lay.init[0])
        if dys is not None:
            dh += dys[t]
        r, z, n = _split(A[t], 3)
        dr, dz, dan = _split(delta[t], 3)
        np.subtract(1, z, out=b1)
        np.multiply(dh, b1, out=dan)
        np.multiply(n, n, out=b1)
        np.subtract(1, b1, out=b1)
        dan *= b1
        np.subtract(h, n, out=b1)
        np.multiply(dh, b1, out=dz)
        dz *= z
        np.subtract(1, z, out=b1)
        dz *= b1
        dh *= z
        if lbr:
            np.multiply(dan, r, out=dhn[t])
            np.multiply(dan, hns[t], out=b1)  # ∂r
        else:
            np.matmul(dan, W_hh[2 * H:], out=b2)  # ∂(r ⊙ h)
            np.multiply(b2, h, out=b1)  # ∂r
            b2 *= r
            dh += b2
        np.multiply(b1, r, out=dr)
        np.subtract(1, r, out=b1)
        dr *= b1
        np.matmul(delta[t][:, :2 * H], W_hh[:2 * H], out=rec)
        dh += rec
        if lbr:
            np.matmul(dhn[t], W_hh[2 * H:], out=rec)
            dh += rec
        _truncate(dh, t, trunc)
    h_prev = lay.h_prev()
    n_grad = (dhn, h_prev) if lbr else (delta[..., 2 * H:], hns)
    return delta, (dh,), [(delta[..., :2 * H], h_prev), n_grad]


# -- a layer: the input projection, the time loop and the sequence GEMMs ----------------------

@dataclass(frozen=True)
class Cell:
    """A cell kind: gate blocks per weight matrix, state arity, time loop and its BPTT."""

    gates: int
    n_state: int
    scan: Callable[..., Any]
    back: Callable[..., Any]


RNN = Cell(1, 1, _rnn_scan, _rnn_back)
LSTM = Cell(4, 2, _lstm_scan, _lstm_back)
GRU = Cell(3, 1, _gru_scan, _gru_back)


def layer_fwd(cell: Cell, x: np.ndarray, init: State, w: Weights, opts: dict[str, Any],
              reverse: bool = False) -> Layer:
    """Run one layer over time-major ``x[T, B, I]``: ``P = x W_ihᵀ + b_ih`` as one GEMM,
    then the time loop in processing order."""
    T, B, I = x.shape
    P = _mm(x.reshape(T * B, I), w[0].T)
    P += w[2]
    ys, finals, tape = cell.scan(P.reshape(T, B, -1), init, w, opts, _times(T, reverse))
    return Layer(x, w, init, reverse, ys, finals, tape)


def layer_bwd(cell: Cell, lay: Layer, dys: np.ndarray | None, dfinal: Sequence[np.ndarray],
              opts: dict[str, Any], trunc: int | None = None):
    """BPTT through one layer: ``dys[T, B, H]`` the output cotangent at each time index
    (``None`` = zeros), ``dfinal`` that of the final states. Returns ``(∂x[T, B, I],
    ∂(initial states), (∂W_ih, ∂W_hh, ∂b_ih, ∂b_hh))`` with ``∂x = δ W_ih``,
    ``∂W_ih = Σ_t δ_tᵀ x_t``, ``∂b_ih = Σ_t Σ_batch δ_t`` and ``∂W_hh``, ``∂b_hh`` likewise
    from the recurrent pre-activation gradients and the states each step read."""
    T, B, I = lay.x.shape
    delta, d_init, rec = cell.back(lay, dys, tuple(dfinal), opts, _times(T, lay.reverse), trunc)
    d2 = delta.reshape(T * B, -1)
    dx = _mm(d2, lay.w[0]).reshape(T, B, I)
    dW_ih = _mm(d2.T, lay.x.reshape(T * B, I))
    db_ih = np.sum(d2, axis=0)
    dW_hh = np.concatenate([_mm(d.reshape(T * B, -1).T, inp.reshape(T * B, -1))
                            for d, inp in rec], axis=0)
    db_hh = np.concatenate([db_ih if d is delta else np.sum(d.reshape(T * B, -1), axis=0)
                            for d, _ in rec])
    return dx, d_init, (dW_ih, dW_hh, db_ih, db_hh)


# -- the literal steps: the equations of CONTRACT §2, one step, no buffers --------------
# The scans above compute exactly these, batched over time and in place; these are kept
# as their documentation and as the test suite's oracle (tests/test_recurrent_literal.py).

def rnn_step(x, h, W_ih, W_hh, b_ih, b_hh, nonlinearity: str = "tanh"):
    """``h' = f(x W_ihᵀ + b_ih + h W_hhᵀ + b_hh)``, ``f ∈ {tanh, relu}`` (Elman)."""
    a = x @ W_ih.T + b_ih + h @ W_hh.T + b_hh
    return np.tanh(a) if nonlinearity == "tanh" else np.maximum(a, 0)


def lstm_step(x, h, c, W_ih, W_hh, b_ih, b_hh):
    """Gate blocks ``i, f, g, o`` of ``a = x W_ihᵀ + b_ih + h W_hhᵀ + b_hh``;
    ``c' = σ(f)⊙c + σ(i)⊙tanh(g)``, ``h' = σ(o)⊙tanh(c')`` (Hochreiter & Schmidhuber 1997;
    forget gate: Gers et al. 2000)."""
    i, f, g, o = np.split(x @ W_ih.T + b_ih + h @ W_hh.T + b_hh, 4, axis=-1)
    s = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731 - the plain logistic, literally
    c2 = s(f) * c + s(i) * np.tanh(g)
    return s(o) * np.tanh(c2), c2


def gru_step(x, h, W_ih, W_hh, b_ih, b_hh, linear_before_reset: bool = True):
    """Gate blocks ``r, z, n``: ``r = σ(W_ir x + b_ir + W_hr h + b_hr)``, ``z`` likewise,
    ``n = tanh(W_in x + b_in + r⊙(W_hn h + b_hn))`` (or, with ``linear_before_reset=False``,
    ``tanh(W_in x + b_in + W_hn(r⊙h) + b_hn)``), ``h' = (1 − z)⊙n + z⊙h`` (Cho et al. 2014)."""
    xr, xz, xn = np.split(x @ W_ih.T + b_ih, 3, axis=-1)
    W_hr, W_hz, W_hn = np.split(W_hh, 3, axis=0)
    b_hr, b_hz, b_hn = np.split(b_hh, 3, axis=-1)
    s = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731 - the plain logistic, literally
    r = s(xr + h @ W_hr.T + b_hr)
    z = s(xz + h @ W_hz.T + b_hz)
    hn = r * (h @ W_hn.T + b_hn) if linear_before_reset else (r * h) @ W_hn.T + b_hn
    n = np.tanh(xn + hn)
    return (1 - z) * n + z * h
