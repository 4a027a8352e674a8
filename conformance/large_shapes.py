"""Sizes and fast draws of the large-shape tier (``lmspec run --shapes large``).

GPU attention, normalisation and cross-entropy kernels are tiled: blocks of 64 or 128
query rows or keys (FlashAttention, Dao et al. 2022; FlashAttention-2, Dao 2023), rows
reduced in chunks of 1024–4096 lanes, vocabularies streamed in chunks (Liger kernel,
Cut Cross-Entropy, Wijmans et al. 2024). Their bugs sit at the tile boundaries — one
short of a block, exactly a block, one past it, the last partial block — which the small
shapes of the ordinary strategies never reach. The families' ``large`` strategies draw
their lengths and widths from the lists below with ``sampled_from``.

The lists are ordered with one past the commonest block (129) first: Hypothesis tries and
shrinks towards the first entry, so the first example drawn crosses a 128 boundary and
a counterexample shrinks to the smallest length that shows the bug among those near it.

Every array here is drawn from a seed that Hypothesis chooses (an element-by-element draw
of 66 049 mask entries would cost more than the kernel under test).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from hypothesis import strategies as st

LENGTHS = (129, 128, 127, 65, 64, 63, 257, 256, 255)
"""Sequence lengths (keys ``S``, queries ``L``): around blocks of 64, 128 and 256."""

HEAD_DIMS = (64, 80, 96, 128, 256)
"""Attention head dimensions that kernels specialise for (80 and 96: not powers of two)."""

WIDTHS = (129, 128, 127, 1025, 1024, 1023, 4097, 4096, 65, 64, 63, 257, 256, 255)
"""Normalised / reduced last-axis widths: around the 64…4096-lane row chunks."""

VOCABS = (32001, 32000, 50257)
"""Vocabulary sizes: LLaMA's 32000 (a multiple of every chunk), one past it, GPT-2's
50257 (prime, so every chunk size leaves a partial last chunk)."""

ROWS = (7, 129, 1, 64)
"""Token rows ``N`` of a cross-entropy: odd, one past a block of 128, one, a block of 64
(the cheapest first: the cost of a fused cross-entropy grows with ``N·V·D``)."""


def size(draw, sizes: Sequence[int], label: str) -> int:
    """One of ``sizes`` (Hypothesis shrinks towards the first)."""
    return int(draw(st.sampled_from(list(sizes)), label=label))


def rng(draw, label: str) -> np.random.Generator:
    """A NumPy generator seeded by Hypothesis (so an example replays from its seed)."""
    return np.random.default_rng(draw(st.integers(0, 2**63 - 1), label=f"{label} seed"))


def bools(draw, shape: Sequence[int], p_true: float, label: str) -> np.ndarray:
    """Booleans, each true with probability ``p_true``, from a seed Hypothesis draws."""
    return rng(draw, label).random(tuple(shape)) < p_true


def ids(draw, shape: Sequence[int], high: int, label: str) -> np.ndarray:
    """int64 ids in ``[0, high)`` from a seed; the first id is ``high − 1`` (the last
    entry of the last, partial chunk) when Hypothesis says so."""
    out = rng(draw, label).integers(0, high, size=tuple(shape), dtype=np.int64)
    if out.size and draw(st.booleans(), label=f"{label}: first is the last id"):
        out.flat[0] = high - 1
    return out
