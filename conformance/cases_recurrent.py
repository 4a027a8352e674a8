"""Conformance inputs and properties of the recurrent family.

Inputs: ``T`` from 1, up to three layers, both directions, hidden sizes that differ
from input sizes, a batch of one, and two weight regimes: ordinary (``|w| ≤ 1``) and
saturating (``|w| ≤ 6``, gates pinned near 0 or 1, tanh in its flat tails).

Tolerance: every step is a dot product of length ``I_ℓ + H`` (plus two biases) and
its rounding errors are carried on through ``T`` steps and ``L`` layers, so
``k = L·T·(max_ℓ I_ℓ + H + 2)``; the summands have magnitude up to
``M = max|W| · max|input|`` (the LSTM cell state can grow to ``|c0| + T``). For a
gradient, each summand is further multiplied by the cotangent and a weight.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

import lmspec

from . import draw as d
from .declare import Call, Close, cases, prop

GATES = {"rnn": 1, "lstm": 4, "gru": 3}
REGIMES = {"normal": 1.0, "saturating": 6.0}


def _regime(draw, label: str = "weight regime") -> float:
    return REGIMES[draw(st.sampled_from(list(REGIMES)), label=label)]


def _cell_weights(draw, dtype: str, gates: int, in_size: int, H: int, w: float,
                  label: str) -> tuple[np.ndarray, ...]:
    shapes = ((gates * H, in_size), (gates * H, H), (gates * H,), (gates * H,))
    names = ("W_ih", "W_hh", "b_ih", "b_hh")
    return tuple(d.floats(draw, dtype, s, -w, w, label=f"{label} {n}")
                 for s, n in zip(shapes, names, strict=True))


def _n_states(kind: str) -> int:
    return 2 if kind == "lstm" else 1


def _options(draw, kind: str) -> dict:
    if kind == "rnn":
        return {"nonlinearity": draw(st.sampled_from(["tanh", "relu"]), label="nonlinearity")}
    if kind == "gru":
        return {"linear_before_reset": draw(st.booleans(), label="linear_before_reset")}
    return {}


# -- cells ----------------------------------------------------------------------------------

@st.composite
def _cell(draw, dtype: str, kind: str) -> Call:
    """One step; the summed widths ``I`` and ``H`` sometimes past a tile."""
    B = d.dim(draw, 1, 3, label="B")
    I, H = d.length(draw, 1, 4, label="I"), d.length(draw, 1, 4, label="H")
    w = _regime(draw)
    x = d.floats(draw, dtype, (B, I), label="x")
    states = tuple(d.floats(draw, dtype, (B, H), label=n) for n in ("h", "c")[:_n_states(kind)])
    weights = _cell_weights(draw, dtype, GATES[kind], I, H, w, "cell")
    return Call((x, *states, *weights), _options(draw, kind))


def _cell_k(call: Call) -> int:
    """A pre-activation sums ``I + H + 2`` terms; a weight gradient sums over the batch."""
    x, h = call.args[0], call.args[1]
    return x.shape[1] + h.shape[1] + 2 + x.shape[0]


def _max_abs(arrays) -> float:
    return max((float(np.max(np.abs(np.asarray(a, dtype=np.float64)), initial=0.0))
                for a in arrays if a is not None), default=0.0)


def _summand_scale(weights, inputs, cot, extra: float = 0.0) -> float:
    """``M = max(1,|W|)·max(1,|inputs|)`` (a summand of a pre-activation), times
    ``max(1,|cot|)·max(1,|W|)`` for a gradient (the cotangent pulled through a weight)."""
    w = max(1.0, _max_abs(weights))
    m = max(w * max(1.0, _max_abs(inputs)), extra)
    if cot is not None:
        c = cot if isinstance(cot, tuple) else (cot,)
        m *= max(1.0, _max_abs(c)) * w
    return m


def _cell_scale(call: Call, cot=None) -> float:
    n = 3 if len(call.args) == 7 else 2  # lstm_cell has (x, h, c) before the weights
    return _summand_scale(call.args[n:], call.args[:n], cot,
                          extra=1.0 + _max_abs(call.args[2:3]) if n == 3 else 0.0)


for _kind in GATES:
    cases(f"{_kind}_cell", k=_cell_k, scale=_cell_scale)(
        lambda dtype, _kind=_kind: _cell(dtype, _kind))


# -- sequences --------------------------------------------------------------------------------

@st.composite
def _seq(draw, dtype: str, kind: str, *, layers: tuple[int, int] = (1, 3),
         bidirectional: bool | None = None, opts: dict | None = None) -> Call:
    B, T, I, H = (d.dim(draw, 1, n, label=lbl)
                  for n, lbl in ((2, "B"), (5, "T"), (4, "I"), (4, "H")))
    L = d.dim(draw, *layers, label="num_layers")
    bidir = draw(st.booleans(), label="bidirectional") if bidirectional is None else bidirectional
    D = 2 if bidir else 1
    w = _regime(draw)
    x = d.floats(draw, dtype, (B, T, I), label="x")
    states = tuple(d.floats(draw, dtype, (L * D, B, H), label=n)
                   for n in ("h0", "c0")[:_n_states(kind)])
    weights = tuple(a for idx in range(L * D) for a in _cell_weights(
        draw, dtype, GATES[kind], I if idx < D else D * H, H, w, f"layer {idx // D} dir {idx % D}"))
    kw = {"num_layers": L, "bidirectional": bidir, **_options(draw, kind), **(opts or {})}
    if kw.get("nonlinearity") == "relu":
        weights = _relu_in_range(x, states[0], weights, kw, dtype)
    return Call((x, *states, weights), kw)


def _relu_majorant(x, h0, weights, kw: dict) -> float:
    """A bound on every intermediate of a ReLU RNN and of its vjp (cotangents ``|·| ≤ 2``,
    as the harness draws them): the float64 spec run on ``|x|, |h0|, |W|``. With every term
    non-negative nothing cancels, so each layer's states, each pre-activation (and every
    partial sum of it), each gradient and each backward state (bounded by its layer's
    ``∂b``) is at most the value computed here."""
    a = [np.abs(np.asarray(v, dtype=np.float64)) for v in (x, h0)]
    w = tuple(np.abs(np.asarray(v, dtype=np.float64)) for v in weights)
    D = 2 if kw["bidirectional"] else 1
    inp, peak = a[0], 0.0
    for layer in range(kw["num_layers"]):  # every layer's output, not only the top one
        inp, _ = lmspec.rnn(inp, a[1][layer * D:(layer + 1) * D],
                            w[4 * layer * D:4 * (layer + 1) * D], 1, kw["bidirectional"], "relu")
        peak = max(peak, float(inp.max(initial=0.0)))
    out, h_n = lmspec.rnn(*a, w, **kw)
    cot = (np.full_like(out, 2.0), np.full_like(h_n, 2.0))
    g_x, g_h0, g_w = lmspec.vjp("rnn", (*a, w), kw, cot)
    return max(peak, _max_abs((g_x, g_h0, *g_w)))


def _relu_in_range(x, h0, weights, kw: dict, dtype: str) -> tuple[np.ndarray, ...]:
    """A ReLU RNN's state is unbounded (it grows like ``(|W_hh|·H)^T`` per layer): halve
    the weights (exactly, a power of two) until the majorant stays within a quarter of the
    dtype's finite range, so that the true values of the forward and backward pass are
    representable (float16 tops out at 65504; beyond that the op has no answer to test)."""
    limit = d.FINITE_MAX[dtype] / 4
    for _ in range(64):
        if _relu_majorant(x, h0, weights, kw) <= limit:
            break
        weights = tuple(d.as_dtype(np.asarray(w, dtype=np.float64) / 2, dtype) for w in weights)
    return weights


def _seq_k(call: Call) -> int:
    """``L·T`` steps of ``I_ℓ + H + 2`` terms; weight gradients also sum over ``B·T``."""
    x, h0, weights = call.args[0], call.args[1], call.args[-1]
    B, T = x.shape[:2]
    widest = max(w.shape[1] for w in weights[0::4])
    return call.kwargs["num_layers"] * T * (widest + h0.shape[2] + 2) + B * T


def _seq_scale(call: Call, cot=None) -> float:
    x, weights = call.args[0], call.args[-1]
    states = call.args[1:-1]
    extra = 1.0 + x.shape[1] + _max_abs(states[1:]) if len(states) == 2 else 0.0
    return _summand_scale(weights, (x, *states), cot, extra)


for _kind in GATES:
    cases(_kind, k=_seq_k, scale=_seq_scale)(lambda dtype, _kind=_kind: _seq(dtype, _kind))


# -- language models --------------------------------------------------------------------------

def _window_k(call: Call) -> int:
    """Forward: ``(n−1)d + Hd + 1`` terms; backward: ``V`` (through ``W2``, ``W3``) and the
    ``B·(n−1)`` context positions whose gradients add up in ``∂E``."""
    ctx, _, W1, _, W2 = call.args[:5]
    return W1.shape[1] + W1.shape[0] + W2.shape[0] + ctx.size + 1


@cases("window_lm", k=_window_k,
       scale=lambda c, cot=None: _summand_scale(c.args[1:], (), cot))
@st.composite
def _window(draw, dtype: str) -> Call:
    B, n1, V, dm, Hd = (d.dim(draw, lo, hi, label=lbl) for lo, hi, lbl in (
        (1, 3, "B"), (1, 3, "n-1"), (1, 6, "V"), (1, 3, "d"), (1, 4, "Hd")))
    w = _regime(draw)
    ctx = d.ints(draw, (B, n1), V, label="context")
    E = d.floats(draw, dtype, (V, dm), label="E")
    W1 = d.floats(draw, dtype, (Hd, n1 * dm), -w, w, label="W1")
    b1 = d.floats(draw, dtype, (Hd,), -w, w, label="b1")
    W2 = d.floats(draw, dtype, (V, Hd), -w, w, label="W2")
    with_W3 = draw(st.booleans(), label="direct connections W3")
    W3 = d.floats(draw, dtype, (V, n1 * dm), -w, w, label="W3") if with_W3 else None
    b3 = d.floats(draw, dtype, (V,), -w, w, label="b3")
    return Call((ctx, E, W1, b1, W2, W3, b3))


@st.composite
def _lm(draw, dtype: str, truncation: bool | None = None) -> Call:
    B, T, V, I, H = (d.dim(draw, lo, hi, label=lbl) for lo, hi, lbl in (
        (1, 2, "B"), (1, 6, "T"), (1, 6, "V"), (1, 4, "I"), (1, 4, "H")))
    w = _regime(draw)
    tok = d.ints(draw, (B, T + 1), V, label="tokens")
    E = d.floats(draw, dtype, (V, I), label="E")
    h0 = d.floats(draw, dtype, (B, H), -1, 1, label="h0")
    cell = _cell_weights(draw, dtype, 1, I, H, w, "rnn")
    W_out = d.floats(draw, dtype, (V, H), -w, w, label="W_out")
    b_out = d.floats(draw, dtype, (V,), -w, w, label="b_out")
    use = draw(st.booleans(), label="truncate") if truncation is None else truncation
    k = d.dim(draw, 1, max(1, T - 1), label="bptt_truncation") if use else None
    return Call((tok, E, h0, *cell, W_out, b_out), {"bptt_truncation": k})


def _lm_k(call: Call) -> int:
    """``T`` steps of ``I + H + 2`` terms, the output layer (``H``, ``V``), and the ``B·T``
    positions whose gradients add up."""
    tok, E = call.args[:2]
    V, H = call.args[7].shape
    T = tok.shape[1] - 1
    return T * (E.shape[1] + H + 2) + H + V + tok.shape[0] * T


cases("rnn_lm_loss", k=_lm_k,
      scale=lambda c, cot=None: _summand_scale(c.args[3:], c.args[1:3], cot))(_lm)


def _classifier_k(call: Call) -> int:
    """The masked mean over ``T`` (its gradient spread over ``B·T`` positions), then
    ``d + 1`` and ``H`` terms, and a mean over ``B``."""
    tok, E, W = call.args[0], call.args[3], call.args[4]
    return tok.size + E.shape[1] + W.shape[0] + 2


@cases("text_classifier_loss", k=_classifier_k,
       scale=lambda c, cot=None: _summand_scale(c.args[4:], c.args[3:4], cot))
@st.composite
def _classifier(draw, dtype: str) -> Call:
    B, T, V, dm, H = (d.dim(draw, lo, hi, label=lbl) for lo, hi, lbl in (
        (1, 4, "B"), (1, 5, "T"), (1, 6, "V"), (1, 4, "d"), (1, 4, "H")))
    w = _regime(draw)
    tok = d.ints(draw, (B, T), V, label="tokens")
    mask = d.bools(draw, (B, T), label="mask")
    labels = d.as_dtype(d.ints(draw, (B,), 2, label="labels"), dtype)
    E = d.floats(draw, dtype, (V, dm), label="E")
    W = d.floats(draw, dtype, (H, dm), -w, w, label="W")
    b = d.floats(draw, dtype, (H,), -w, w, label="b")
    u = d.floats(draw, dtype, (H,), -w, w, label="u")
    return Call((tok, mask, labels, E, W, b, u))


# -- properties that need no reference ----------------------------------------------------------

def _seq_parts(call: Call):
    """``(x, states, weights, opts)`` of a sequence call, options without the layout ones."""
    x, *states, weights = call.args
    opts = {k: v for k, v in call.kwargs.items() if k not in ("num_layers", "bidirectional")}
    return x, states, weights, opts


def _bidirectional_check(kind: str):
    def check(run, call: Call, dtype: str):
        """A bidirectional layer = the forward run ⊕ the time-reversed run of the reverse
        weights on the time-reversed input (outputs at their original time index)."""
        x, states, weights, opts = _seq_parts(call)
        H = states[0].shape[2]
        both = run(kind, *call.args, **call.kwargs)
        fwd = run(kind, x, *(s[:1] for s in states), weights[:4], **opts)
        rev = run(kind, x[:, ::-1].copy(), *(s[1:] for s in states), weights[4:], **opts)
        k, m = _seq_k(call), _seq_scale(call)
        yield Close("out[..., :H] = forward run", both[0][..., :H], fwd[0], k=k, scale=m)
        yield Close("out[..., H:] = reversed run, flipped back", both[0][..., H:],
                    rev[0][:, ::-1], k=k, scale=m)
        for i in range(1, len(both)):
            yield Close(f"final state {i}[0] (forward)", both[i][0], fwd[i][0], k=k, scale=m)
            yield Close(f"final state {i}[1] (reverse)", both[i][1], rev[i][0], k=k, scale=m)

    return check


def _stacked_check(kind: str):
    def check(run, call: Call, dtype: str):
        """A stacked RNN = its single layers composed: layer ℓ runs on layer ℓ−1's output,
        with initial states ``[ℓ·D, (ℓ+1)·D)`` and weights ``4·ℓ·D …``; the final states
        are those of the layers, in order."""
        x, states, weights, opts = _seq_parts(call)
        L, bidir = call.kwargs["num_layers"], call.kwargs["bidirectional"]
        D = 2 if bidir else 1
        whole = run(kind, *call.args, **call.kwargs)
        inp, finals = x, []
        for layer in range(L):
            one = run(kind, d.as_dtype(inp, dtype), *(s[layer * D:(layer + 1) * D]
                                                      for s in states),
                      weights[4 * layer * D:4 * (layer + 1) * D], bidirectional=bidir, **opts)
            inp = one[0]
            finals.append(one[1:])
        k, m = _seq_k(call), _seq_scale(call)
        yield Close("out = last layer's output", whole[0], inp, k=k, scale=m)
        for i in range(1, len(whole)):
            yield Close(f"final state {i} = layers' final states in order", whole[i],
                        np.concatenate([f[i - 1] for f in finals]), k=k, scale=m)

    return check


for _kind in GATES:
    prop(_kind, "bidirectional_is_forward_and_reversed",
         strategy=lambda dtype, _kind=_kind: _seq(dtype, _kind, layers=(1, 1),
                                                  bidirectional=True))(
        _bidirectional_check(_kind))
    prop(_kind, "stacked_is_composition_of_layers",
         strategy=lambda dtype, _kind=_kind: _seq(dtype, _kind, layers=(2, 3)))(
        _stacked_check(_kind))


SATURATION_MARGIN = 40.0
"""How far past the other terms a pinning bias puts a gate: ``σ`` is then 0 or 1 to
within ``e^{−40}`` ≈ 4e-18, below float64's half ulp of 1."""


def _saturating_bias(weights, x: np.ndarray, states: list[np.ndarray]) -> float:
    """A bias larger than any other term of a gate pre-activation by the margin: every
    layer's input is bounded by ``max(|x|, 1, |states|)`` (its outputs are the kept
    ``h0`` or ``σ·tanh``) and its recurrent state by ``max(1, |states|)``, so the
    other terms are at most the weight rows' absolute sums times those bounds."""
    inp = max(1.0, _max_abs([x, *states]))
    rec = max(1.0, _max_abs(states))
    other = max(float(np.abs(w_ih.astype(np.float64)).sum(axis=1).max()) * inp
                + float(np.abs(w_hh.astype(np.float64)).sum(axis=1).max()) * rec
                for w_ih, w_hh in zip(weights[0::4], weights[1::4]))
    return SATURATION_MARGIN + other


def _pinned(weights, blocks: dict[int, float]) -> tuple[np.ndarray, ...]:
    """Weights with small matrices (|w| ≤ 1 by the strategy) and the bias of gate block
    ``j`` set to ``blocks[j]`` (on ``b_ih``; ``b_hh`` of that block zeroed)."""
    out = list(weights)
    for idx in range(0, len(out), 4):
        H = out[idx + 1].shape[1]
        b_ih, b_hh = out[idx + 2].copy(), out[idx + 3].copy()
        for j, value in blocks.items():
            b_ih[j * H:(j + 1) * H] = value
            b_hh[j * H:(j + 1) * H] = 0
        out[idx + 2], out[idx + 3] = b_ih, b_hh
    return tuple(out)


def _clip_unit(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` clipped to ``[−1, 1]``, still in ``dtype`` (NumPy's ``clip`` widens bfloat16
    arrays to float32, which would hand the backend mixed dtypes)."""
    return d.as_dtype(np.clip(a.astype(np.float64), -1, 1), dtype)


@st.composite
def _small_seq(draw, dtype: str, kind: str) -> Call:
    call = draw(_seq(dtype, kind))
    x, *states, weights = call.args
    small = tuple(_clip_unit(w, dtype) for w in weights)
    return Call((_clip_unit(x, dtype), *states, small), call.kwargs)


@prop("lstm", strategy=lambda dtype: _small_seq(dtype, "lstm"))
def forget_open_input_closed_keeps_cell(run, call: Call, dtype: str):
    """With the forget gate saturated open (σ(f) = 1) and the input gate closed
    (σ(i) = 0), every layer keeps its cell state: ``c_n = c0``."""
    x, h0, c0, weights = call.args
    sat = _saturating_bias(weights, x, [h0, c0])
    pinned = _pinned(weights, {0: -sat, 1: sat})
    _, _, c_n = run("lstm", x, h0, c0, pinned, **call.kwargs)
    yield Close("c_n = c0", c_n, c0, k=x.shape[1], scale=1 + _max_abs([c0]))


@prop("gru", strategy=lambda dtype: _small_seq(dtype, "gru"))
def update_saturated_keeps_h(run, call: Call, dtype: str):
    """With the update gate saturated at 1 (``h' = (1−z) n + z h``, z = 1) every layer
    keeps its state: ``h_n = h0`` and each output equals that direction's ``h0``."""
    x, h0, weights = call.args
    L, D = call.kwargs["num_layers"], 2 if call.kwargs["bidirectional"] else 1
    sat = _saturating_bias(weights, x, [h0])
    out, h_n = run("gru", x, h0, _pinned(weights, {1: sat}), **call.kwargs)
    # a step that blends as h + z(…)(n − h) or n + z(h − n) rounds once per step at the
    # magnitude of its terms, |h0| and |n| ≤ 1
    m = 1 + _max_abs([h0])
    yield Close("h_n = h0", h_n, h0, k=x.shape[1], scale=m)
    top = np.concatenate([h0[(L - 1) * D + j] for j in range(D)], axis=-1)
    yield Close("out[:, t] = h0 of the top layer", out,
                np.broadcast_to(top[:, None], out.shape), k=x.shape[1], scale=m)


@prop("rnn_lm_loss", strategy=lambda dtype: _lm(dtype, truncation=True))
def truncation_keeps_value(run, call: Call, dtype: str):
    """Truncated BPTT changes gradients only: the loss equals the untruncated loss."""
    yield Close("loss(k) = loss(None)", run("rnn_lm_loss", *call.args, **call.kwargs),
                run("rnn_lm_loss", *call.args, bptt_truncation=None), k=_lm_k(call),
                scale=_summand_scale(call.args[3:], call.args[1:3], None))


@prop("rnn_lm_loss", strategy=lambda dtype: _lm(dtype, truncation=False))
def mean_of_unrolled_cross_entropy(run, call: Call, dtype: str):
    """The RNN-LM loss = cross_entropy of the unrolled logits ``rnn(E[tokens[:, :-1]]) W_outᵀ
    + b_out`` against ``tokens[:, 1:]`` (both ops of the implementation under test; the
    logits rounded to the dtype under test)."""
    tok, E, h0, W_ih, W_hh, b_ih, b_hh, W_out, b_out = call.args
    x = E[tok[:, :-1]]
    out, _ = run("rnn", x, h0[None], (W_ih, W_hh, b_ih, b_hh))
    logits = out @ W_out.astype(np.float64).T + b_out.astype(np.float64)
    V = W_out.shape[0]
    ce = run("cross_entropy", d.as_dtype(logits.reshape(-1, V), dtype), tok[:, 1:].reshape(-1))
    yield Close("rnn_lm_loss = mean CE of unrolled logits", run("rnn_lm_loss", *call.args),
                ce, k=_lm_k(call), scale=_summand_scale(call.args[3:], call.args[1:3], None))


@prop("window_lm")
def no_W3_is_zero_W3(run, call: Call, dtype: str):
    """Dropping the direct connections (``W3=None``) is the same as ``W3 = 0``."""
    ctx, E, W1, b1, W2, _, b3 = call.args
    zero = np.zeros((W2.shape[0], W1.shape[1]), dtype=W1.dtype)
    yield Close("window_lm(W3=None) = window_lm(W3=0)", run("window_lm", ctx, E, W1, b1, W2,
                                                            None, b3),
                run("window_lm", ctx, E, W1, b1, W2, zero, b3),
                k=W1.shape[1] + W1.shape[0] + 1, scale=_summand_scale(call.args[1:], (), None))
