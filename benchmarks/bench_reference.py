"""How close the float64 reference runs to the cost of its own matrix products.

    .venv/bin/python benchmarks/bench_reference.py [--threads 1] [--repeats 3]
        [--batch 32] [--time 128] [--width 512] [--heads 8] [--kv-heads 2]
        [--ops lstm,gru,...] [--no-vjp] [--clock wall|cpu]

For each op, at ``B`` = batch, ``T`` = time, ``D`` = width (also the LSTM/GRU input and
hidden size and the feed-forward hidden size), ``h`` heads (``g`` key/value heads for
``grouped_query_attention``), it times the reference forward (``lmspec.<op>``) and its
hand-derived vjp (the op's ``vjp_rule``, which recomputes the forward; ``lmspec.vjp``
checks the call and the cotangent around it) against the same matrix products alone in
NumPy, and prints
``ratio = reference / matmuls`` (best of ``--repeats`` runs each). The matmul-only
programs are the products an implementation cannot avoid:

* ``lstm``/``gru``: the input projection of the whole sequence as one GEMM
  ``[B·T, D] × [D, G·D]`` and ``T`` recurrent GEMMs ``[B, D] × [D, G·D]`` (``G`` = 4, 3);
  the vjp adds ``T`` recurrent GEMMs ``[B, G·D] × [G·D, D]`` and three sequence GEMMs
  (``∂x``, ``∂W_ih``, ``∂W_hh``);
* ``multi_head_attention``: four projections ``[B·T, D] × [D, D]``, the batched
  ``Q Kᵀ`` and ``P V``; the vjp adds two GEMMs per projection and four batched ones;
* ``transformer_encoder_layer``: the attention's products plus the two feed-forward ones;
* ``grouped_query_attention``: ``Q Kᵀ`` and ``P V`` with the query heads of a group
  stacked (``[B, g, (h/g)·T, E]``), no projections; the vjp adds four batched GEMMs.

Every attention op also exponentiates its whole score tensor, a cost no product
avoids: for those the table adds ``exp``, one in-place float64 ``np.exp`` over a buffer
of the scores' shape, and ``vs mm+exp``, the forward against the matmuls plus that
``exp`` (NumPy has a SIMD float64 ``exp`` only for AVX-512; on AVX2 it is libm's, about
5 ns an element, half the cost of GQA's two products at the default sizes).

``--threads`` sets ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and ``MKL_NUM_THREADS``
before NumPy loads (default 1: the ratio then compares work, not thread scheduling).
Timing lives here, never in assertions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--time", type=int, default=128)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ops", default="lstm,gru,multi_head_attention,transformer_encoder_layer,"
                    "grouped_query_attention")
    ap.add_argument("--no-vjp", action="store_true", help="time the forward only")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time, or this process's CPU time (steadier on a shared "
                    "machine; equal to wall time on an idle one with --threads 1)")
    return ap.parse_args(argv)


ARGS = _parse(sys.argv[1:]) if __name__ == "__main__" else None
if ARGS is not None:
    for _var in _THREAD_VARS:
        os.environ[_var] = str(ARGS.threads)

import numpy as np  # noqa: E402  (after the thread variables, which BLAS reads on load)

import lmspec  # noqa: E402

Case = tuple[tuple[Any, ...], dict[str, Any], Any, Callable[[], Any], Callable[[], Any]]


def _best(fn: Callable[[], Any], repeats: int, clock: Callable[[], float]) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def _recurrent(rng, B: int, T: int, D: int, gates: int, n_state: int) -> Case:
    """One layer, one direction, input and hidden size ``D``."""
    x = rng.standard_normal((B, T, D))
    states = [rng.standard_normal((1, B, D)) for _ in range(n_state)]
    s = 1 / np.sqrt(D)
    w = (s * rng.standard_normal((gates * D, D)), s * rng.standard_normal((gates * D, D)),
         s * rng.standard_normal(gates * D), s * rng.standard_normal(gates * D))
    cot = (rng.standard_normal((B, T, D)), *(rng.standard_normal((1, B, D))
                                            for _ in range(n_state)))
    X = x.reshape(B * T, D)
    h = states[0][0]
    dG = rng.standard_normal((B * T, gates * D))
    dg = dG[:B]

    def fwd():
        X @ w[0].T
        for _ in range(T):
            h @ w[1].T

    def vjp():
        fwd()
        for _ in range(T):
            dg @ w[1]
        dG @ w[0], dG.T @ X, dG.T @ X

    return (x, *states, w), {}, cot, fwd, vjp


def _mha_matmuls(rng, B: int, T: int, D: int, h: int):
    E = D // h
    x = rng.standard_normal((B * T, D))
    W = rng.standard_normal((D, D))
    q = rng.standard_normal((B, h, T, E))
    p = rng.standard_normal((B, h, T, T))

    def fwd():
        for _ in range(3):
            x @ W.T
        q @ np.swapaxes(q, -1, -2)
        p @ q
        x @ W.T

    def bwd():
        for _ in range(4):
            x @ W, x.T @ x
        p @ q, np.swapaxes(p, -1, -2) @ q, p @ q, np.swapaxes(p, -1, -2) @ q

    return x, fwd, bwd


def _attention_params(rng, D: int) -> tuple[np.ndarray, ...]:
    s = 1 / np.sqrt(D)
    return (*(s * rng.standard_normal((D, D)) for _ in range(3)),
            *(s * rng.standard_normal(D) for _ in range(3)), s * rng.standard_normal((D, D)),
            s * rng.standard_normal(D))


def _mha(rng, B: int, T: int, D: int, h: int) -> Case:
    q, k, v = (rng.standard_normal((B, T, D)) for _ in range(3))
    _, fwd, bwd = _mha_matmuls(rng, B, T, D, h)
    return ((q, k, v, *_attention_params(rng, D), h), {}, rng.standard_normal((B, T, D)), fwd,
            lambda: (fwd(), bwd()))


def _encoder(rng, B: int, T: int, D: int, h: int) -> Case:
    x2, fwd_a, bwd_a = _mha_matmuls(rng, B, T, D, h)
    s = 1 / np.sqrt(D)
    ffn = (s * rng.standard_normal((D, D)), s * rng.standard_normal(D),
           s * rng.standard_normal((D, D)), s * rng.standard_normal(D))
    norms = (np.ones(D), np.zeros(D), np.ones(D), np.zeros(D))
    W = ffn[0]

    def fwd():
        fwd_a()
        x2 @ W.T, x2 @ W.T

    def vjp():
        fwd()
        bwd_a()
        for _ in range(2):
            x2 @ W, x2.T @ x2

    weights = (*_attention_params(rng, D), *ffn, *norms)
    return (rng.standard_normal((B, T, D)), weights, h), {}, rng.standard_normal((B, T, D)), \
        fwd, vjp


def _gqa(rng, B: int, T: int, D: int, h: int, g: int) -> Case:
    E = D // h
    q = rng.standard_normal((B, h, T, E))
    k, v = rng.standard_normal((B, g, T, E)), rng.standard_normal((B, g, T, E))
    qs = q.reshape(B, g, (h // g) * T, E)
    p = rng.standard_normal((B, g, (h // g) * T, T))
    kT = np.swapaxes(k, -1, -2)

    def fwd():
        qs @ kT
        p @ v

    def vjp():
        fwd()
        p @ v, np.swapaxes(p, -1, -2) @ qs, p @ k, np.swapaxes(p, -1, -2) @ qs

    return (q, k, v), {}, rng.standard_normal((B, h, T, E)), fwd, vjp


def _scores(a: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    """The shape of each attention op's score tensor (the ``exp`` it cannot avoid)."""
    B, T, h = a.batch, a.time, a.heads
    return {"multi_head_attention": (B, h, T, T), "transformer_encoder_layer": (B, h, T, T),
            "grouped_query_attention": (B, h, T, T)}


def _cases(a: argparse.Namespace) -> dict[str, Callable[[], Case]]:
    rng = np.random.default_rng(0)
    B, T, D, h = a.batch, a.time, a.width, a.heads
    return {
        "lstm": lambda: _recurrent(rng, B, T, D, 4, 2),
        "gru": lambda: _recurrent(rng, B, T, D, 3, 1),
        "multi_head_attention": lambda: _mha(rng, B, T, D, h),
        "transformer_encoder_layer": lambda: _encoder(rng, B, T, D, h),
        "grouped_query_attention": lambda: _gqa(rng, B, T, D, h, a.kv_heads),
    }


def main(a: argparse.Namespace) -> None:
    threads = ", ".join(f"{v}={os.environ.get(v, 'unset')}" for v in _THREAD_VARS)
    print(f"B={a.batch} T={a.time} D={a.width} heads={a.heads} kv_heads={a.kv_heads}; "
          f"best of {a.repeats}, {a.clock} clock; {threads}; numpy {np.__version__}")
    cases = _cases(a)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    rows = []
    scores = _scores(a)
    for op in a.ops.split(","):
        if op not in lmspec.OPS:
            print(f"{op}: not in lmspec.OPS, skipped")
            continue
        args, kwargs, cot, mm_fwd, mm_vjp = cases[op]()
        ref = lmspec.OPS[op].reference
        runs = [("forward", partial(ref, *args, **kwargs), mm_fwd)]
        if not a.no_vjp:
            runs.append(("vjp", partial(lmspec.OPS[op].vjp_rule, cot, *args, **kwargs), mm_vjp))
        t_exp = None
        if op in scores:
            buf = np.random.default_rng(1).standard_normal(scores[op])
            t_exp = min(_best(partial(np.exp, buf, out=buf), 1, clock) for _ in range(a.repeats))
        for mode, ref_fn, mm_fn in runs:
            t_ref = t_mm = float("inf")
            for _ in range(a.repeats):  # interleaved, so that a busy spell hits both
                t_ref = min(t_ref, _best(ref_fn, 1, clock))
                t_mm = min(t_mm, _best(mm_fn, 1, clock))
            e = t_exp if mode == "forward" else None
            rows.append((op, mode, t_ref, t_mm, e))
            print(f"{op:<28}{mode:<9}{t_ref:>10.3f}s{t_mm:>10.3f}s{t_ref / t_mm:>8.2f}x" + (
                f"  exp {e:.3f}s, vs mm+exp {t_ref / (t_mm + e):.2f}x" if e else ""), flush=True)
    print()
    print(f"| {'op':<26} | {'mode':<7} | reference | matmuls | ratio |   exp | vs mm+exp |")
    print(f"|{'-' * 28}|{'-' * 9}|----------:|--------:|------:|------:|----------:|")
    for op, mode, t_ref, t_mm, e in rows:
        extra = f" {e:.3f}s | {t_ref / (t_mm + e):8.2f}x |" if e else f" {'':>6} | {'':>9} |"
        print(f"| {op:<26} | {mode:<7} | {t_ref:8.3f}s | {t_mm:6.3f}s | "
              f"{t_ref / t_mm:4.2f}x |" + extra)

if __name__ == "__main__":
    main(ARGS)
