"""Recurrent family in JAX: cells from ``jnp`` matmuls, ``jax.nn.sigmoid``, ``jnp.tanh``
and ``jax.nn.relu``; sequences as ``jax.lax.scan`` over time (``reverse=True`` for the
reverse direction), with the catalogue's gate layouts (LSTM ``i, f, g, o``; GRU
``r, z, n``). JAX has no recurrent-network kernel of its own (``jax.lax.scan`` over the
cell is how JAX code writes one, as Flax's ``nn.RNN`` does); see ``NOTES``.

The language models use ``jnp.take`` for the embeddings, ``jax.nn.log_softmax`` for the
cross-entropy and ``jax.nn.log_sigmoid`` for the binary cross-entropy with logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmspec.backends.jax_attention import AT_30, half_findings, half_intermediates

NOTES = {
    "rnn_cell": "tanh(x W_ihᵀ + b_ih + h W_hhᵀ + b_hh) with jnp.tanh or jax.nn.relu.",
    "lstm_cell": "jax.nn.sigmoid / jnp.tanh on the gate blocks i, f, g, o of "
    "x W_ihᵀ + b_ih + h W_hhᵀ + b_hh.",
    "gru_cell": "gate blocks r, z, n; both reset placements composed (h' = (1−z)⊙n + z⊙h).",
    "rnn": "jax.lax.scan over the cell per layer and direction (reverse=True for the "
    "reverse direction).",
    "lstm": "jax.lax.scan over lstm_cell, as rnn.",
    "gru": "jax.lax.scan over gru_cell, as rnn.",
    "window_lm": "jnp.take embeddings, jnp.tanh hidden layer, matmuls.",
    "rnn_lm_loss": "jax.lax.scan of the tanh cell block by block, the state handed to the "
    "next block through jax.lax.stop_gradient; cross-entropy from jax.nn.log_softmax.",
    "text_classifier_loss": "masked mean of jnp.take embeddings; binary cross-entropy with "
    "logits as −y·log_sigmoid(s) − (1−y)·log_sigmoid(−s) (jax.nn.log_sigmoid).",
}


DEVIATIONS = half_intermediates(
    "lstm_cell/*/{dtype}",
    "the cell's matmuls (XLA's CPU dot at jax's default precision) return the gate "
    "pre-activations as arrays of the input dtype, and the gates and the cell state are "
    "computed in it (rounded to it), as in any JAX code that runs the cell in that dtype.",
    {"float16": 3.91, "bfloat16": 4.29}) | half_intermediates(
    "gru_cell/*/{dtype}",
    "the cell's matmuls (XLA's CPU dot at jax's default precision) return the gate "
    "pre-activations as arrays of the input dtype, and the gates and the new state are "
    "computed in it (rounded to it), and its backward likewise.",
    {"float16": 6.95, "bfloat16": 3.56}, AT_30, "0.327") | half_findings({
    "rnn_cell/forward": {"float16": 1.77, "bfloat16": 5.61},
    "rnn_cell/vjp": {"float16": 18.3, "bfloat16": 267},
    "rnn/forward": {"float16": 2.32, "bfloat16": 29.9},
    "rnn/vjp": {"float16": 5.11, "bfloat16": 4.26},
    "lstm/forward": {"float16": 4.3, "bfloat16": 1.8},
    "lstm/vjp": {"float16": 1.23, "bfloat16": 8.81},
    "gru/forward": {"float16": 3.37, "bfloat16": 3.06},
    "gru/vjp": {"float16": 3.29, "bfloat16": 8.19},
    "window_lm/forward": {"bfloat16": 78},
    "window_lm/vjp": {"float16": 112, "bfloat16": 12.1},
    "rnn_lm_loss/forward": {"float16": 12.6, "bfloat16": 2.2},
    "rnn_lm_loss/vjp": {"float16": 2.86, "bfloat16": 3.09},
    "text_classifier_loss/forward": {"float16": 1.93, "bfloat16": 1.13},
    "text_classifier_loss/vjp": {"float16": 14.4, "bfloat16": 10.4},
}, "composed as JAX code writes it (matmuls at jax's default precision on XLA CPU, jnp.tanh, "
    "jax.nn.sigmoid, jax.lax.scan, jax.nn.log_softmax / jax.nn.log_sigmoid): every sub-op's "
    "output, the hidden states and the logits included, is an array of the input dtype "
    "(rounded to it), and jax.vjp's backward likewise.")


def _linear(x, W, b=None):
    y = x @ W.T
    return y if b is None else y + b


def _act(name: str):
    return {"tanh": jnp.tanh, "relu": jax.nn.relu}[name]


def rnn_cell(x, h, W_ih, W_hh, b_ih, b_hh, nonlinearity="tanh"):
    return _act(nonlinearity)(_linear(x, W_ih, b_ih) + _linear(h, W_hh, b_hh))


def lstm_cell(x, h, c, W_ih, W_hh, b_ih, b_hh):
    i, f, g, o = jnp.split(_linear(x, W_ih, b_ih) + _linear(h, W_hh, b_hh), 4, axis=-1)
    c1 = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c1), c1


def gru_cell(x, h, W_ih, W_hh, b_ih, b_hh, linear_before_reset=True):
    H = h.shape[-1]
    xr, xz, xn = jnp.split(_linear(x, W_ih, b_ih), 3, axis=-1)
    if linear_before_reset:
        hr, hz, hn = jnp.split(_linear(h, W_hh, b_hh), 3, axis=-1)
        r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
    else:
        hr, hz = jnp.split(_linear(h, W_hh[:2 * H], b_hh[:2 * H]), 2, axis=-1)
        r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + _linear(r * h, W_hh[2 * H:], b_hh[2 * H:]))
    return (1 - z) * n + z * h


def _scan(step, x, state, reverse: bool):
    """``step(x_t, state) -> state`` over the time axis of ``x[B,T,I]``; the first state
    member is the output. Returns ``(out[B,T,H], final state)``."""
    def body(carry, xt):
        new = step(xt, carry)
        return new, new[0]

    final, ys = jax.lax.scan(body, state, jnp.swapaxes(x, 0, 1), reverse=reverse)
    return jnp.swapaxes(ys, 0, 1), final


def _sequence(step, x, states, weights, num_layers, bidirectional):
    """Every layer and direction; ``states`` is a tuple of ``[L·D,B,H]`` initial states."""
    D = 2 if bidirectional else 1
    inp, finals = x, []
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            idx = layer * D + d
            w = weights[4 * idx:4 * idx + 4]
            out, final = _scan(lambda xt, s, w=w: step(xt, s, w), inp,
                               tuple(s[idx] for s in states), reverse=bool(d))
            outs.append(out)
            finals.append(final)
        inp = jnp.concatenate(outs, axis=-1)
    return (inp, *(jnp.stack([f[k] for f in finals]) for k in range(len(states))))


def rnn(x, h0, weights, num_layers=1, bidirectional=False, nonlinearity="tanh"):
    return _sequence(lambda xt, s, w: (rnn_cell(xt, s[0], *w, nonlinearity=nonlinearity),),
                     x, (h0,), weights, num_layers, bidirectional)


def lstm(x, h0, c0, weights, num_layers=1, bidirectional=False):
    return _sequence(lambda xt, s, w: lstm_cell(xt, s[0], s[1], *w), x, (h0, c0), weights,
                     num_layers, bidirectional)


def gru(x, h0, weights, num_layers=1, bidirectional=False, linear_before_reset=True):
    return _sequence(
        lambda xt, s, w: (gru_cell(xt, s[0], *w, linear_before_reset=linear_before_reset),),
        x, (h0,), weights, num_layers, bidirectional)


def window_lm(context, E, W1, b1, W2, W3, b3):
    x = jnp.take(E, context, axis=0).reshape(context.shape[0], -1)
    logits = _linear(jnp.tanh(_linear(x, W1, b1)), W2, b3)
    return logits if W3 is None else logits + _linear(x, W3)


def _mean_cross_entropy(logits, targets):
    lp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(lp, targets[:, None], axis=-1))


def rnn_lm_loss(tokens, E, h0, W_ih, W_hh, b_ih, b_hh, W_out, b_out, bptt_truncation=None):
    x = jnp.take(E, tokens[:, :-1], axis=0)
    T = x.shape[1]
    k = bptt_truncation or T
    h, outs = h0, []
    for start in range(0, T, k):
        if start:
            h = jax.lax.stop_gradient(h)  # truncated BPTT: the handed-on state is a constant
        out, (h,) = _scan(lambda xt, s: (rnn_cell(xt, s[0], W_ih, W_hh, b_ih, b_hh),),
                          x[:, start:start + k], (h,), reverse=False)
        outs.append(out)
    logits = _linear(jnp.concatenate(outs, axis=1), W_out, b_out)
    return _mean_cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def text_classifier_loss(tokens, mask, labels, E, W, b, u):
    emb = jnp.take(E, tokens, axis=0)
    m = jnp.ones(tokens.shape, E.dtype) if mask is None else mask.astype(E.dtype)
    xbar = jnp.sum(emb * m[..., None], axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1)[:, None]
    s = jnp.tanh(_linear(xbar, W, b)) @ u
    y = labels.astype(s.dtype)
    return jnp.mean(-y * jax.nn.log_sigmoid(s) - (1 - y) * jax.nn.log_sigmoid(-s))
