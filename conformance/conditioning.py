"""Measured conditioning: the ``M`` of the tolerance floor (see conformance.tolerance).

The floor ``C_FLOOR·√k·u·M`` must cover every rounding a backward-stable implementation
of the op's *literal* formula may make in the dtype under test. A backward-stable
implementation computes the exact result of slightly different data: each input
element moved by a relative ``u`` (componentwise) or by ``u`` times the size of its
array (normwise: reductions and products round relative to the whole vector), each
scalar hyperparameter moved to its representation in the engine's working precision,
and each constant of the formula represented in that precision. ``M`` is therefore at
least ``max|r̃ − r| / u`` over reference evaluations ``r̃`` on such perturbed data:

1. **normwise** ``x ± u·max|x|``, one seeded random sign per element, and the mirror
   image (a kink such as ReLU at 0 or a top-k tie that one moves away from, the other
   crosses); an exact 0 next to a large entry moves, as rounding inside a reduction
   moves it;
2. **componentwise** ``x·(1 + u·t)`` with seeded random signs ``t``, and once more with
   ``−t·(−1)^(i₁+…+iₙ)`` (a checkerboard): along every line of every axis at least one
   of the two sign patterns is not constant, so a shift-invariant op (softmax,
   log_softmax, layer_norm, attention scores), which a perturbation of constant sign
   along its axis leaves unmoved, is always measured in a direction it feels;
3. **scalars**: every float keyword argument ``c`` (``eps``, ``scale``, ``temperature``,
   ``norm_type``, ``base``, ``alpha``, …) moves by ``±δ_c`` in every evaluation above,
   ``δ_c = max(u·|c|, |c − fl_dtype(c)|)`` (``eps = 1e-5`` is subnormal in float16),
   and at least ``|c − fl₃₂(c)|`` for the hyperparameters engines hold as float32
   attributes whatever the dtype (:data:`FLOAT32_ATTRIBUTES`: ``eps``, ``scale``,
   ``base``, ``temperature``, ``softcap``). A perturbation that leaves the op's domain
   (``alpha = 1 + u``) is retried with the scalars unmoved;
4. **constants of the literal formula**: a hyperparameter left at a default that
   stands for a computed value (``scale = None`` is ``1/√E``) is made explicit and moved
   like the others (:data:`IMPLICIT`); a constant that the reference avoids by a smarter
   algorithm is declared per op in :data:`LITERAL` (one entry: the exponent ``1/p`` of
   the p-norm, see :func:`_clip_literal`).

5. **activations of the literal formula**: once more on the unperturbed inputs with
   every output of ``tanh`` and ``σ`` moved one rounding toward zero (``h·(1 − u)``,
   :func:`lmspec._precision.rounding_activations`), for the ops of :data:`ACTIVATED`.
   Implementations compute ``1 − tanh²`` and ``σ(1 − σ)`` from the activation's output;
   near saturation a ``tanh`` one rounding off (``−1 + u`` where the correctly rounded
   value is ``−1``) turns a derivative of exactly 0 into ``2u``, and no perturbation of
   the inputs moves a saturated activation. XLA's float64 ``tanh`` on the CPU gives
   ``tanh(−19.38) = −1 + 7u`` (exactly ``−1 + 2.7e-17``), and ``window_lm``'s ``∂E``
   ``−2.2e-13`` against an exact ``0``: twice the floor without this evaluation, a
   fifth of it with (the floor allows ``C_FLOOR·√k`` of the rounding measured).

The cotangent of a vjp check is perturbed like an input. Signs are seeded by the bytes
of the inputs, so a check is deterministic. Ops with integer outputs (``compare``
declared) and calls without any float data get no evaluations. Cost: four reference
evaluations per example (plus one per evaluation whose scalars left the domain, one per
literal constant and one for the activations), against two for the normwise pair alone;
the harness pays it only for the examples whose error needs it
(:data:`lmspec.conformance.tolerance.MEASURED_ABOVE`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np

import lmspec
from lmspec._precision import DTYPES, UNIT_ROUNDOFF, rounding_activations

from .declare import CASES, Call
from .tolerance import compute_dtype, working_precision

Shake = Callable[[np.ndarray], np.ndarray]


def _is_float_array(a: Any) -> bool:
    return isinstance(a, np.ndarray) and (a.dtype.kind == "f" or a.dtype in DTYPES.values())


def _is_float_scalar(c: Any) -> bool:
    return isinstance(c, (float, np.floating)) and not isinstance(c, bool) and math.isfinite(c)


def _map(x: Any, fn: Callable[[np.ndarray], Any]) -> Any:
    if isinstance(x, (tuple, list)):
        return tuple(_map(a, fn) for a in x)
    return fn(x) if isinstance(x, np.ndarray) else x


def _leaves(x: Any) -> list[Any]:
    if isinstance(x, (tuple, list)):
        return [leaf for a in x for leaf in _leaves(a)]
    if isinstance(x, dict):
        return [leaf for k in sorted(x) for leaf in (k, *_leaves(x[k]))]
    return [x]


def _as_result(x: Any) -> Any:
    """The reference's output as NumPy, float outputs as float64, tuples kept."""
    if isinstance(x, (tuple, list)):
        return tuple(_as_result(a) for a in x)
    a = np.asarray(x)
    return a.astype(np.float64) if a.dtype.kind == "f" or a.dtype in DTYPES.values() else a


def seed_of(*parts: Any) -> int:
    """A seed from the bytes of arrays and the reprs of everything else."""
    h = hashlib.blake2b(digest_size=8)
    for leaf in _leaves(parts):
        if isinstance(leaf, np.ndarray):
            h.update(f"{leaf.dtype}{leaf.shape}".encode())
            h.update(np.ascontiguousarray(leaf).tobytes())
        else:
            h.update(repr(leaf).encode())
    return int.from_bytes(h.digest(), "little")


# -- the perturbation models ----------------------------------------------------------

def normwise(a: np.ndarray, u: float, signs: np.ndarray) -> np.ndarray:
    """``a + signs·u·max|a|`` (finite entries; float64)."""
    x = np.asarray(a, dtype=np.float64)
    fin = np.isfinite(x)
    size = float(np.abs(x[fin]).max(initial=0.0))
    return np.where(fin, x + signs * u * size, x)


def componentwise(a: np.ndarray, u: float, signs: np.ndarray) -> np.ndarray:
    """``a·(1 + signs·u)`` (float64; non-finite entries unchanged)."""
    x = np.asarray(a, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(x), x * (1 + signs * u), x)


def checkerboard(shape: tuple[int, ...]) -> np.ndarray:
    """``(−1)^(i₁+…+iₙ)``: alternates along every axis."""
    if not shape:
        return np.ones(())
    return 1.0 - 2.0 * (np.indices(shape).sum(axis=0) % 2)


FLOAT32_ATTRIBUTES = frozenset({"eps", "scale", "base", "temperature", "softcap"})
"""Hyperparameters that engines keep as float32 attributes whatever the compute dtype
(ONNX attributes are float32; so are many modules' ``eps``): in a float64 check they
may sit ``|c − fl₃₂(c)|`` from ``c``. Other float keywords (``max_norm``, ``alpha``,
``label_smoothing``, ``norm_type``, the n-gram ``k`` and ``discount``) are data passed
in the working precision."""


def scalar_step(c: float, dtype: str, name: str = "eps") -> float:
    """``δ_c = max(u·|c|, |c − fl_dtype(c)|, |c − fl₃₂(c)|)``, the last only for the
    :data:`FLOAT32_ATTRIBUTES`: how far a hyperparameter may sit from ``c`` inside an
    engine that rounds it to the dtype under test (``eps = 1e-5`` is subnormal in
    float16) or holds it as a float32 attribute."""
    c = float(c)
    with np.errstate(over="ignore"):
        reps = [float(np.asarray(c).astype(DTYPES[dtype]))]
        reps += [float(np.float32(c))] if name in FLOAT32_ATTRIBUTES else []
    dist = [abs(c - r) if math.isfinite(r) else 0.0 for r in reps]
    return max(UNIT_ROUNDOFF[dtype] * abs(c), *dist)


def _shift_scalars(kw: dict[str, Any], dtype: str, sign: float) -> dict[str, Any]:
    return {k: float(c) + sign * scalar_step(c, dtype, k) if _is_float_scalar(c) else c
            for k, c in kw.items()}


# -- constants of literal formulas ------------------------------------------------------

def exponent_error(p: float, dtype: str) -> float:
    """``|1/p − fl(1/p)|`` in the dtype under test (0 for ``p`` in ``{1, 2, ∞}``, whose
    implementations take no ``1/p`` power: a sum, a square root, a maximum)."""
    if p in (1.0, 2.0) or not math.isfinite(p):
        return 0.0
    inv = Fraction(1) / Fraction(p)  # exact
    reps = [np.asarray(float(inv)).astype(DTYPES[dtype]), np.float32(float(inv))]
    return float(max(abs(inv - Fraction(float(r))) for r in reps[: 1 if dtype == "float64"
                                                                   else 2]))


def _log_power_sum(arrays: tuple[np.ndarray, ...], p: float) -> list[float]:
    """``ln Σ|g|^p`` of all arrays together, then of each array alone (without forming
    the powers: ``p·ln m + ln Σ(|g|/m)^p``); arrays that are all zero are left out."""
    def one(arrs: tuple[np.ndarray, ...]) -> float | None:
        flat = np.concatenate([np.abs(np.asarray(a, np.float64)).ravel() for a in arrs]
                              + [np.zeros(0)])
        m = float(flat.max(initial=0.0))
        if m == 0 or not math.isfinite(m):
            return None
        return p * math.log(m) + math.log(float(np.sum((flat / m) ** p)))

    parts = [one(arrays)] + [one((a,)) for a in arrays]
    return [x for x in parts if x is not None]


def pnorm_rounding(arrays: tuple[np.ndarray, ...], p: float, dtype: str) -> float:
    """``ρ = |1/p − fl(1/p)|·(|ln S| + max_i |ln S_i|)``: the relative error of the literal
    ``S^fl(1/p)`` over all arrays together (``S = Σ|g|^p``), or over per-array norms
    (``S_i`` of each array) and then their norm (see :func:`_clip_literal`)."""
    delta = exponent_error(p, dtype)
    logs = _log_power_sum(arrays, p) if delta else []
    return delta * (abs(logs[0]) + max(abs(x) for x in logs[1:])) if logs else 0.0


def _clip_literal(call: Call, dtype: str, kw: dict[str, Any]) -> list[Any]:
    """``clip_grad_norm`` as the literal ``(Σ|g|^p)^(1/p)`` computes it: the exponent is
    ``fl(1/p)``, so ``S^fl(1/p) = ‖g‖·S^(fl(1/p) − 1/p)``, a relative error
    ``ρ = |1/p − fl(1/p)|·|ln S|`` that no perturbation of the data shows (34 u for
    ``g = 1e30``, ``p = 3`` in float64; the reference rescales by ``max|g|`` and avoids
    it). Grouped per array (the norm of per-array norms, as torch computes it) the
    per-array sums ``S_i`` add their own: ``ρ = δ·(|ln S| + max_i |ln S_i|)``. The
    evaluations are the reference with the total norm off by ``±ρ`` relatively, and the
    gradients clipped by a threshold off by ``∓ρ`` (the same coefficient change)."""
    rho = pnorm_rounding(tuple(call.args[0]), float(kw.get("norm_type", 2.0)), dtype)
    if not rho:
        return []
    ref = lmspec.OPS["clip_grad_norm"].reference
    _, total = ref(*call.args, **kw)
    out = []
    for sign in (1.0, -1.0):
        clipped, _ = ref(*call.args, **{**kw, "max_norm": kw["max_norm"] * (1 - sign * rho)})
        out.append(_as_result((clipped, total * (1 + sign * rho))))
    return out


def _sdpa_default_scale(call: Call) -> dict[str, float]:
    """``scale = None`` means ``1/√E``, a constant an engine rounds (to float32, say)."""
    if call.kwargs.get("scale") is not None:
        return {}
    e = np.shape(call.args[0])[-1] if np.ndim(call.args[0]) else 0
    return {"scale": 1.0 / math.sqrt(e)} if e else {}


IMPLICIT: dict[str, Callable[[Call], dict[str, float]]] = {
    "scaled_dot_product_attention": _sdpa_default_scale,
}
"""Per op: float hyperparameters the literal formula uses when a keyword is left at its
default (``None``), made explicit so that the scalar perturbation moves them too."""

ACTIVATED = frozenset({
    "rnn_cell", "lstm_cell", "gru_cell", "rnn", "lstm", "gru", "window_lm", "rnn_lm_loss",
    "text_classifier_loss", "additive_attention", "gated_mlp", "grouped_query_attention",
    "fused_linear_cross_entropy", "paged_attention"})
"""The ops whose reference passes a ``tanh`` or ``σ`` output through
:func:`lmspec._precision.activation` (for some of their inputs: ``rnn`` with ``relu``,
GQA without ``softcap`` have none); tests/test_conditioning.py keeps the set exact."""

LITERAL: dict[str, Callable[[Call, str, dict[str, Any]], list[Any]]] = {
    "clip_grad_norm": _clip_literal,
}
"""Per op: reference evaluations that carry the rounding of a constant of the op's
literal formula (forward only)."""


# -- the evaluations --------------------------------------------------------------------

def _signs(rng: np.random.Generator, tree: Any) -> list[np.ndarray]:
    """One random sign per element of every array of ``tree``, in traversal order."""
    out: list[np.ndarray] = []
    _map(tree, lambda a: out.append(rng.choice(np.array([-1.0, 1.0]), size=a.shape)))
    return out


def _shaker(model: Callable[[np.ndarray, float, np.ndarray], np.ndarray], u: float,
            signs: list[np.ndarray], sign: float, checker: bool = False) -> Shake:
    """Perturbs the arrays of a traversal (the same order as :func:`_signs`) by ``model``
    with ``sign·signs`` (times the checkerboard if ``checker``); other arrays pass."""
    it = iter(signs)

    def shake(a: np.ndarray) -> np.ndarray:
        s = sign * next(it)
        if not _is_float_array(a):
            return a
        return model(a, u, s * checkerboard(a.shape) if checker else s)

    return shake


def _kwargs(op: str, call: Call) -> dict[str, Any]:
    kw = dict(call.kwargs)
    kw.update(IMPLICIT[op](call) if op in IMPLICIT else {})
    if "dtype" in lmspec.OPS[op].params:
        kw["dtype"] = "float64"
    return kw


def _has_float_data(call: Call, cot: Any) -> bool:
    return any(_is_float_array(a) for a in _leaves([call.args, cot])) or any(
        _is_float_scalar(c) for c in call.kwargs.values())


def perturbed_reference(op: str, call: Call, dtype: str, cot: Any = None,
                        working: str | None = None) -> list[Any]:
    """The float64 reference (or its vjp, given ``cot``) on the perturbed inputs of the
    module docstring, one entry per evaluation (``None`` where the perturbed inputs leave
    the op's domain); the tolerance's measured conditioning is the largest distance of
    these from the reference, divided by ``u``.

    The perturbations model rounding at the *working* precision of ``dtype`` (float32 for
    float16/bfloat16, whose intermediates are computed in float32, CONTRACT §6; see
    :func:`lmspec.conformance.tolerance.working_precision`): ``u``, the scalars'
    representation and the literal constants are that precision's. Inputs are exact in
    ``dtype``, so rounding them again is never charged to a backend."""
    oc = CASES.get(op)
    if (oc is not None and oc.compare is not None) or not _has_float_data(call, cot):
        return []
    dtype = compute_dtype(working or working_precision(dtype))
    u = UNIT_ROUNDOFF[dtype]
    kw = _kwargs(op, call)
    rng = np.random.default_rng(seed_of(op, call.args, kw, cot))

    def evaluate(shake: Shake, scalar_sign: float) -> Any:
        args, c = _map(call.args, shake), None if cot is None else _map(cot, shake)
        shifted = _shift_scalars(kw, dtype, scalar_sign)
        for kws in [shifted] + ([kw] if shifted != kw else []):
            try:
                with np.errstate(all="ignore"):
                    if cot is None:
                        return _as_result(lmspec.OPS[op].reference(*args, **kws))
                    return _as_result(lmspec.vjp(op, args, kws, c))
            except ValueError:
                continue
        return None

    s_norm, s_comp = _signs(rng, [call.args, cot]), _signs(rng, [call.args, cot])
    out = [evaluate(_shaker(normwise, u, s_norm, 1.0), 1.0),
           evaluate(_shaker(normwise, u, s_norm, -1.0), -1.0),
           evaluate(_shaker(componentwise, u, s_comp, 1.0), -1.0),
           evaluate(_shaker(componentwise, u, s_comp, -1.0, checker=True), 1.0)]
    if op in ACTIVATED:
        with rounding_activations(-u) as moved:
            rounded = evaluate(lambda a: a, 0.0)
        if moved.hits:
            out.append(rounded)
    if cot is None and op in LITERAL:
        try:
            out += LITERAL[op](call, dtype, kw)
        except ValueError:
            pass
    return out
