"""The attention family: reference vjps against finite differences, the reference against
torch's own modules and scipy/mpmath (independent oracles), input validation, and the
torch backend against the reference."""

from __future__ import annotations

import math
from unittest import mock

import mpmath
import numpy as np
import pytest
import scipy.special

pytest.importorskip("torch")

import torch

import lmspec
from lmspec.backends import torch_attention as ta
from lmspec.backends.torch_backend import TorchBackend
from lmspec.conformance.oracles import finite_difference_vjp

RNG = np.random.default_rng(20261121)
B, L, S, D, H, F = 2, 3, 4, 6, 2, 5
KEY_VALID = np.array([[True, False, True, True], [False, False, False, False]])
ENC_VALID = np.array([[True, True, False, True], [False, True, True, True]])


def r(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape)


def attn_params(d: int = D) -> tuple[np.ndarray, ...]:
    return (r(d, d), r(d, d), r(d, d), r(d), r(d), r(d), r(d, d), r(d))


def norm(d: int = D) -> tuple[np.ndarray, ...]:
    return (1 + 0.3 * r(d), 0.3 * r(d))


def ffn(d: int = D, f: int = F) -> tuple[np.ndarray, ...]:
    return (r(f, d), r(f), r(d, f), r(d))


def encoder_weights(d: int = D) -> tuple[np.ndarray, ...]:
    return (*attn_params(d), *ffn(d), *norm(d), *norm(d))


def decoder_weights(d: int = D) -> tuple[np.ndarray, ...]:
    return (*attn_params(d), *attn_params(d), *ffn(d), *norm(d), *norm(d), *norm(d))


# -- finite differences ----------------------------------------------------------------

def _flat(x):
    return [b for a in x for b in _flat(a)] if isinstance(x, tuple) else [np.asarray(x)]


def check_vjp(op, args, kwargs=None, atol=1e-6):
    kwargs = kwargs or {}
    out = lmspec.OPS[op].reference(*args, **kwargs)
    cot = tuple(r(*o.shape) for o in out) if isinstance(out, tuple) else r(*out.shape)
    grads = lmspec.vjp(op, args, kwargs, cot)
    want_all = finite_difference_vjp(op, args, kwargs, cot)
    diff = lmspec.OPS[op].diff
    for i, (name, g) in enumerate(zip(lmspec.OPS[op].params, grads, strict=False)):
        if name not in diff or args[i] is None:
            assert g is None
            continue
        members = g if isinstance(g, tuple) else (g,)
        for j, gm in enumerate(members):
            want = want_all[i][j] if isinstance(g, tuple) else want_all[i]
            np.testing.assert_allclose(gm, want, atol=atol, rtol=1e-5, err_msg=f"{op} {name}[{j}]")


@pytest.mark.parametrize("mask", [None, KEY_VALID])
def test_additive_attention_vjp(mask):
    check_vjp("additive_attention", (r(B, 3), r(B, S, 5), r(B, S, 2), r(4, 3), r(4, 5), r(4),
                                     mask))


@pytest.mark.parametrize("mask", [None, KEY_VALID])
def test_dot_product_attention_vjp(mask):
    check_vjp("dot_product_attention", (r(B, 3), r(B, S, 3), r(B, S, 2), mask))


@pytest.mark.parametrize("mask, causal, scale", [
    (None, False, None), (None, True, 0.7), (KEY_VALID[:, None, None, :], True, None),
    (np.array([True, False, True, True]), False, -2.0),
    (RNG.random((L, S)) < 0.5, True, None), (RNG.random((B, H, L, S)) < 0.5, False, 3.0)])
def test_sdpa_vjp(mask, causal, scale):
    check_vjp("scaled_dot_product_attention", (r(B, H, L, 3), r(B, H, S, 3), r(B, H, S, 1), mask),
              {"is_causal": causal, "scale": scale})


@pytest.mark.parametrize("heads, valid, causal", [(2, KEY_VALID, False), (3, None, True),
                                                  (1, KEY_VALID, True), (6, None, False)])
def test_multi_head_attention_vjp(heads, valid, causal):
    check_vjp("multi_head_attention", (r(B, L, D), r(B, S, D), r(B, S, D), *attn_params(), heads,
                                       valid), {"is_causal": causal})


def test_layer_norm_vjp():
    check_vjp("layer_norm", (r(2, 3, 5), *norm(5)), {"eps": 1e-3})
    check_vjp("layer_norm", (r(4), *norm(4)))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_vjp(norm_first, activation):
    kw = {"norm_first": norm_first, "activation": activation}
    check_vjp("transformer_encoder_layer", (r(B, 4, D), encoder_weights(), 2, ENC_VALID), kw)
    check_vjp("transformer_encoder_layer", (r(1, 3, D), encoder_weights(), 3, None),
              kw | {"is_causal": True})


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_decoder_layer_vjp(norm_first, activation):
    check_vjp("transformer_decoder_layer", (r(B, 3, D), r(B, S, D), decoder_weights(), 2,
                                            KEY_VALID),
              {"norm_first": norm_first, "activation": activation})


def test_fully_masked_rows_are_zero_with_zero_gradient():
    ctx, w = lmspec.dot_product_attention(r(B, 3), r(B, S, 3), r(B, S, 2), KEY_VALID)
    assert np.all(ctx[1] == 0) and np.all(w[1] == 0) and np.isclose(w[0].sum(), 1)
    assert w[0, 1] == 0
    q, k, v = r(1, 1, L, 2), r(1, 1, S, 2), r(1, 1, S, 2)
    m = np.zeros((L, S), dtype=bool)
    m[1] = True
    out = lmspec.scaled_dot_product_attention(q, k, v, m)
    assert np.all(out[0, 0, [0, 2]] == 0)
    dq, _, _, _ = lmspec.vjp("scaled_dot_product_attention", (q, k, v, m), {}, r(1, 1, L, 2))
    assert np.all(dq[0, 0, [0, 2]] == 0)


def test_extreme_scores_stay_finite():
    q = np.array([[1e4, -1e4]])
    k = np.array([[[1e4, 0.0], [-1e4, 3.0], [5.0, 5.0]]])
    ctx, w = lmspec.dot_product_attention(q, k, r(1, 3, 2), np.array([[False, True, True]]))
    np.testing.assert_array_equal(w, [[0.0, 0.0, 1.0]])
    assert np.all(np.isfinite(ctx))


# -- independent oracles ---------------------------------------------------------------

def _t(x):
    return torch.tensor(x, dtype=torch.float64, requires_grad=True)


def test_layer_norm_against_torch_module():
    x, (g, b) = r(3, 2, 5), norm(5)
    ln = torch.nn.LayerNorm(5, eps=1e-3, dtype=torch.float64)
    with torch.no_grad():
        ln.weight.copy_(torch.tensor(g))
        ln.bias.copy_(torch.tensor(b))
    tx = _t(x)
    out = ln(tx)
    cot = r(3, 2, 5)
    out.backward(torch.tensor(cot))
    np.testing.assert_allclose(lmspec.layer_norm(x, g, b, 1e-3), out.detach().numpy(), atol=1e-12)
    dx, dg, db = lmspec.vjp("layer_norm", (x, g, b), {"eps": 1e-3}, cot)
    np.testing.assert_allclose(dx, tx.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(dg, ln.weight.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(db, ln.bias.grad.numpy(), atol=1e-12)


def test_multi_head_attention_against_nn_module():
    """nn.MultiheadAttention (slow path, need_weights=True) and the reference agree where no
    row is fully masked; torch's head split is the contract's."""
    mha = torch.nn.MultiheadAttention(D, 3, batch_first=True, dtype=torch.float64)
    qx, kx, vx = r(B, L, D), r(B, S, D), r(B, S, D)
    p = attn_params()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.tensor(np.concatenate(p[:3])))
        mha.in_proj_bias.copy_(torch.tensor(np.concatenate(p[3:6])))
        mha.out_proj.weight.copy_(torch.tensor(p[6]))
        mha.out_proj.bias.copy_(torch.tensor(p[7]))
    valid = ENC_VALID
    out, _ = mha(_t(qx), _t(kx), _t(vx), key_padding_mask=torch.tensor(~valid))
    np.testing.assert_allclose(lmspec.multi_head_attention(qx, kx, vx, *p, 3, valid),
                               out.detach().numpy(), atol=1e-12)


def _torch_encoder(w, h, norm_first, activation, eps=1e-5):
    layer = torch.nn.TransformerEncoderLayer(D, h, F, 0.0, activation, eps, batch_first=True,
                                             norm_first=norm_first, dtype=torch.float64).eval()
    sd = {"self_attn.in_proj_weight": np.concatenate(w[:3]),
          "self_attn.in_proj_bias": np.concatenate(w[3:6]), "self_attn.out_proj.weight": w[6],
          "self_attn.out_proj.bias": w[7], "linear1.weight": w[8], "linear1.bias": w[9],
          "linear2.weight": w[10], "linear2.bias": w[11], "norm1.weight": w[12],
          "norm1.bias": w[13], "norm2.weight": w[14], "norm2.bias": w[15]}
    layer.load_state_dict({k: torch.tensor(v) for k, v in sd.items()})
    return layer


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_against_nn_module(norm_first, activation):
    w, x = encoder_weights(), r(B, 4, D)
    layer = _torch_encoder(w, 2, norm_first, activation)
    tx = _t(x)
    out = layer(tx, src_key_padding_mask=torch.tensor(~ENC_VALID))
    cot = r(B, 4, D)
    out.backward(torch.tensor(cot))
    kw = {"norm_first": norm_first, "activation": activation}
    np.testing.assert_allclose(lmspec.transformer_encoder_layer(x, w, 2, ENC_VALID, **kw),
                               out.detach().numpy(), atol=1e-12)
    dx, _, _, _ = lmspec.vjp("transformer_encoder_layer", (x, w, 2, ENC_VALID), kw, cot)
    np.testing.assert_allclose(dx, tx.grad.numpy(), atol=1e-10)


def test_gelu_matches_scipy_erf():
    w = encoder_weights()
    x = r(1, 2, D)
    spec = lmspec.transformer_encoder_layer(x, w, 2, activation="gelu")
    with mock.patch.object(lmspec.blocks, "erf", scipy.special.erf):
        np.testing.assert_allclose(lmspec.transformer_encoder_layer(x, w, 2, activation="gelu"),
                                   spec, rtol=0, atol=1e-14)


def test_positional_encoding_against_mpmath():
    pe = lmspec.sinusoidal_positional_encoding(50, 8, base=10000.0)
    mpmath.mp.dps = 40
    for p in (0, 1, 7, 49):
        for i in range(4):
            ang = mpmath.mpf(p) / mpmath.power(10000, mpmath.mpf(2 * i) / 8)
            assert math.isclose(pe[p, 2 * i], float(mpmath.sin(ang)), abs_tol=1e-14)
            assert math.isclose(pe[p, 2 * i + 1], float(mpmath.cos(ang)), abs_tol=1e-14)


# -- validation --------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda: lmspec.scaled_dot_product_attention(r(1, 1, 2, 3), r(1, 1, 4, 2), r(1, 1, 4, 2)),
     "'k'"),
    (lambda: lmspec.scaled_dot_product_attention(r(1, 1, 2, 3), r(1, 1, 4, 3), r(1, 1, 4, 2),
                                                 np.ones((3, 4), dtype=bool)), "'mask'"),
    (lambda: lmspec.scaled_dot_product_attention(r(1, 1, 2, 3), r(1, 1, 4, 3), r(1, 1, 4, 2),
                                                 np.ones(4)), "bool"),
    (lambda: lmspec.scaled_dot_product_attention(r(1, 2, 3), r(1, 4, 3), r(1, 4, 2)), "'q'"),
    (lambda: lmspec.multi_head_attention(r(B, L, D), r(B, S, D), r(B, S, D), *attn_params(), 4),
     "num_heads"),
    (lambda: lmspec.multi_head_attention(r(B, L, D), r(B, S, D), r(B, S, D), *attn_params(), 2,
                                         KEY_VALID[:, :3]), "key_valid"),
    (lambda: lmspec.additive_attention(r(B, 3), r(B, S, 5), r(B, S, 2), r(4, 3), r(4, 4), r(4)),
     "W_k"),
    (lambda: lmspec.dot_product_attention(r(B, 3), r(B, S, 4), r(B, S, 2)), "keys"),
    (lambda: lmspec.sinusoidal_positional_encoding(4, 5), "d_model"),
    (lambda: lmspec.sinusoidal_positional_encoding(4, 6, dtype="int8"), "dtype"),
    (lambda: lmspec.layer_norm(r(2, 5), r(4), r(5)), "gamma"),
    (lambda: lmspec.transformer_encoder_layer(r(B, 3, D), encoder_weights()[:-1], 2), "weights"),
    (lambda: lmspec.transformer_encoder_layer(r(B, 3, D), encoder_weights(), 2,
                                              activation="tanh"), "activation"),
    (lambda: lmspec.transformer_decoder_layer(r(B, 3, D), r(B + 1, S, D), decoder_weights(), 2),
     "memory"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- the torch backend against the reference -----------------------------------------------

BACKEND = TorchBackend("torch-cpu", "cpu", ("float32", "float64"))


def _cases():
    enc, dec = encoder_weights(), decoder_weights()
    yield "additive_attention", (r(B, 3), r(B, S, 5), r(B, S, 2), r(4, 3), r(4, 5), r(4),
                                 KEY_VALID), {}
    yield "dot_product_attention", (r(B, 3), r(B, S, 3), r(B, S, 2), KEY_VALID), {}
    for mask in (None, KEY_VALID[1], KEY_VALID[0], RNG.random((L, S)) < 0.5,
                 KEY_VALID[:, None, None, :], RNG.random((B, H, L, S)) < 0.5):
        for causal in (False, True):
            yield "scaled_dot_product_attention", (r(B, H, L, 3), r(B, H, S, 3), r(B, H, S, 1),
                                                   mask), {"is_causal": causal}
    yield "scaled_dot_product_attention", (r(B, H, L, 3), r(B, H, S, 3), r(B, H, S, 2)), {
        "scale": 0.25}
    for heads, causal in ((1, True), (2, False), (3, True)):
        yield "multi_head_attention", (r(B, L, D), r(B, S, D), r(B, S, D), *attn_params(), heads,
                                       KEY_VALID), {"is_causal": causal}
    yield "layer_norm", (r(2, 3, 5), *norm(5)), {"eps": 1e-3}
    yield "sinusoidal_positional_encoding", (9, 6), {"dtype": "float64"}
    for nf in (False, True):
        for act in ("relu", "gelu"):
            kw = {"norm_first": nf, "activation": act}
            for heads, valid, causal in ((2, ENC_VALID, False), (2, KEY_VALID, False),
                                         (2, ENC_VALID, True), (3, None, True)):
                yield "transformer_encoder_layer", (r(B, 4, D), enc, heads, valid), kw | {
                    "is_causal": causal}
            yield "transformer_decoder_layer", (r(B, 3, D), r(B, S, D), dec, 2, KEY_VALID), kw


CASES = list(_cases())


def _queries_without_key(valid, length, causal):
    """``[B, L]``: the queries that see no key (all keys invalid, or causally only invalid
    ones)."""
    valid = np.asarray(valid, dtype=bool)
    sees = np.broadcast_to(valid[:, None, :], (valid.shape[0], length, valid.shape[1]))
    if causal:
        sees = sees & np.tril(np.ones((length, valid.shape[1]), dtype=bool))
    return ~sees.any(axis=-1)


@pytest.mark.parametrize("op, args, kwargs", CASES, ids=[c[0] for c in CASES])
def test_torch_backend_matches_reference(op, args, kwargs):
    ref = want = lmspec.OPS[op].reference(*args, **kwargs)
    got = getattr(BACKEND, op)(*args, **kwargs)
    if op == "transformer_encoder_layer" and ta._encoder_fast_path_no_key(args, kwargs):
        # the declared deviation: the fast path's NaN exactly for the queries that see no
        # key (all their outputs), the spec's values everywhere else
        blind = _queries_without_key(args[3], args[0].shape[1], kwargs["is_causal"])
        assert blind.any()
        assert np.array_equal(np.isnan(got).all(axis=-1), blind) and not np.isnan(
            got[~blind]).any()
        got, want = got[~blind], ref[~blind]
    for g, w in zip(_flat(got), _flat(want), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-12, rtol=0)
    if not lmspec.OPS[op].diff:
        return
    cot = tuple(r(*o.shape) for o in ref) if isinstance(ref, tuple) else r(*ref.shape)
    for g, w in zip(_flat(BACKEND.vjp(op, args, kwargs, cot)),
                    _flat(lmspec.vjp(op, args, kwargs, cot)), strict=True):
        if w.ndim == 0 and w.dtype == object:  # None for a non-differentiable argument
            continue
        np.testing.assert_allclose(g, w, atol=1e-11, rtol=0)


def test_encoder_forward_takes_torch_fast_path():
    """Even head count, no autograd: torch._transformer_encoder_layer_fwd runs, also with a
    query that sees no key (torch's NaN there is the declared deviation, not corrected)."""
    real = torch._transformer_encoder_layer_fwd
    calls: list[int] = []

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    x, w = r(B, 4, D), encoder_weights()
    with mock.patch.object(torch, "_transformer_encoder_layer_fwd", spy):
        BACKEND.transformer_encoder_layer(x, w, 2, ENC_VALID)
        assert len(calls) == 1
        BACKEND.transformer_encoder_layer(x, w, 2, None, is_causal=True, norm_first=True)
        assert len(calls) == 2
        out = BACKEND.transformer_encoder_layer(x, w, 2, KEY_VALID)
        assert len(calls) == 3
        blind = _queries_without_key(KEY_VALID, 4, False)
        assert np.isnan(out[blind]).all() and np.isfinite(out[~blind]).all()
        assert ta._encoder_fast_path_no_key((x, w, 2, KEY_VALID), {})
        BACKEND.transformer_encoder_layer(x, w, 3, ENC_VALID)  # odd heads: ordinary path
        assert len(calls) == 3
        BACKEND.vjp("transformer_encoder_layer", (x, w, 2, ENC_VALID), {}, r(B, 4, D))
        assert len(calls) == 3


def test_torch_fast_path_gives_nan_for_a_query_with_no_key():
    """The reason for the fix-up: documents torch's own answer (NOTES of the backend)."""


    x, w = r(B, 4, D), encoder_weights()
    args = [torch.tensor(a) for a in w]
    layer = ta._layer("encoder", D, 2, F, False, "relu", 1e-5, torch.float64, "cpu")
    params = ta._attention_params("self_attn", args[:8]) | ta._ffn_and_norm_params(
        args[8:12], ta._pairs(args[12:16]))
    with torch.no_grad():
        out = ta.functional_call(layer, params, (torch.tensor(x),),
                                 {"src_key_padding_mask": torch.tensor(~KEY_VALID)})
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()


def test_positional_encoding_float32_dtype():
    pe = BACKEND.sinusoidal_positional_encoding(16, 8, dtype="float32")
    assert pe.dtype == np.float32
    np.testing.assert_allclose(pe, lmspec.sinusoidal_positional_encoding(16, 8), atol=2e-6)


def test_sdpa_negative_scale_with_causal():
    """torch's CPU flash kernel returns NaN for is_causal with a negative scale (rows with
    masked keys): the backend returns torch's answer, a declared deviation; with the causal
    mask passed explicitly torch is correct."""
    q, k, v = r(1, 2, 2, 3), r(1, 2, 4, 3), r(1, 2, 4, 3)
    raw = torch.nn.functional.scaled_dot_product_attention(
        torch.tensor(q), torch.tensor(k), torch.tensor(v), is_causal=True, scale=-0.5)
    spec = lmspec.scaled_dot_product_attention(q, k, v, is_causal=True, scale=-0.5)
    got = BACKEND.scaled_dot_product_attention(q, k, v, is_causal=True, scale=-0.5)
    np.testing.assert_array_equal(got, raw.numpy())  # NaN where torch gives NaN
    assert np.isnan(got[..., 0, :]).all() and np.isfinite(spec).all()
    rows = ~np.isnan(got).any(axis=-1)
    np.testing.assert_allclose(got[rows], spec[rows], atol=1e-12)
    dev = BACKEND.deviations["scaled_dot_product_attention"]
    assert dev.applies((q, k, v), {"is_causal": True, "scale": -0.5})
    assert not dev.applies((q, k, v), {"is_causal": True, "scale": 0.5})
    causal = np.tril(np.ones((2, 4), dtype=bool))  # the same mask, explicit: correct
    np.testing.assert_allclose(BACKEND.scaled_dot_product_attention(q, k, v, causal,
                                                                    scale=-0.5), spec,
                               atol=1e-12)
