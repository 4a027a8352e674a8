"""Time ``ngram_log_prob`` on a 1M-token corpus: the exact reference (NumPy counting,
Fractions only for the queried counts) and the torch backends.

    .venv/bin/python benchmarks/bench_ngram.py [--tokens 1000000] [--vocab 10000]
        [--queries 1000] [--order 3] [--cuda]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import lmspec
from lmspec.backends.torch_backend import TorchBackend


def zipf_corpus(rng: np.random.Generator, tokens: int, vocab: int) -> np.ndarray:
    p = 1.0 / np.arange(1, vocab + 1)
    return rng.choice(vocab, size=tokens, p=p / p.sum()).astype(np.int64)


def timed(fn, *args, **kwargs) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--vocab", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--order", type=int, default=3)
    ap.add_argument("--cuda", action="store_true", help="also time torch-cuda")
    a = ap.parse_args()

    rng = np.random.default_rng(0)
    corpus = zipf_corpus(rng, a.tokens, a.vocab)
    half = a.queries // 2
    starts = rng.integers(0, a.tokens - a.order, half)
    seen = corpus[starts[:, None] + np.arange(a.order)]
    queries = np.concatenate([seen, rng.integers(0, a.vocab, (a.queries - half, a.order))])
    backends = [TorchBackend("torch-cpu", "cpu", ("float64",))]
    if a.cuda:
        backends.append(TorchBackend("torch-cuda", "cuda:0", ("float64",)))

    print(f"N = {a.tokens:,} tokens, V = {a.vocab:,}, n = {a.order}, M = {a.queries:,} queries")
    print(f"{'method':<22}{'reference':>12}" + "".join(f"{b.name:>14}" for b in backends)
          + f"{'max |Δ|':>12}")
    for method in lmspec.ngram.METHODS:
        t_ref, ref = timed(lmspec.ngram_log_prob, corpus, queries, a.vocab, method, 0.1, 0.75)
        row, worst = f"{method:<22}{t_ref:>11.2f}s", 0.0
        for b in backends:
            try:
                b.ngram_log_prob(corpus[:1000], queries[:2], a.vocab, method)  # warm-up
            except NotImplementedError:  # V**n does not fit int64 keys
                row += f"{'unsupported':>14}"
                continue
            t, got = timed(b.ngram_log_prob, corpus, queries, a.vocab, method, 0.1, 0.75)
            fin = np.isfinite(ref)
            worst = max(worst, float(np.max(np.abs(got[fin] - ref[fin]), initial=0.0)))
            row += f"{t:>13.2f}s"
        print(row + f"{worst:>12.2e}")


if __name__ == "__main__":
    main()
