"""The recurrent family: reference vs independent oracles, vjps vs finite differences,
input validation, and the torch backend vs the reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

pytest.importorskip("torch")

import torch
from torch import nn

import lmspec
from lmspec.backends.torch_backend import TorchBackend
from lmspec.conformance.oracles import finite_difference_vjp as fd_vjp

GATES = {"rnn": 1, "lstm": 4, "gru": 3}
F64 = dict(atol=1e-12, rtol=1e-10)


# -- random calls ----------------------------------------------------------------------------

def seq_call(kind, rng, B=2, T=3, I=3, H=4, L=1, D=1, w_scale=0.7, **opts):
    G = GATES[kind]
    x = rng.normal(size=(B, T, I))
    states = [rng.normal(size=(L * D, B, H)) for _ in range(2 if kind == "lstm" else 1)]
    weights = []
    for layer in range(L):
        for _ in range(D):
            isz = I if layer == 0 else D * H
            weights += [rng.normal(size=s) * w_scale
                        for s in ((G * H, isz), (G * H, H), (G * H,), (G * H,))]
    return (x, *states, tuple(weights)), dict(num_layers=L, bidirectional=D == 2, **opts)


def cell_call(kind, rng, B=3, I=2, H=4, w_scale=0.8, **opts):
    G = GATES[kind]
    states = [rng.normal(size=(B, H)) for _ in range(2 if kind == "lstm" else 1)]
    w = [rng.normal(size=s) * w_scale for s in ((G * H, I), (G * H, H), (G * H,), (G * H,))]
    return (rng.normal(size=(B, I)), *states, *w), opts


def window_call(rng, B=3, n1=2, V=5, d=3, Hd=4, with_W3=True):
    ctx = rng.integers(0, V, size=(B, n1))
    W3 = rng.normal(size=(V, n1 * d)) if with_W3 else None
    return (ctx, rng.normal(size=(V, d)), rng.normal(size=(Hd, n1 * d)), rng.normal(size=Hd),
            rng.normal(size=(V, Hd)), W3, rng.normal(size=V)), {}


def lm_call(rng, B=2, T=5, V=6, I=3, H=4, k=None):
    tok = rng.integers(0, V, size=(B, T + 1))
    return (tok, rng.normal(size=(V, I)), rng.normal(size=(B, H)),
            rng.normal(size=(H, I)), rng.normal(size=(H, H)), rng.normal(size=H),
            rng.normal(size=H), rng.normal(size=(V, H)), rng.normal(size=V)), \
        {"bptt_truncation": k}


def classifier_call(rng, B=4, T=3, V=5, d=3, H=4):
    tok = rng.integers(0, V, size=(B, T))
    mask = rng.random((B, T)) < 0.6
    mask[0] = False  # a row with no token
    labels = rng.integers(0, 2, size=B).astype(np.float64)
    return (tok, mask, labels, rng.normal(size=(V, d)), rng.normal(size=(H, d)),
            rng.normal(size=H), rng.normal(size=H)), {}


def random_cot(out, rng):
    if isinstance(out, tuple):
        return tuple(random_cot(o, rng) for o in out)
    return rng.normal(size=np.shape(out))


def assert_tree_close(got, want, **tol):
    if want is None:
        assert got is None
        return
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_tree_close(g, w, **tol)
        return
    np.testing.assert_allclose(got, want, **tol)


FD_CASES = [
    ("rnn_cell", lambda r: cell_call("rnn", r)),
    ("rnn_cell", lambda r: cell_call("rnn", r, nonlinearity="relu")),
    ("lstm_cell", lambda r: cell_call("lstm", r)),
    ("gru_cell", lambda r: cell_call("gru", r)),
    ("gru_cell", lambda r: cell_call("gru", r, linear_before_reset=False)),
    ("rnn", lambda r: seq_call("rnn", r, L=2, D=2)),
    ("rnn", lambda r: seq_call("rnn", r, T=1, L=1, D=2, nonlinearity="relu")),
    ("lstm", lambda r: seq_call("lstm", r, L=2, D=2, I=2, H=3)),
    ("lstm", lambda r: seq_call("lstm", r, L=3, D=1, T=2, H=2)),
    ("gru", lambda r: seq_call("gru", r, L=2, D=2, H=3)),
    ("gru", lambda r: seq_call("gru", r, L=2, D=2, H=3, linear_before_reset=False)),
    ("window_lm", lambda r: window_call(r)),
    ("window_lm", lambda r: window_call(r, with_W3=False)),
    ("rnn_lm_loss", lambda r: lm_call(r)),
    ("rnn_lm_loss", lambda r: lm_call(r, T=4, k=2)),
    ("rnn_lm_loss", lambda r: lm_call(r, T=5, k=3)),
    ("text_classifier_loss", lambda r: classifier_call(r)),
]


@pytest.mark.parametrize("i", range(len(FD_CASES)), ids=[f"{op}-{i}" for i, (op, _) in
                                                            enumerate(FD_CASES)])
def test_vjp_matches_finite_differences(i):
    op, make = FD_CASES[i]
    rng = np.random.default_rng(100 + i)
    args, kwargs = make(rng)
    cot = random_cot(lmspec.OPS[op].reference(*args, **kwargs), rng)
    if op == "rnn_lm_loss" and kwargs["bptt_truncation"]:
        # the truncated gradient is not the derivative of the loss: check it in its own test
        kwargs = {**kwargs, "bptt_truncation": None}
    got = lmspec.vjp(op, args, kwargs, cot)
    assert_tree_close(got, fd_vjp(op, args, kwargs, cot), atol=1e-6, rtol=1e-6)


# -- the reference vs torch's own modules (float64, autograd) ---------------------------------

def t64(a):
    return torch.tensor(a, dtype=torch.float64, requires_grad=True)


def torch_grads(outputs, cots, leaves):
    outs = outputs if isinstance(outputs, tuple) else (outputs,)
    cs = cots if isinstance(cots, tuple) else (cots,)
    grads = torch.autograd.grad(outs, leaves, [torch.tensor(c, dtype=torch.float64) for c in cs],
                                allow_unused=True)
    return [np.zeros(tuple(p.shape)) if g is None else g.numpy()
            for g, p in zip(grads, leaves, strict=True)]


MODULES = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


@pytest.mark.parametrize("kind,L,D,opts", [
    (kind, L, D, opts)
    for kind, L, D in itertools.product(("rnn", "lstm", "gru"), (1, 2, 3), (1, 2))
    for opts in ([{}, {"nonlinearity": "relu"}] if kind == "rnn" else [{}])
])
def test_sequence_matches_torch_module(kind, L, D, opts):
    rng = np.random.default_rng(L * 10 + D)
    args, kwargs = seq_call(kind, rng, B=2, T=4, I=3, H=5, L=L, D=D, **opts)
    x, *states, weights = args
    mod = MODULES[kind](3, 5, L, batch_first=True, bidirectional=D == 2, **opts).double()
    with torch.no_grad():
        for p, w in zip(mod._flat_weights, weights, strict=True):
            p.copy_(torch.tensor(w))
    tx = t64(x)
    ts = [t64(s) for s in states]
    out, hn = mod(tx, tuple(ts) if kind == "lstm" else ts[0])
    t_out = (out, *hn) if kind == "lstm" else (out, hn)
    ref = lmspec.OPS[kind].reference(*args, **kwargs)
    for r, t in zip(ref, t_out, strict=True):
        np.testing.assert_allclose(r, t.detach().numpy(), **F64)
    cot = random_cot(ref, rng)
    tg = torch_grads(t_out, cot, [tx, *ts, *mod._flat_weights])
    g = lmspec.vjp(kind, args, kwargs, cot)
    for got, want in zip([g[0], *g[1:-1], *g[-1]], tg, strict=True):
        np.testing.assert_allclose(got, want, **F64)


CELL_MODULES = {"rnn_cell": nn.RNNCell, "lstm_cell": nn.LSTMCell, "gru_cell": nn.GRUCell}


@pytest.mark.parametrize("op,opts", [("rnn_cell", {}), ("rnn_cell", {"nonlinearity": "relu"}),
                                     ("lstm_cell", {}), ("gru_cell", {})])
def test_cell_matches_torch_module(op, opts):
    rng = np.random.default_rng(7)
    kind = op.removesuffix("_cell")
    args, kwargs = cell_call(kind, rng, B=3, I=2, H=4, w_scale=1.5, **opts)
    n_state = 2 if kind == "lstm" else 1
    mod = CELL_MODULES[op](2, 4, **opts).double()
    with torch.no_grad():
        for p, w in zip((mod.weight_ih, mod.weight_hh, mod.bias_ih, mod.bias_hh),
                        args[1 + n_state:], strict=True):
            p.copy_(torch.tensor(w))
    tx, ts = t64(args[0]), [t64(s) for s in args[1:1 + n_state]]
    out = mod(tx, tuple(ts) if kind == "lstm" else ts[0])
    ref = lmspec.OPS[op].reference(*args, **kwargs)
    assert_tree_close(ref, tuple(o.detach().numpy() for o in out) if kind == "lstm"
                      else out.detach().numpy(), **F64)
    cot = random_cot(ref, rng)
    tg = torch_grads(out, cot, [tx, *ts, mod.weight_ih, mod.weight_hh, mod.bias_ih,
                                mod.bias_hh])
    for got, want in zip(lmspec.vjp(op, args, kwargs, cot), tg, strict=True):
        np.testing.assert_allclose(got, want, **F64)


def _onnx_gru(x, h0, weights, bidirectional, linear_before_reset):
    """ONNX's reference evaluator (gate order z, r, h; time-major) for one GRU layer."""
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    D, H = h0.shape[0], h0.shape[2]

    def zrh(a):  # our r, z, n blocks -> ONNX's z, r, h
        r, z, n = np.split(a, 3, axis=0)
        return np.concatenate([z, r, n], axis=0)

    dirs = [weights[4 * d:4 * d + 4] for d in range(D)]
    W = np.stack([zrh(w[0]) for w in dirs])
    R = np.stack([zrh(w[1]) for w in dirs])
    Bias = np.stack([np.concatenate([zrh(w[2]), zrh(w[3])]) for w in dirs])
    node = helper.make_node("GRU", ["X", "W", "R", "B", "", "initial_h"], ["Y", "Y_h"],
                            hidden_size=H, linear_before_reset=int(linear_before_reset),
                            direction="bidirectional" if bidirectional else "forward")
    names = ("X", "W", "R", "B", "initial_h")
    graph = helper.make_graph(
        [node], "gru", [helper.make_tensor_value_info(n, TensorProto.DOUBLE, None) for n in names],
        [helper.make_tensor_value_info(n, TensorProto.DOUBLE, None) for n in ("Y", "Y_h")])
    Y, Y_h = ReferenceEvaluator(helper.make_model(graph)).run(
        None, {"X": x.transpose(1, 0, 2), "W": W, "R": R, "B": Bias, "initial_h": h0})
    B, T = x.shape[:2]
    return Y.transpose(2, 0, 1, 3).reshape(B, T, D * H), Y_h  # [T,D,B,H] -> [B,T,D·H]


@pytest.mark.parametrize("lbr,D", list(itertools.product((False, True), (1, 2))))
def test_gru_matches_onnx_reference_evaluator(lbr, D):
    """Both GRU variants against ONNX's evaluator (the only independent implementation of
    the reset-before-matmul form at hand)."""
    pytest.importorskip("onnx.reference")
    rng = np.random.default_rng(3)
    args, kwargs = seq_call("gru", rng, B=2, T=4, I=3, H=5, D=D, w_scale=1.2,
                            linear_before_reset=lbr)
    out, h_n = lmspec.gru(*args, **kwargs)
    y, y_h = _onnx_gru(*args, bidirectional=D == 2, linear_before_reset=lbr)
    np.testing.assert_allclose(out, y, **F64)
    np.testing.assert_allclose(h_n, y_h, **F64)


def test_gru_variants_differ():
    args, kwargs = cell_call("gru", np.random.default_rng(0))
    a = lmspec.gru_cell(*args, linear_before_reset=True)
    b = lmspec.gru_cell(*args, linear_before_reset=False)
    assert np.max(np.abs(a - b)) > 1e-3


def _torch_window(ctx, E, W1, b1, W2, W3, b3):
    emb = nn.Embedding.from_pretrained(E, freeze=False)
    x = emb(torch.tensor(ctx)).reshape(len(ctx), -1)
    out = torch.tanh(x @ W1.T + b1) @ W2.T + b3
    return out if W3 is None else out + x @ W3.T, emb.weight


@pytest.mark.parametrize("with_W3", [True, False])
def test_window_lm_matches_torch(with_W3):
    rng = np.random.default_rng(11)
    args, _ = window_call(rng, B=4, n1=3, V=6, d=2, Hd=5, with_W3=with_W3)
    ctx, *floats = args
    leaves = [None if a is None else t64(a) for a in floats]
    out, emb_w = _torch_window(ctx, *leaves)
    ref = lmspec.window_lm(*args)
    np.testing.assert_allclose(ref, out.detach().numpy(), **F64)
    cot = rng.normal(size=ref.shape)
    used = [emb_w] + [t for t in leaves[1:] if t is not None]
    tg = torch_grads(out, cot, used)
    g = [a for a in lmspec.vjp("window_lm", args, {}, cot)[1:] if a is not None]
    for got, want in zip(g, tg, strict=True):
        np.testing.assert_allclose(got, want, **F64)


def _torch_rnn_lm(tok, E, h0, W_ih, W_hh, b_ih, b_hh, W_out, b_out, k):
    """nn.RNNCell stepped by hand, the state detached at the start of every block of k."""
    cell = nn.RNNCell(W_ih.shape[1], W_ih.shape[0]).double()
    for name, p in (("weight_ih", W_ih), ("weight_hh", W_hh), ("bias_ih", b_ih),
                    ("bias_hh", b_hh)):
        delattr(cell, name)
        setattr(cell, name, p)
    h, logits = h0, []
    for t in range(tok.shape[1] - 1):
        if k and t and t % k == 0:
            h = h.detach()
        h = cell(E[torch.tensor(tok[:, t])], h)
        logits.append(h @ W_out.T + b_out)
    lg = torch.stack(logits, dim=1)
    return nn.CrossEntropyLoss()(lg.reshape(-1, lg.shape[-1]),
                                 torch.tensor(tok[:, 1:]).reshape(-1))


@pytest.mark.parametrize("T,k", [(5, None), (5, 1), (5, 2), (6, 3), (4, 4), (3, 7)])
def test_rnn_lm_loss_matches_torch_truncated_autograd(T, k):
    rng = np.random.default_rng(T * 10 + (k or 0))
    args, kwargs = lm_call(rng, B=3, T=T, k=k)
    leaves = [t64(a) for a in args[1:]]
    loss = _torch_rnn_lm(args[0], *leaves, k)
    assert lmspec.rnn_lm_loss(*args, **kwargs) == pytest.approx(loss.item(), rel=1e-13)
    tg = torch_grads(loss, 0.7, leaves)
    g = lmspec.vjp("rnn_lm_loss", args, kwargs, 0.7)
    for got, want in zip(g[1:], tg, strict=True):
        np.testing.assert_allclose(got, want, **F64)


def test_truncation_changes_the_gradient_only():
    args, _ = lm_call(np.random.default_rng(5), T=6)
    full = lmspec.vjp("rnn_lm_loss", args, {"bptt_truncation": None}, 1.0)
    trunc = lmspec.vjp("rnn_lm_loss", args, {"bptt_truncation": 2}, 1.0)
    assert lmspec.rnn_lm_loss(*args, bptt_truncation=2) == lmspec.rnn_lm_loss(*args)
    assert np.max(np.abs(full[3] - trunc[3])) > 1e-6  # W_ih
    np.testing.assert_array_equal(full[7], trunc[7])  # W_out: no recurrence involved
    same = lmspec.vjp("rnn_lm_loss", args, {"bptt_truncation": 6}, 1.0)
    assert_tree_close(same, full, atol=0, rtol=0)


def test_text_classifier_matches_torch_and_bce():
    rng = np.random.default_rng(2)
    args, _ = classifier_call(rng, B=5, T=4)
    tok, mask, labels, E, W, b, u = args
    count = np.maximum(mask.sum(1), 1)
    tE, tW, tb, tu = (t64(a) for a in (E, W, b, u))
    bag = nn.EmbeddingBag.from_pretrained(tE, freeze=False, mode="sum")
    xbar = bag(torch.tensor(tok), per_sample_weights=torch.tensor(mask / count[:, None]))
    s = torch.tanh(xbar @ tW.T + tb) @ tu
    loss = nn.BCEWithLogitsLoss()(s, torch.tensor(labels))
    ref = lmspec.text_classifier_loss(*args)
    assert ref == pytest.approx(loss.item(), rel=1e-13)
    p = torch.sigmoid(s).detach().numpy()  # the Bernoulli NLL, the sign of seed 003 fixed
    assert ref == pytest.approx(np.mean(-(labels * np.log(p) + (1 - labels) * np.log(1 - p))))
    tg = torch_grads(loss, 1.3, [bag.weight, tW, tb, tu])
    g = lmspec.vjp("text_classifier_loss", args, {}, 1.3)
    assert g[:3] == (None, None, None)
    for got, want in zip(g[3:], tg, strict=True):
        np.testing.assert_allclose(got, want, **F64)


def test_text_classifier_is_stable_for_saturated_scores():
    rng = np.random.default_rng(4)
    args, _ = classifier_call(rng, B=2, T=2)
    tok, mask, labels, E, W, b, u = args
    mask[:] = True
    loss = lmspec.text_classifier_loss(tok, mask, np.array([1.0, 0.0]), E, W, b, u * 1e4)
    assert np.isfinite(loss)


# -- input validation --------------------------------------------------------------------------

def _bad_seq_cases():
    rng = np.random.default_rng(0)
    (x, h0, w), kw = seq_call("rnn", rng, L=2, D=2)
    (lx, lh, lc, lw), lkw = seq_call("lstm", rng)
    gargs, gkw = seq_call("gru", rng)
    return [
        ("rnn", (x[0], h0, w), kw, "'x'"),
        ("rnn", (x, h0[:2], w), kw, "'h0'"),
        ("rnn", (x, h0, w[:-1]), kw, "'weights'"),
        ("rnn", (x, h0, list(w)[:4] + [w[4].T] + list(w[5:])), kw, "weights[4]"),
        ("rnn", (x, h0, w), {**kw, "nonlinearity": "sigmoid"}, "'nonlinearity'"),
        ("rnn", (x, h0, w), {**kw, "num_layers": 0}, "'num_layers'"),
        ("rnn", (x, h0, w), {**kw, "bidirectional": "yes"}, "'bidirectional'"),
        ("rnn", (x[:, :0], h0, w), kw, "'x'"),
        ("lstm", (lx, lh, lc[:, :1], lw), lkw, "'c0'"),
        ("gru", (lx, lh, lw), lkw, "weights[0]"),
        ("gru", gargs, {**gkw, "linear_before_reset": "no"}, "'linear_before_reset'"),
    ]


def _bad_other_cases():
    rng = np.random.default_rng(1)
    (x, h, c, *w), _ = cell_call("lstm", rng)
    (cx, ch, *cw), _ = cell_call("gru", rng)
    win, _ = window_call(rng)
    lm, _ = lm_call(rng)
    cl, _ = classifier_call(rng)
    return [
        ("lstm_cell", (x, h, c[:, :2], *w), {}, "'c'"),
        ("lstm_cell", (x, h, c, *cw), {}, "'W_ih'"),
        ("gru_cell", (cx, ch, *cw[:2], cw[2][:-1], cw[3]), {}, "'b_ih'"),
        ("rnn_cell", (x, h, *w), {}, "'W_ih'"),
        ("window_lm", (win[0] + 100,) + win[1:], {}, "'context'"),
        ("window_lm", win[:5] + (win[5][:, :-1], win[6]), {}, "'W3'"),
        ("rnn_lm_loss", lm, {"bptt_truncation": 0}, "'bptt_truncation'"),
        ("rnn_lm_loss", (lm[0][:, :1],) + lm[1:], {}, "'tokens'"),
        ("rnn_lm_loss", (lm[0] - 1,) + lm[1:], {}, "'tokens'"),
        ("rnn_lm_loss", lm[:2] + (lm[2][:1],) + lm[3:], {}, "'h0'"),
        ("text_classifier_loss", (cl[0], cl[1].astype(int)) + cl[2:], {}, "'mask'"),
        ("text_classifier_loss", cl[:2] + (cl[2] + 2,) + cl[3:], {}, "'labels'"),
        ("text_classifier_loss", cl[:5] + (cl[5][:-1], cl[6]), {}, "'b'"),
    ]


@pytest.mark.parametrize("op,args,kwargs,needle", _bad_seq_cases() + _bad_other_cases(),
                         ids=lambda p: p if isinstance(p, str) and " " not in p else None)
def test_bad_input_raises_value_error_naming_op_and_argument(op, args, kwargs, needle):
    with pytest.raises(ValueError, match=op) as info:
        lmspec.OPS[op].reference(*args, **kwargs)
    assert needle in str(info.value)
    if lmspec.OPS[op].diff:
        with pytest.raises(ValueError, match=op):
            lmspec.vjp(op, args, kwargs, 1.0)


# -- the torch backend vs the reference --------------------------------------------------------

BACKEND_CASES = FD_CASES + [
    ("gru", lambda r: seq_call("gru", r, L=3, D=2, T=4, w_scale=3.0)),
    ("lstm", lambda r: seq_call("lstm", r, L=2, D=2, T=4, w_scale=3.0)),
    ("rnn", lambda r: seq_call("rnn", r, L=2, D=1, T=5, H=2, I=5)),
]


@pytest.mark.parametrize("i", range(len(BACKEND_CASES)),
                         ids=[f"{op}-{i}" for i, (op, _) in enumerate(BACKEND_CASES)])
def test_torch_backend_matches_reference(i):
    op, make = BACKEND_CASES[i]
    rng = np.random.default_rng(200 + i)
    args, kwargs = make(rng)
    be = TorchBackend("torch-cpu", "cpu", ("float32", "float64"))
    ref = lmspec.OPS[op].reference(*args, **kwargs)
    assert_tree_close(getattr(be, op)(*args, **kwargs), ref, **F64)
    cot = random_cot(ref, rng)
    assert_tree_close(be.vjp(op, args, kwargs, cot), lmspec.vjp(op, args, kwargs, cot), **F64)


def test_torch_backend_float32_runs_in_float32():
    rng = np.random.default_rng(9)
    args, kwargs = seq_call("lstm", rng, L=2, D=2)
    a32 = (*(a.astype(np.float32) for a in args[:3]), tuple(w.astype(np.float32)
                                                           for w in args[3]))
    be = TorchBackend("torch-cpu", "cpu", ("float32", "float64"))
    out = be.lstm(*a32, **kwargs)
    assert all(o.dtype == np.float32 for o in out)
    assert_tree_close(out, lmspec.lstm(*args, **kwargs), atol=1e-5, rtol=1e-4)


# -- the conformance properties hold for the reference itself -----------------------------------

def _recurrent_properties():
    from lmspec.conformance.declare import PROPERTIES

    return sorted(k for k in PROPERTIES
                  if lmspec.OPS[k[0]].family == "recurrent" or k[0] == "rnn_lm_loss")


def _reference_runner(op, *args, **kwargs):
    out = lmspec.OPS[op].reference(*args, **kwargs)
    return tuple(np.asarray(o, dtype=np.float64) for o in out) if isinstance(out, tuple) \
        else np.asarray(out, dtype=np.float64)


@pytest.mark.parametrize("key", _recurrent_properties(), ids="/".join)
def test_property_holds_for_the_reference(key):
    from hypothesis import given, settings

    from lmspec.conformance.declare import CASES, PROPERTIES, Close

    p = PROPERTIES[key]

    @settings(max_examples=15, deadline=None, derandomize=True, database=None)
    @given((p.strategy or CASES[p.op].strategy)("float64"))
    def check(drawn):
        for claim in p.check(_reference_runner, drawn, "float64"):
            if isinstance(claim, Close):
                np.testing.assert_allclose(claim.actual, claim.expected, rtol=0,
                                           atol=1e-12 * (claim.scale or 1.0) * claim.k,
                                           err_msg=claim.what)
            else:
                assert claim.ok, (claim.what, claim.detail)

    check()


# -- low precision: the strategies hand the backend what the dtype can hold ---------------------

def _float_leaves(args):
    for a in args:
        if isinstance(a, tuple):
            yield from _float_leaves(a)
        elif isinstance(a, np.ndarray) and a.dtype.kind not in "iub":
            yield a


def _recurrent_strategies():
    from lmspec.conformance.declare import CASES, PROPERTIES

    ops = [op for op in CASES if lmspec.OPS[op].family == "recurrent"]
    found = [(op, "forward", CASES[op].strategy) for op in ops]
    found += [(op, check, p.strategy) for (op, check), p in PROPERTIES.items()
              if op in ops and p.strategy is not None]
    return found


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("op,check,strategy", _recurrent_strategies(),
                         ids=[f"{o}/{c}" for o, c, _ in _recurrent_strategies()])
def test_strategies_keep_the_dtype_under_test(op, check, strategy, dtype):
    """np.clip widens a bfloat16 array to float32: a strategy that clips must round back,
    or torch is handed mixed dtypes (oneDNN's bf16 LSTM then refuses to build a primitive)."""
    from hypothesis import given, settings

    want = lmspec.DTYPES[dtype]

    @settings(max_examples=10, deadline=None, derandomize=True, database=None)
    @given(strategy(dtype))
    def check_dtypes(drawn):
        assert all(a.dtype == want for a in _float_leaves(drawn.args))

    check_dtypes()


def _overflowing_relu_call():
    """The float16 counterexample: ``h_t = relu(16 h_{t−1} + 1)`` reaches 69905 > 65504 in
    layer 0, and layer 1's zero ``W_ih`` turns the ``inf`` into ``0·inf = nan``."""
    f = np.float16
    first = (np.zeros((4, 1), f), np.full((4, 4), 4, f), np.zeros(4, f), np.ones(4, f))
    rest = tuple(np.zeros(s, f) for s in [(4, 4), (4, 4), (4,), (4,)] * 2)
    kw = dict(num_layers=3, bidirectional=False, nonlinearity="relu")
    return np.zeros((1, 5, 1), f), np.zeros((3, 1, 4), f), first + rest, kw


def test_relu_rnn_weights_are_halved_into_the_float16_range():
    from lmspec.conformance import cases_recurrent as cr

    x, h0, weights, kw = _overflowing_relu_call()
    be = TorchBackend("torch-cpu-lowp", "cpu", ("float16",))
    assert np.isnan(be.rnn(x, h0, weights, **kw)[0]).any()  # what the strategy must avoid
    kept = cr._relu_in_range(x, h0, weights, kw, "float16")
    assert all(k.dtype == np.float16 for k in kept)
    assert cr._relu_majorant(x, h0, kept, kw) <= 65504 / 4
    np.testing.assert_array_equal(kept[1], weights[1] / 4)  # halved exactly, twice
    out = be.rnn(x, h0, kept, **kw)
    assert all(np.isfinite(o).all() for o in out)
    assert_tree_close(out, lmspec.rnn(x, h0, kept, **kw), atol=1e-2, rtol=1e-2)


def test_relu_majorant_bounds_the_forward_and_backward_values():
    from lmspec.conformance import cases_recurrent as cr

    rng = np.random.default_rng(3)
    for L, D in itertools.product((1, 3), (1, 2)):
        args, kw = seq_call("rnn", rng, T=5, L=L, D=D, w_scale=2.0, nonlinearity="relu")
        out, h_n = lmspec.rnn(*args, **kw)
        cot = (rng.uniform(-2, 2, out.shape), rng.uniform(-2, 2, h_n.shape))
        grads = lmspec.vjp("rnn", args, kw, cot)
        bound = cr._relu_majorant(*args, kw)
        biggest = max(np.abs(a).max() for a in (out, h_n, grads[0], grads[1], *grads[2]))
        assert 0 < biggest <= bound
