"""Mutation tests of the recurrent family: each realistic bug below, put in place of one
op of the torch backend, must make the conformance suite report ``fail`` for that op;
the unmutated torch functions must pass the same checks (so no mutant fails by accident)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

import torch

from lmspec.backends import torch_recurrent as tr

# -- the bugs -------------------------------------------------------------------------------

def _permute_blocks(a: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([a.chunk(len(order), dim=0)[j] for j in order], dim=0)


def _swap_gates(weights, order):
    return tuple(_permute_blocks(w, order) for w in weights)


def lstm_i_f_swapped(x, h0, c0, weights, num_layers=1, bidirectional=False):
    """Reads the gate blocks as ``f, i, g, o``."""
    return tr.lstm(x, h0, c0, _swap_gates(weights, (1, 0, 2, 3)), num_layers, bidirectional)


def lstm_cell_g_o_swapped(x, h, c, W_ih, W_hh, b_ih, b_hh):
    """Reads the gate blocks as ``i, f, o, g``."""
    return tr.lstm_cell(x, h, c, *_swap_gates((W_ih, W_hh, b_ih, b_hh), (0, 1, 3, 2)))


def gru_r_z_swapped(x, h0, weights, num_layers=1, bidirectional=False,
                    linear_before_reset=True):
    """Reads the gate blocks as ``z, r, n``."""
    return tr.gru(x, h0, _swap_gates(weights, (1, 0, 2)), num_layers, bidirectional,
                  linear_before_reset)


def gru_always_cudnn_variant(x, h0, weights, num_layers=1, bidirectional=False,
                             linear_before_reset=True):
    """Answers ``linear_before_reset=False`` with torch's kernel (reset after the matmul)."""
    return tr.gru(x, h0, weights, num_layers, bidirectional, True)


def gru_cell_always_cudnn_variant(x, h, W_ih, W_hh, b_ih, b_hh, linear_before_reset=True):
    return tr.gru_cell(x, h, W_ih, W_hh, b_ih, b_hh, True)


def _reverse_half_flipped(out, bidirectional):
    if not bidirectional:
        return out
    H = out.shape[-1] // 2
    return torch.cat([out[..., :H], out[..., H:].flip(1)], dim=-1)


def rnn_reverse_outputs_left_reversed(x, h0, weights, num_layers=1, bidirectional=False,
                                      nonlinearity="tanh"):
    """The reverse direction's outputs stored in processing order, not at their time index."""
    out, h_n = tr.rnn(x, h0, weights, num_layers, bidirectional, nonlinearity)
    return _reverse_half_flipped(out, bidirectional), h_n


def gru_reverse_outputs_left_reversed(x, h0, weights, num_layers=1, bidirectional=False,
                                      linear_before_reset=True):
    out, h_n = tr.gru(x, h0, weights, num_layers, bidirectional, linear_before_reset)
    return _reverse_half_flipped(out, bidirectional), h_n


def _direction_major(h, num_layers, bidirectional):
    """``h_n`` ordered ``direction·L + layer`` instead of ``layer·D + direction``."""
    D = 2 if bidirectional else 1
    return h.reshape(num_layers, D, *h.shape[1:]).transpose(0, 1).reshape(h.shape)


def lstm_states_direction_major(x, h0, c0, weights, num_layers=1, bidirectional=False):
    out, h_n, c_n = tr.lstm(x, h0, c0, weights, num_layers, bidirectional)
    return (out, _direction_major(h_n, num_layers, bidirectional),
            _direction_major(c_n, num_layers, bidirectional))


def rnn_h_n_direction_major(x, h0, weights, num_layers=1, bidirectional=False,
                            nonlinearity="tanh"):
    out, h_n = tr.rnn(x, h0, weights, num_layers, bidirectional, nonlinearity)
    return out, _direction_major(h_n, num_layers, bidirectional)


def rnn_lm_loss_truncation_ignored(tokens, E, h0, W_ih, W_hh, b_ih, b_hh, W_out, b_out,
                                   bptt_truncation=None):
    """Full BPTT whatever ``bptt_truncation`` says: same value, different gradient."""
    return tr.rnn_lm_loss(tokens, E, h0, W_ih, W_hh, b_ih, b_hh, W_out, b_out, None)


# (op, bug, the checks that must catch it: shrinking a failure is the slow part of a run,
# so each mutant runs only the check it must fail)
MUTANTS = [
    ("lstm", lstm_i_f_swapped, ("forward",)),
    ("lstm_cell", lstm_cell_g_o_swapped, ("forward",)),
    ("gru", gru_r_z_swapped, ("forward",)),
    ("gru", gru_always_cudnn_variant, ("forward",)),
    ("gru_cell", gru_cell_always_cudnn_variant, ("forward",)),
    ("rnn", rnn_reverse_outputs_left_reversed, ("forward",)),
    ("gru", gru_reverse_outputs_left_reversed, ("forward",)),
    ("lstm", lstm_states_direction_major, ("forward",)),
    ("rnn", rnn_h_n_direction_major, ("forward",)),
    ("rnn_lm_loss", rnn_lm_loss_truncation_ignored, ("vjp",)),
]


# -- running them through the conformance harness (``run_mutant``: tests/conftest.py) -------

@pytest.mark.parametrize("op,fn,checks", MUTANTS, ids=[m[1].__name__ for m in MUTANTS])
def test_mutant_is_caught(run_mutant, op, fn, checks):
    results = run_mutant(op, fn, checks=checks)
    assert results and all(r["op"] == op for r in results)
    assert any(r["status"] == "fail" for r in results), [
        (r["check"], r["status"], r["message"]) for r in results]


@pytest.mark.parametrize("op", sorted({m[0] for m in MUTANTS}))
def test_unmutated_backend_passes_the_same_checks(run_mutant, op):
    results = run_mutant(op, getattr(tr, op), checks=("forward", "vjp"), max_examples=30)
    assert all(r["status"] == "pass" for r in results), [
        (r["check"], r["status"], r["message"]) for r in results]
