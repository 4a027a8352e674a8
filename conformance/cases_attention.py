"""Conformance inputs and properties of the attention family.

Inputs cover ``L ≠ S``, head dimensions of 1 and odd sizes, a single key, fully masked
rows, every SDPA mask shape (``[S]``, ``[L,S]``, ``[B,1,1,S]``, ``[B,h,L,S]``), extreme
score magnitudes, ``scale`` given or not, pre- and post-norm, ReLU and GELU, and an even
head count (torch's encoder fast path) as well as an odd one.

Tolerance magnitudes (``scale``): attention outputs are weighted sums of values whose
weights depend on scores, so a relative rounding error in a score of magnitude ``|e|``
moves the output by about ``|e|·max|v|``: ``M = max|v| · max(1, max|e|)``, with ``|e|``
bounded from the inputs (``Σ|q||k|``); for layer norm the input is divided by ``σ``, so
``M = max|γ| · max|x| / σ + max|β|`` (and ``1/σ`` more for a vjp), multiplied over the
chained layer norms of a Transformer layer. A vjp's ``M`` is further multiplied by
``max|cotangent|`` and by the largest input a weight gradient multiplies.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

import lmspec
from lmspec._precision import UNIT_ROUNDOFF

from . import draw as d
from . import large_shapes as big
from .conditioning import scalar_step
from .declare import Call, Close, Holds, cases, prop

# -- shared pieces ----------------------------------------------------------------------


def _cot(cot) -> float:
    if cot is None:
        return 1.0
    parts = cot if isinstance(cot, tuple) else (cot,)
    return max(1.0, *(float(np.max(np.abs(np.asarray(c, dtype=np.float64)), initial=0.0))
                      for c in parts))


def _abs(a: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.float64))


def _grad_factor(cot, *factors: np.ndarray) -> float:
    """1 for the forward; for a vjp ``max|cot| · max(1, max|f|)``: a weight gradient
    ``Σ ∂pre · xᵀ`` multiplies the rounding error of ``∂pre`` by the inputs ``x`` (and an
    input gradient by the weights)."""
    if cot is None:
        return 1.0
    return _cot(cot) * max(1.0, *(float(np.max(_abs(f), initial=0.0)) for f in factors))


def _values(draw, dtype: str, shape, *, label: str, extreme: bool = False) -> np.ndarray:
    """Ordinary values, or (``extreme``) large ones that make scores saturate the softmax."""
    regime = draw(st.sampled_from(["normal", "extreme"] if extreme else ["normal"]),
                  label=f"{label} regime")
    big = 60.0 if dtype in ("float16", "bfloat16") else 300.0
    lo, hi = (-3.0, 3.0) if regime == "normal" else (-big, big)
    return d.floats(draw, dtype, shape, lo, hi, label=label)


def _mask(draw, shape, *, label: str) -> np.ndarray:
    """Random booleans; sometimes one row (last axis) is fully masked, sometimes all."""
    m = d.bools(draw, shape, label=label)
    kind = draw(st.sampled_from(["random", "a row masked", "all masked"]), label=f"{label} kind")
    if kind == "all masked":
        return np.zeros(shape, dtype=bool)
    if kind == "a row masked" and len(shape) > 1:
        row = tuple(draw(st.integers(0, n - 1), label=f"{label} row") for n in shape[:-1])
        m[row] = False
    return m


def _maybe_mask(draw, shape, *, label: str) -> np.ndarray | None:
    if draw(st.booleans(), label=f"{label} given"):
        return _mask(draw, shape, label=label)
    return None


# -- additive and dot-product attention ---------------------------------------------------


@st.composite
def _additive(draw, dtype: str) -> Call:
    b, s = d.dim(draw, 1, 3, label="B"), d.length(draw, 1, 5, label="S")
    dq, dk, dv, a = (d.dim(draw, 1, 4, label=n) for n in ("Dq", "Dk", "Dv", "A"))
    q = _values(draw, dtype, (b, dq), label="query", extreme=True)
    k = _values(draw, dtype, (b, s, dk), label="keys")
    vals = _values(draw, dtype, (b, s, dv), label="values")
    W_q, W_k = d.floats(draw, dtype, (a, dq), label="W_q"), d.floats(draw, dtype, (a, dk),
                                                                    label="W_k")
    v = _values(draw, dtype, (a,), label="v", extreme=True)
    return Call((q, k, vals, W_q, W_k, v, _maybe_mask(draw, (b, s), label="mask")))


def _additive_k(call: Call) -> int:
    q, k, vals, W_q, W_k, v, _ = call.args
    return q.shape[1] + k.shape[2] + v.shape[0] + k.shape[1]


def _additive_scale(call: Call, cot=None) -> float:
    q, k, vals, W_q, W_k, v, _ = call.args
    pre = (_abs(q) @ _abs(W_q).T)[:, None, :] + _abs(k) @ _abs(W_k).T
    inner = float(np.max(pre, initial=0.0))  # tanh's argument: its rounding error ∝ this
    e = float(np.sum(_abs(v)))
    return float(np.max(_abs(vals), initial=1.0)) * max(1.0, e, inner) * _grad_factor(
        cot, q, k, W_q, W_k)


cases("additive_attention", k=_additive_k, scale=_additive_scale)(_additive)


@st.composite
def _dot(draw, dtype: str) -> Call:
    b, s = d.dim(draw, 1, 3, label="B"), d.length(draw, 1, 5, label="S")
    dm, dv = d.length(draw, 1, 5, label="D"), d.dim(draw, 1, 4, label="Dv")
    q = _values(draw, dtype, (b, dm), label="query", extreme=True)
    k = _values(draw, dtype, (b, s, dm), label="keys")
    vals = _values(draw, dtype, (b, s, dv), label="values")
    return Call((q, k, vals, _maybe_mask(draw, (b, s), label="mask")))


def _dot_scale(call: Call, cot=None) -> float:
    q, k, vals = (a.astype(np.float64) for a in call.args[:3])
    e = float(np.max(np.einsum("bd,bsd->bs", np.abs(q), np.abs(k)), initial=0.0))
    return float(np.max(np.abs(vals), initial=1.0)) * max(1.0, e) * _grad_factor(cot, q, k)


cases("dot_product_attention", k=lambda c: c.args[0].shape[1] + c.args[1].shape[1],
      scale=_dot_scale)(_dot)


# -- scaled dot-product attention ------------------------------------------------------

SDPA_MASK_SHAPES = ("none", "[S]", "[L,S]", "[B,1,1,S]", "[B,h,L,S]")
SCORE_FAMILIES = ("drawn",) * 5 + ("all negative", "tied", "peaked")
PEAKED_LENGTHS = (3, *d.LONG_LENGTHS)
"""Key counts of the ``"peaked"`` family: its small weights matter in numbers, so it
reaches past the tiles more often than the other families."""
PEAKED_WEIGHT = 0.7
"""The small weights of a ``"peaked"`` row relative to the dominant one, in units of the
dtype's unit roundoff."""


def score_family(draw) -> str:
    """Which scores to draw (:func:`shape_scores`); ``"drawn"`` five times in eight (the
    families leave the options of the other draws, masks, windows, ALiBi, softcap and the
    scale, less to show: at three in six, mutants of those were caught on fewer seeds)."""
    return draw(st.sampled_from(SCORE_FAMILIES), label="score family")


def key_count(draw, family: str, hi: int) -> int:
    """``S``: 1…``hi`` (sometimes past a tile), or for peaked rows mostly past one."""
    if family == "peaked":
        return draw(st.sampled_from(PEAKED_LENGTHS), label="S (peaked)")
    return d.length(draw, 1, hi, label="S")


def shape_scores(draw, dtype: str, family: str, q: np.ndarray, k: np.ndarray,
                 scale: float | None) -> tuple[np.ndarray, np.ndarray]:
    """``(q, k)`` as drawn (``q[B,h,L,E]``, ``k[B,g,S,E]``), or reshaped into a family that
    breaks attention kernels:

    - ``"all negative"``: ``q ≥ 1``, ``k ≤ −1`` elementwise, so that with a positive scale
      every score is negative and, with ``q`` in the extreme regime, far below ``−100``: a
      running maximum started at 0 instead of ``−∞`` underflows every ``exp`` to 0/0;
    - ``"tied"``: the first half of the keys (at least two) equal: their scores tie,
      and the others leave the scale, a softcap or a bias something to change;
    - ``"peaked"``: every query of a key/value group equal to one vector ``w`` and keys
      ``k_0`` and ``k_j = k_0 − Δ·w/(scale·|w|²)``, so that ``s_0 − s_j = Δ`` with
      ``e^(−Δ) =`` :data:`PEAKED_WEIGHT` ``·u``: one dominant weight and ``S − 1`` small
      ones, each below half the dtype's spacing at 1, which a sum accumulated in the
      dtype drops one by one (swamping: a relative error of about ``0.7·(S − 1)·u``)
      while together they move the result. Needs ``scale > 0`` and ``scale·|w| ≥ Δ/100``
      (else as drawn); the strategies draw peaked rows without masks, windows, ALiBi or
      softcap.
    """
    if family == "all negative":
        qf, kf = q.astype(np.float64), k.astype(np.float64)
        return d.as_dtype(np.abs(qf) + 1, dtype), d.as_dtype(-np.abs(kf) - 1, dtype)
    if family == "tied":
        tied = k.copy()
        tied[..., 1: max(2, (k.shape[-2] + 1) // 2), :] = k[..., :1, :]
        return q, tied
    s = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    if family != "peaked" or s <= 0 or k.shape[2] < 2:
        return q, k
    b, h, n_q, e = q.shape
    g = k.shape[1]
    w = q.astype(np.float64).reshape(b, g, h // g * n_q, e)[:, :, :1, :]  # [B, g, 1, E]
    norm2 = np.sum(w * w, axis=-1, keepdims=True)
    delta = -math.log(PEAKED_WEIGHT * UNIT_ROUNDOFF[dtype])
    if np.any(s * np.sqrt(norm2) * 100 < delta):  # the keys would move by over 100
        return q, k
    kf = np.broadcast_to(k[:, :, :1, :].astype(np.float64), k.shape).copy()
    kf[:, :, 1:, :] -= delta * w / (s * norm2)
    qf = np.broadcast_to(w, (b, g, h // g * n_q, e)).reshape(q.shape)
    return d.as_dtype(qf, dtype), d.as_dtype(kf, dtype)


@st.composite
def _sdpa(draw, dtype: str, causal: bool | None = None, mask_kinds=SDPA_MASK_SHAPES) -> Call:
    b, h = d.dim(draw, 1, 2, label="B"), d.dim(draw, 1, 3, label="h")
    family = score_family(draw)
    n_q, n_k = d.dim(draw, 1, 4, label="L"), key_count(draw, family, 5)
    e = draw(st.sampled_from([1, 2, 3, 5]), label="E")
    ev = d.dim(draw, 1, 3, label="Ev")
    scale = draw(st.sampled_from([None, None, 0.125, 1.0, 1.7, -0.5]), label="scale")
    q, k = shape_scores(draw, dtype, family,
                        _values(draw, dtype, (b, h, n_q, e), label="q", extreme=True),
                        _values(draw, dtype, (b, h, n_k, e), label="k"), scale)
    v = _values(draw, dtype, (b, h, n_k, ev), label="v")
    mask, is_causal = None, bool(causal)
    if family != "peaked":  # peaked rows are left whole: every key visible unless causal
        kind = draw(st.sampled_from(list(mask_kinds)), label="mask shape")
        shape = {"none": None, "[S]": (n_k,), "[L,S]": (n_q, n_k),
                 "[B,1,1,S]": (b, 1, 1, n_k), "[B,h,L,S]": (b, h, n_q, n_k)}[kind]
        mask = None if shape is None else _mask(draw, shape, label="mask")
        is_causal = draw(st.booleans(), label="is_causal") if causal is None else causal
    return Call((q, k, v, mask), {"is_causal": is_causal, "scale": scale})


def _sdpa_scale(call: Call, cot=None) -> float:
    q, k, v = (a.astype(np.float64) for a in call.args[:3])
    s = call.kwargs.get("scale")
    s = 1 / math.sqrt(q.shape[-1]) if s is None else abs(s)
    e = s * float(np.max(np.abs(q) @ np.swapaxes(np.abs(k), -1, -2), initial=0.0))
    return float(np.max(np.abs(v), initial=1.0)) * max(1.0, e) * _grad_factor(cot, s * q, s * k)


@st.composite
def _sdpa_large(draw, dtype: str) -> Call:
    """Large tier: ``S`` and ``L`` around 64/128/256-key blocks, kernel head dimensions,
    key padding whose valid length is itself a boundary size, or a sparse random mask."""
    h = big.size(draw, (2, 1, 3, 4), "h")
    b = big.size(draw, (1, 2), "B") if h <= 2 else 1
    n_k = big.size(draw, big.LENGTHS, "S")
    n_q = draw(st.sampled_from([n_k, 1, *big.LENGTHS]), label="L")
    e = big.size(draw, big.HEAD_DIMS, "E")
    ev = draw(st.sampled_from([e, 64]), label="Ev")
    q = d.floats(draw, dtype, (b, h, n_q, e), label="q")
    k = d.floats(draw, dtype, (b, h, n_k, e), label="k")
    v = d.floats(draw, dtype, (b, h, n_k, ev), label="v")
    kind = draw(st.sampled_from(["none", "key padding [B,1,1,S]", "random [L,S]"]),
                label="mask kind")
    mask = None
    if kind == "key padding [B,1,1,S]":
        valid = [draw(st.sampled_from([n_k, *(n for n in big.LENGTHS if n < n_k)]),
                      label="valid keys") for _ in range(b)]
        mask = (np.arange(n_k) < np.array(valid)[:, None])[:, None, None, :]
    elif kind == "random [L,S]":
        mask = big.bools(draw, (n_q, n_k), 0.9, "mask")
    is_causal = draw(st.booleans(), label="is_causal")
    scale = draw(st.sampled_from([None, 0.125]), label="scale")
    return Call((q, k, v, mask), {"is_causal": is_causal, "scale": scale})


cases("scaled_dot_product_attention", k=lambda c: c.args[0].shape[-1] + c.args[1].shape[-2],
      scale=_sdpa_scale, large=_sdpa_large)(_sdpa)


# -- multi-head attention ----------------------------------------------------------------


def _attn_params(draw, dtype: str, dm: int, label: str) -> tuple[np.ndarray, ...]:
    w = 1.0 / math.sqrt(dm)
    mats = [d.floats(draw, dtype, (dm, dm), -w, w, label=f"{label} W_{n}") for n in "qkv"]
    biases = [d.floats(draw, dtype, (dm,), -1, 1, label=f"{label} b_{n}") for n in "qkv"]
    return (*mats, *biases, d.floats(draw, dtype, (dm, dm), -w, w, label=f"{label} W_o"),
            d.floats(draw, dtype, (dm,), -1, 1, label=f"{label} b_o"))


@st.composite
def _mha(draw, dtype: str, causal: bool | None = None) -> Call:
    b, n_q = d.dim(draw, 1, 2, label="B"), d.dim(draw, 1, 4, label="L")
    n_k = d.length(draw, 1, 4, label="S")
    h, dh = d.dim(draw, 1, 3, label="num_heads"), d.dim(draw, 1, 3, label="head dim")
    dm = h * dh
    query = _values(draw, dtype, (b, n_q, dm), label="query", extreme=True)
    key = _values(draw, dtype, (b, n_k, dm), label="key")
    value = _values(draw, dtype, (b, n_k, dm), label="value")
    valid = _maybe_mask(draw, (b, n_k), label="key_valid")
    is_causal = draw(st.booleans(), label="is_causal") if causal is None else causal
    return Call((query, key, value, *_attn_params(draw, dtype, dm, "attn"), h, valid),
                {"is_causal": is_causal})


def _lin_bound(xa: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|x| |W|ᵀ + |b|``: a bound on ``|x Wᵀ + b|`` and on its rounding scale."""
    return xa @ _abs(W).T + _abs(b)


def _mha_scale(call: Call, cot=None) -> float:
    query, key, value, W_q, W_k, W_v, b_q, b_k, b_v, W_o, b_o, h = call.args[:12]
    qa, ka, va = (_lin_bound(_abs(x), W, b) for x, W, b in
                  ((query, W_q, b_q), (key, W_k, b_k), (value, W_v, b_v)))
    dh = query.shape[-1] // h
    e = float(np.max(qa, initial=0.0) * np.max(ka, initial=0.0)) * math.sqrt(dh)
    heads = float(np.max(va, initial=1.0)) * max(1.0, e)
    out = float(np.max(np.sum(_abs(W_o), axis=1))) * heads + float(np.max(_abs(b_o)))
    return max(out, heads) * _grad_factor(cot, query, key, value)


@st.composite
def _mha_large(draw, dtype: str) -> Call:
    """Large tier: ``S`` around 64/128/256-key blocks, kernel head dimensions with one or
    two heads (``d_model ≤ 256``: the four projections dominate the reference's cost),
    prefill or a single query, key padding whose valid length is a boundary size."""
    h = big.size(draw, (2, 1), "num_heads")
    dh = big.size(draw, [e for e in big.HEAD_DIMS if h * e <= 256], "head dim")
    dm = h * dh
    n_k = big.size(draw, big.LENGTHS, "S")
    n_q = draw(st.sampled_from([n_k, 1]), label="L")
    query = d.floats(draw, dtype, (1, n_q, dm), label="query")
    key = d.floats(draw, dtype, (1, n_k, dm), label="key")
    value = d.floats(draw, dtype, (1, n_k, dm), label="value")
    valid = None
    if draw(st.booleans(), label="key padding"):
        n = draw(st.sampled_from([n for n in big.LENGTHS if n < n_k] or [n_k]), label="valid")
        valid = (np.arange(n_k) < n)[None, :]
    return Call((query, key, value, *_attn_params(draw, dtype, dm, "attn"), h, valid),
                {"is_causal": draw(st.booleans(), label="is_causal")})


cases("multi_head_attention", k=lambda c: 2 * c.args[0].shape[-1] + c.args[1].shape[1],
      scale=_mha_scale, large=_mha_large)(_mha)


# -- positional encoding and layer norm ----------------------------------------------------


@st.composite
def _pe(draw, dtype: str) -> Call:
    length = draw(st.sampled_from([1, 2, 5, 16, 50]), label="length")
    dm = 2 * d.dim(draw, 1, 8, label="d_model/2")
    base = draw(st.sampled_from([10000.0, 10000.0, 100.0, 2.5, 1e6]), label="base")
    return Call((length, dm), {"base": base})


cases("sinusoidal_positional_encoding", k=lambda c: 1,
      scale=lambda c, cot=None: float(max(1, c.args[0])))(_pe)


@st.composite
def _ln(draw, dtype: str) -> Call:
    ndim = d.dim(draw, 1, 3, label="ndim")
    shape = [d.dim(draw, 1, 3, label=f"dim{i}") for i in range(ndim - 1)]
    dm = d.length(draw, 1, 6, label="D")
    regime = draw(st.sampled_from(["normal", "offset", "tiny"]), label="x regime")
    lo, hi = {"normal": (-3, 3), "offset": (90, 110), "tiny": (-1e-3, 1e-3)}[regime]
    x = d.floats(draw, dtype, (*shape, dm), lo, hi, label="x")
    gamma = d.floats(draw, dtype, (dm,), -2, 2, label="gamma")
    beta = d.floats(draw, dtype, (dm,), -2, 2, label="beta")
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.5]), label="eps")
    return Call((x, gamma, beta), {"eps": eps})


def _ln_conditioning(x: np.ndarray, eps: float) -> tuple[float, float]:
    """``(max|x|/σ, 1/min σ)`` over the rows of ``x``, ``σ = √(var + ε)``: the centring
    ``x − μ`` loses ``u·max|x|`` absolutely, which ``1/σ`` amplifies (``x̂``), and the
    gradient in ``x`` carries one more ``1/σ``."""
    x = x.astype(np.float64)
    sigma = np.sqrt(np.var(x, axis=-1, keepdims=True) + eps)
    return float(np.max(np.abs(x) / sigma, initial=1.0)), float(np.max(1 / sigma, initial=1.0))


def _ln_magnitude(xs, norms, eps: float, cot, chained: bool = False) -> float:
    """``M = (max|γ|·max|x|/σ + max|β|)·max|cot|``, times ``1/min σ`` for a vjp, over the
    inputs ``xs`` of the layer norms with parameters ``norms``: the largest factor, or
    with ``chained`` (a Transformer layer, where an error made before one layer norm
    passes through the next ones) their product, since the condition number of a
    composition is at most the product of its parts'."""
    factors = [1.0]
    for x, (gamma, beta) in zip(xs, norms, strict=True):
        rel, inv_sigma = _ln_conditioning(x, eps)
        g, b = float(np.max(_abs(gamma))), float(np.max(_abs(beta)))
        factors.append(max(1.0, (max(1.0, g) * rel + b)
                           * (1.0 if cot is None else max(1.0, inv_sigma))))
    m = float(np.prod(factors)) if chained else max(factors)
    return m * _cot(cot)


def _ln_scale(call: Call, cot=None) -> float:
    x, gamma, beta = call.args
    return _ln_magnitude([x], [(gamma, beta)], call.kwargs["eps"], cot)


@st.composite
def _ln_large(draw, dtype: str) -> Call:
    """Large tier: rows of widths around the 64…4096-lane chunks of norm kernels; offset
    rows (mean ≈ 100) catch a one-pass variance ``E[x²] − E[x]²`` over long rows."""
    dm = big.size(draw, big.WIDTHS, "D")
    rows = big.size(draw, (3, 1, 2, 5), "rows")
    regime = draw(st.sampled_from(["normal", "offset"]), label="x regime")
    lo, hi = {"normal": (-3, 3), "offset": (90, 110)}[regime]
    x = d.floats(draw, dtype, (rows, dm), lo, hi, label="x")
    gamma = d.floats(draw, dtype, (dm,), -2, 2, label="gamma")
    beta = d.floats(draw, dtype, (dm,), -2, 2, label="beta")
    return Call((x, gamma, beta), {"eps": draw(st.sampled_from([1e-5, 1e-3]), label="eps")})


cases("layer_norm", scale=_ln_scale, large=_ln_large)(_ln)


# -- Transformer layers ------------------------------------------------------------------


def _ffn_norms(draw, dtype: str, dm: int, f: int, n_norm: int) -> tuple[np.ndarray, ...]:
    w1, w2 = 1 / math.sqrt(dm), 1 / math.sqrt(f)
    ffn = (d.floats(draw, dtype, (f, dm), -w1, w1, label="W_1"),
           d.floats(draw, dtype, (f,), -1, 1, label="b_1"),
           d.floats(draw, dtype, (dm, f), -w2, w2, label="W_2"),
           d.floats(draw, dtype, (dm,), -1, 1, label="b_2"))
    norms = tuple(a for i in range(n_norm) for a in (
        d.floats(draw, dtype, (dm,), 0.5, 1.5, label=f"gamma{i + 1}"),
        d.floats(draw, dtype, (dm,), -0.5, 0.5, label=f"beta{i + 1}")))
    return (*ffn, *norms)


def _layer_options(draw) -> dict:
    return {"norm_first": draw(st.booleans(), label="norm_first"),
            "activation": draw(st.sampled_from(["relu", "gelu"]), label="activation"),
            "eps": draw(st.sampled_from([1e-5, 1e-2]), label="eps")}


def _layer_dims(draw) -> tuple[int, int, int, int, int]:
    b, t = d.dim(draw, 1, 2, label="B"), d.length(draw, 1, 4, label="T")
    h = draw(st.sampled_from([1, 2, 2, 3]), label="num_heads")  # 2: torch's fast path
    dh, f = d.dim(draw, 1, 2, label="head dim"), d.dim(draw, 1, 4, label="F")
    return b, t, h, h * dh, f


RESIDUAL_OFFSETS = (100.0, -300.0)
"""Common offsets of the ``"offset"`` residual stream (:func:`_residual_stream`)."""


def _residual_stream(draw, dtype: str, shape, label: str) -> np.ndarray:
    """A layer's input ``x`` (the residual stream): ordinary values in ``[−2, 2]``, or in
    about one example in three the same spread around a large common offset ``c``, as
    residual streams drift in deep models. The layer norm then divides a spread of a few
    units by itself, so a residual sum rounded to a short format (bfloat16's spacing at
    100 is 0.5) loses most of the signal that the float32 sum keeps."""
    c = draw(st.sampled_from((0.0, 0.0, *RESIDUAL_OFFSETS)), label=f"{label} offset")
    return d.floats(draw, dtype, shape, c - 2, c + 2, label=label)


@st.composite
def _encoder(draw, dtype: str, causal: bool | None = None) -> Call:
    b, t, h, dm, f = _layer_dims(draw)
    x = _residual_stream(draw, dtype, (b, t, dm), "x")
    weights = (*_attn_params(draw, dtype, dm, "attn"), *_ffn_norms(draw, dtype, dm, f, 2))
    valid = _maybe_mask(draw, (b, t), label="key_valid")
    is_causal = draw(st.booleans(), label="is_causal") if causal is None else causal
    return Call((x, weights, h, valid), {"is_causal": is_causal, **_layer_options(draw)})


@st.composite
def _decoder(draw, dtype: str) -> Call:
    b, t, h, dm, f = _layer_dims(draw)
    s = d.length(draw, 1, 4, label="S")
    x = _residual_stream(draw, dtype, (b, t, dm), "x")
    memory = d.floats(draw, dtype, (b, s, dm), -2, 2, label="memory")
    weights = (*_attn_params(draw, dtype, dm, "self"), *_attn_params(draw, dtype, dm, "cross"),
               *_ffn_norms(draw, dtype, dm, f, 3))
    valid = _maybe_mask(draw, (b, s), label="memory_valid")
    return Call((x, memory, weights, h, valid), _layer_options(draw))


def _layer_parts(call: Call):
    """``(x, weights, first norm index)`` of an encoder (4 args) or decoder (5 args) call."""
    if len(call.args) == 4:
        return call.args[0], call.args[1], 12
    return call.args[0], call.args[2], 20


def _layer_k(call: Call) -> int:
    x, weights, n0 = _layer_parts(call)
    return 3 * x.shape[2] + x.shape[1] + weights[n0 - 4].shape[0]


def _ffn(z: np.ndarray, W_1, b_1, W_2, b_2, activation: str) -> np.ndarray:
    a = z @ W_1.T + b_1
    if activation == "relu":
        act = np.maximum(a, 0)
    else:
        act = a * (1 + np.vectorize(math.erf)(a / math.sqrt(2))) / 2
    return act @ W_2.T + b_2


def _ln_inputs(call: Call) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """The inputs of the layer's layer norms (with their γ, β), from the spec's own ops:
    the LN conditioning is the layer's worst."""
    x, weights, n0 = _layer_parts(call)
    w = [a.astype(np.float64) for a in weights]
    kw, h, decoder = call.kwargs, call.args[-2], len(call.args) == 5
    self_valid, causal = (None, True) if decoder else (call.args[-1], kw["is_causal"])
    blocks = [lambda z: lmspec.multi_head_attention(z, z, z, *w[:8], h, self_valid,
                                                    is_causal=causal)]
    if decoder:
        mem = call.args[1].astype(np.float64)
        blocks.append(lambda z: lmspec.multi_head_attention(z, mem, mem, *w[8:16], h,
                                                            call.args[-1]))
    blocks.append(lambda z: _ffn(z, *w[n0 - 4:n0], kw["activation"]))
    norms = [(w[i], w[i + 1]) for i in range(n0, len(w), 2)]
    z, ins = x.astype(np.float64), []
    for block, (g, b) in zip(blocks, norms, strict=True):
        if kw["norm_first"]:
            ins.append(z)
            z = z + block(lmspec.layer_norm(z, g, b, kw["eps"]))
        else:
            ins.append(z + block(z))
            z = lmspec.layer_norm(ins[-1], g, b, kw["eps"])
    return ins, norms


def _layer_scale(call: Call, cot=None) -> float:
    """The layer norms' conditioning, chained through the layer (see :func:`_ln_magnitude`);
    for a vjp times the largest input a weight gradient multiplies (``∂W_q = Σ ∂q·xᵀ``:
    the layer's input ``x``, and the decoder's ``memory``), as for the attention ops, which
    a residual stream around a large offset makes far more than 1."""
    ins, norms = _ln_inputs(call)
    m = _ln_magnitude(ins, norms, call.kwargs["eps"], cot, chained=True)
    if cot is None:
        return m
    inputs = call.args[:2] if len(call.args) == 5 else call.args[:1]
    return m * max(1.0, *(float(np.max(_abs(a), initial=0.0)) for a in inputs))


cases("transformer_encoder_layer", k=_layer_k, scale=_layer_scale)(_encoder)
cases("transformer_decoder_layer", k=_layer_k, scale=_layer_scale)(_decoder)


# -- properties that need no reference ------------------------------------------------------


def _weights_claims(w: np.ndarray, mask: np.ndarray | None, k: int):
    """Each weights row sums to 1, or is all zero where the mask lets nothing through;
    masked keys get exactly 0."""
    total = np.sum(w, axis=-1)
    if mask is None:
        yield Close("Σ_s weights = 1", total, np.ones_like(total), k=k)
        return
    alive = mask.any(axis=-1)
    yield Close("Σ_s weights = 1 (rows with a valid key)", total[alive],
                np.ones(int(alive.sum())), k=k)
    yield Holds("weights of masked keys are 0 (a fully masked row is all 0)",
                bool(np.all(w[~mask] == 0)), f"weights {w.tolist()}, mask {mask.tolist()}")


@prop("additive_attention")
def weights_rows_sum_to_one(run, call: Call, dtype: str):
    """Weights rows sum to 1, or are all zero when fully masked."""
    _, w = run("additive_attention", *call.args)
    yield from _weights_claims(w, call.args[-1], call.args[1].shape[1])


@prop("dot_product_attention", "weights_rows_sum_to_one")
def dot_weights_rows_sum_to_one(run, call: Call, dtype: str):
    """Weights rows sum to 1, or are all zero when fully masked."""
    _, w = run("dot_product_attention", *call.args)
    yield from _weights_claims(w, call.args[-1], call.args[1].shape[1])


def _permutation(draw, n: int) -> np.ndarray:
    return np.array(draw(st.permutations(list(range(n))), label="key permutation"))


@st.composite
def _permuted(draw, dtype: str, base, key_axis: int):
    call = draw(base(dtype))
    return call, _permutation(draw, call.args[1].shape[key_axis])


def _close_all(what, got, want, k, scale):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        yield Close(f"{what} [{i}]", g, w, k=k, scale=scale)


@prop("additive_attention", strategy=lambda dt: _permuted(dt, _additive, 1))
def key_permutation_equivariance(run, drawn, dtype: str):
    """Permuting keys, values (and mask) jointly leaves the context unchanged and permutes
    the weights."""
    call, p = drawn
    q, k, vals, W_q, W_k, v, mask = call.args
    ctx, w = run("additive_attention", *call.args)
    ctx_p, w_p = run("additive_attention", q, k[:, p], vals[:, p], W_q, W_k, v,
                     None if mask is None else mask[:, p])
    yield from _close_all("permuted keys", (ctx_p, w_p), (ctx, w[:, p]), _additive_k(call),
                          _additive_scale(call))


@prop("dot_product_attention", "key_permutation_equivariance",
      strategy=lambda dt: _permuted(dt, _dot, 1))
def dot_key_permutation_equivariance(run, drawn, dtype: str):
    """Permuting keys, values (and mask) jointly leaves the context unchanged and permutes
    the weights."""
    call, p = drawn
    q, k, vals, mask = call.args
    ctx, w = run("dot_product_attention", *call.args)
    ctx_p, w_p = run("dot_product_attention", q, k[:, p], vals[:, p],
                     None if mask is None else mask[:, p])
    yield from _close_all("permuted keys", (ctx_p, w_p), (ctx, w[:, p]),
                          q.shape[1] + k.shape[1], _dot_scale(call))


def _sdpa_permuted(dtype: str):
    return _permuted(dtype, lambda dt: _sdpa(dt, causal=False), 2)


@prop("scaled_dot_product_attention", strategy=_sdpa_permuted)
def key_permutation_invariance(run, drawn, dtype: str):
    """Without a causal mask, permuting keys and values (and the mask's key axis) jointly
    leaves the output unchanged."""
    call, p = drawn
    q, k, v, mask = call.args
    pm = None if mask is None else mask[..., p]
    got = run("scaled_dot_product_attention", q, k[:, :, p], v[:, :, p], pm, **call.kwargs)
    yield Close("SDPA(q, Pk, Pv) = SDPA(q, k, v)", got,
                run("scaled_dot_product_attention", *call.args, **call.kwargs),
                k=q.shape[-1] + k.shape[-2], scale=_sdpa_scale(call))


@prop("multi_head_attention", "key_permutation_invariance",
      strategy=lambda dt: _permuted(dt, lambda d_: _mha(d_, causal=False), 1))
def mha_key_permutation_invariance(run, drawn, dtype: str):
    """Without a causal mask, permuting keys, values and key_valid jointly leaves the
    output unchanged."""
    call, p = drawn
    query, key, value, *params, h, valid = call.args
    got = run("multi_head_attention", query, key[:, p], value[:, p], *params, h,
              None if valid is None else valid[:, p], **call.kwargs)
    yield Close("MHA(q, Pk, Pv) = MHA(q, k, v)", got,
                run("multi_head_attention", *call.args, **call.kwargs),
                k=2 * query.shape[-1] + key.shape[1], scale=_mha_scale(call))


@st.composite
def _future_changed(draw, dtype: str, base, key_axis: int, n_arrays: int):
    """A causal call, a cut ``c`` and fresh values for the keys (and values) past ``c``."""
    call = draw(base(dtype))
    n_k = call.args[1].shape[key_axis] if n_arrays > 1 else call.args[0].shape[1]
    c = draw(st.integers(0, n_k - 1), label="cut")
    fresh = [_values(draw, dtype, call.args[i].shape, label=f"new future {i}")
             for i in range(n_arrays)]
    return call, c, fresh


def _replace_future(a: np.ndarray, new: np.ndarray, c: int, axis: int) -> np.ndarray:
    out = a.copy()
    idx = [slice(None)] * a.ndim
    idx[axis] = slice(c + 1, None)
    out[tuple(idx)] = new[tuple(idx)]
    return out


def _sdpa_future(dtype: str):
    return _future_changed(dtype, lambda dt: _sdpa(dt, causal=True), 2, 3)


@prop("scaled_dot_product_attention", strategy=_sdpa_future)
def causal_ignores_future_keys(run, drawn, dtype: str):
    """With is_causal, queries i ≤ c do not move when keys and values j > c change."""
    call, c, (_, new_k, new_v) = drawn
    q, k, v, mask = call.args
    k2, v2 = _replace_future(k, new_k, c, 2), _replace_future(v, new_v, c, 2)
    before = run("scaled_dot_product_attention", *call.args, **call.kwargs)
    after = run("scaled_dot_product_attention", q, k2, v2, mask, **call.kwargs)
    yield Close("causal SDPA: queries ≤ c ignore keys > c", after[:, :, :c + 1],
                before[:, :, :c + 1], k=q.shape[-1] + k.shape[-2],
                scale=max(_sdpa_scale(call), _sdpa_scale(Call((q, k2, v2, mask), call.kwargs))))


def _mha_future(dtype: str):
    return _future_changed(dtype, lambda dt: _mha(dt, causal=True), 1, 3)


@prop("multi_head_attention", "causal_ignores_future_keys", strategy=_mha_future)
def mha_causal_ignores_future_keys(run, drawn, dtype: str):
    """With is_causal, queries i ≤ c do not move when keys and values j > c change."""
    call, c, (_, new_k, new_v) = drawn
    query, key, value, *rest = call.args
    k2, v2 = _replace_future(key, new_k, c, 1), _replace_future(value, new_v, c, 1)
    before = run("multi_head_attention", *call.args, **call.kwargs)
    after = run("multi_head_attention", query, k2, v2, *rest, **call.kwargs)
    changed = Call((query, k2, v2, *rest), call.kwargs)
    yield Close("causal MHA: queries ≤ c ignore keys > c", after[:, :c + 1], before[:, :c + 1],
                k=2 * query.shape[-1] + key.shape[1],
                scale=max(_mha_scale(call), _mha_scale(changed)))


@st.composite
def _decoder_future(draw, dtype: str):
    call = draw(_decoder(dtype))
    x = call.args[0]
    c = draw(st.integers(0, x.shape[1] - 1), label="cut")
    return call, c, d.floats(draw, dtype, x.shape, -2, 2, label="new future x")


@prop("transformer_decoder_layer", strategy=_decoder_future)
def causal_ignores_future_positions(run, drawn, dtype: str):
    """The decoder's self-attention is causal: outputs at t ≤ c do not move when the
    inputs at t > c change."""
    call, c, new_x = drawn
    x, *rest = call.args
    before = run("transformer_decoder_layer", *call.args, **call.kwargs)
    after = run("transformer_decoder_layer", _replace_future(x, new_x, c, 1), *rest,
                **call.kwargs)
    yield Close("decoder: outputs ≤ c ignore inputs > c", after[:, :c + 1], before[:, :c + 1],
                k=_layer_k(call), scale=_layer_scale(call))


def _encoder_future(dtype: str):
    return _future_changed(dtype, lambda dt: _encoder(dt, causal=True), 1, 1)


@prop("transformer_encoder_layer", strategy=_encoder_future)
def causal_ignores_future_positions_enc(run, drawn, dtype: str):
    """With is_causal, outputs at t ≤ c do not move when the inputs at t > c change."""
    call, c, (new_x,) = drawn
    x, *rest = call.args
    before = run("transformer_encoder_layer", *call.args, **call.kwargs)
    after = run("transformer_encoder_layer", _replace_future(x, new_x, c, 1), *rest,
                **call.kwargs)
    yield Close("causal encoder: outputs ≤ c ignore inputs > c", after[:, :c + 1],
                before[:, :c + 1], k=_layer_k(call), scale=_layer_scale(call))


@st.composite
def _ln_plain(draw, dtype: str):
    call = draw(_ln(dtype))
    x = call.args[0]
    dm = x.shape[-1]
    one, zero = d.as_dtype(np.ones(dm), dtype), d.as_dtype(np.zeros(dm), dtype)
    return Call((x, one, zero), call.kwargs)


@prop("layer_norm", strategy=_ln_plain)
def zero_mean_unit_variance(run, call: Call, dtype: str):
    """With γ = 1, β = 0 each row has mean 0 and biased variance σ²/(σ² + ε) (= 1 up to
    ε)."""
    x, eps = call.args[0].astype(np.float64), call.kwargs["eps"]
    y = run("layer_norm", *call.args, **call.kwargs)
    var = np.var(x, axis=-1)
    dm = x.shape[-1]
    scale = _ln_scale(call)
    yield Close("mean(y) = 0", np.mean(y, axis=-1), np.zeros(var.shape), k=dm, scale=scale)
    # ε as an engine holds it (float32, or the dtype) moves σ²/(σ²+ε) by σ²·δε/(σ²+ε)²
    moved = var * scalar_step(eps, dtype, "eps") / (var + eps) ** 2 / UNIT_ROUNDOFF[dtype]
    yield Close("mean(y²) = σ²/(σ²+ε)", np.mean(y * y, axis=-1), var / (var + eps), k=dm,
                scale=max(2 * math.sqrt(dm) * scale, float(np.max(moved, initial=0.0))))


@st.composite
def _pe_shift(draw, dtype: str):
    call = draw(_pe(dtype))
    length = call.args[0]
    p = draw(st.integers(0, length - 1), label="p")
    return call, p, draw(st.integers(0, length - 1 - p), label="k")


@prop("sinusoidal_positional_encoding", strategy=_pe_shift)
def angle_addition(run, drawn, dtype: str):
    """PE[p+k] is PE[p] rotated by the angle of PE[k] in every (sin, cos) pair:
    sin(a+b) = sin a cos b + cos a sin b, cos(a+b) = cos a cos b − sin a sin b."""
    call, p, k = drawn
    pe = run("sinusoidal_positional_encoding", *call.args, **call.kwargs)
    sa, ca, sb, cb = pe[p, 0::2], pe[p, 1::2], pe[k, 0::2], pe[k, 1::2]
    scale = float(max(1, call.args[0]))
    yield Close("sin((p+k)ω) = sin pω cos kω + cos pω sin kω", pe[p + k, 0::2],
                sa * cb + ca * sb, k=2, scale=scale)
    yield Close("cos((p+k)ω) = cos pω cos kω − sin pω sin kω", pe[p + k, 1::2],
                ca * cb - sa * sb, k=2, scale=scale)
