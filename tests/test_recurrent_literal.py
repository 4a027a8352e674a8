"""The buffered scans of the recurrent family agree with the literal step equations.

``lmspec._recurrence`` runs RNN/LSTM/GRU layers as cuDNN does (one input GEMM over the
sequence, in-place gate arithmetic); ``rnn_step``, ``lstm_step`` and ``gru_step`` beside
it are CONTRACT §2's equations written out for one step. Cells and whole sequences
(stacked, bidirectional) must agree with a plain Python loop over those steps.
"""

from __future__ import annotations

import numpy as np
import pytest

import lmspec
from lmspec._recurrence import gru_step, lstm_step, rnn_step

RNG = np.random.default_rng(7)
B, T, I, H = 3, 5, 4, 6


def weights(gates: int, in_size: int) -> tuple[np.ndarray, ...]:
    return (RNG.normal(size=(gates * H, in_size)) / 2, RNG.normal(size=(gates * H, H)) / 2,
            RNG.normal(size=gates * H) / 2, RNG.normal(size=gates * H) / 2)


def test_cells_are_their_literal_steps():
    x, h, c = RNG.normal(size=(B, I)), RNG.normal(size=(B, H)), RNG.normal(size=(B, H))
    w1, w4, w3 = weights(1, I), weights(4, I), weights(3, I)
    for nl in ("tanh", "relu"):
        np.testing.assert_allclose(lmspec.rnn_cell(x, h, *w1, nonlinearity=nl),
                                   rnn_step(x, h, *w1, nonlinearity=nl), rtol=1e-13, atol=1e-14)
    for got, want in zip(lmspec.lstm_cell(x, h, c, *w4), lstm_step(x, h, c, *w4), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)
    for lbr in (True, False):
        np.testing.assert_allclose(lmspec.gru_cell(x, h, *w3, linear_before_reset=lbr),
                                   gru_step(x, h, *w3, linear_before_reset=lbr),
                                   rtol=1e-13, atol=1e-14)


def _loop(step, x, states, w, reverse, **kw):
    """A layer as a Python loop over the literal step: outputs at their time index."""
    out = [None] * x.shape[1]
    for t in (reversed(range(x.shape[1])) if reverse else range(x.shape[1])):
        res = step(x[:, t], *states, *w, **kw)
        states = res if isinstance(res, tuple) else (res,)
        out[t] = states[0]
    return np.stack(out, axis=1), states


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("num_layers, bidirectional", [(1, False), (2, True)])
def test_sequences_are_loops_over_the_literal_steps(kind, num_layers, bidirectional):
    gates, n_state, step = {"rnn": (1, 1, rnn_step), "lstm": (4, 2, lstm_step),
                            "gru": (3, 1, gru_step)}[kind]
    D = 2 if bidirectional else 1
    x = RNG.normal(size=(B, T, I))
    init = [RNG.normal(size=(num_layers * D, B, H)) for _ in range(n_state)]
    flat, layers = [], []
    for layer in range(num_layers):
        per_dir = [weights(gates, I if layer == 0 else D * H) for _ in range(D)]
        layers.append(per_dir)
        flat += [a for w in per_dir for a in w]
    got = getattr(lmspec, kind)(x, *init, tuple(flat), num_layers=num_layers,
                                bidirectional=bidirectional)
    inp, finals = x, [[] for _ in range(n_state)]
    for layer, per_dir in enumerate(layers):
        outs = []
        for d, w in enumerate(per_dir):
            states = tuple(s[layer * D + d] for s in init)
            o, last = _loop(step, inp, states, w, reverse=d == 1)
            outs.append(o)
            for k in range(n_state):
                finals[k].append(last[k])
        inp = np.concatenate(outs, axis=-1)
    want = (inp, *(np.stack(f) for f in finals))
    for g, w_ in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w_, rtol=1e-12, atol=1e-13)
