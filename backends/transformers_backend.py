"""Hugging Face transformers' own samplers as a backend (``lmspec[transformers]``).

``sampling_probs`` and ``draw_tokens`` run the logits warpers of ``model.generate``
(``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``,
``MinPLogitsWarper``, in generate's order and with generate's rules for leaving one out:
``temperature`` 1, ``top_k`` 0, ``top_p`` 1, ``min_p`` 0), then ``softmax``, and for
``draw_tokens`` ``torch.multinomial`` as generate's sampling step draws. Generate casts the
logits to float32 first; so does this backend, which therefore declares no float64.
``temperature = 0`` is generate's greedy step (``argmax``). ``draw_speculative`` runs
``transformers.generation.utils._speculative_sampling`` (assisted generation, Leviathan et
al.'s Algorithm 1) once per draft chain, on ``log`` of the given probabilities (it takes
logits and applies ``softmax``), with torch's global generator seeded per call.
``speculative_accept`` (given uniforms) has no counterpart in transformers: missing.

transformers and torch are imported on first use.
"""

from __future__ import annotations

import importlib.util
from functools import cached_property
from typing import Any

import numpy as np

import lmspec
from lmspec.backends.torch_backend import to_numpy, to_torch


def _tie_at_a_cut(args: Any, kwargs: Any) -> bool:
    """In some row the last token the spec keeps at the top-k or the top-p cut has the
    same logit as the first one it drops (ties the spec breaks by id)."""
    from lmspec.training import filter_sorted, sorted_probs

    x = np.asarray(args[0], dtype=np.float64)
    t = float(kwargs.get("temperature", 1.0))
    if t == 0 or x.ndim != 2:
        return False
    order, ps = sorted_probs(x, t)
    xs = np.take_along_axis(x, order, axis=-1)
    k, top_p = int(kwargs.get("top_k", 0)), float(kwargs.get("top_p", 1.0))
    cuts = np.stack([np.full(len(x), min(k or x.shape[1], x.shape[1])),
                     np.sum(filter_sorted(ps, k, top_p) > 0, axis=-1)], axis=-1)
    rows = np.arange(len(x))[:, None]
    inside = cuts < x.shape[1]
    left = xs[rows, np.clip(cuts - 1, 0, x.shape[1] - 1)]
    right = xs[rows, np.clip(cuts, 0, x.shape[1] - 1)]
    return bool(np.any(inside & (left == right)))


_TIES = (
    "transformers breaks ties at a cut the other way from the spec (which keeps the lowest "
    "ids): TopKLogitsWarper removes only scores strictly below the top_k-th largest "
    "(scores < topk(scores, k)[-1]), so every token tied with the k-th stays (more than "
    "top_k tokens); TopPLogitsWarper sorts ascending and removes from the bottom, so among "
    "tokens tied at the nucleus cut it keeps the highest ids (measured: logits [0, 0, 0], "
    "T = 0.5, top_p = 0.5 keep tokens 1 and 2, the spec 0 and 1). Covered: rows whose last "
    "kept and first dropped token at the top-k or top-p cut have equal logits.")

DEVIATIONS = {
    "sampling_probs": lmspec.Deviation(_TIES, applies=_tie_at_a_cut),
}


class TransformersBackend:
    """transformers' logits warpers and speculative sampling on the CPU."""

    def __init__(self, name: str = "transformers-cpu", device: str = "cpu"):
        self.name = name
        self.device = device
        self.dtypes = ("float16", "bfloat16", "float32")  # generate samples in float32

    def available(self) -> tuple[bool, str]:
        for mod in ("torch", "transformers"):
            if importlib.util.find_spec(mod) is None:
                return False, f"{mod} is not installed (pip install 'lmspec[transformers]')"
        return True, ""

    @cached_property
    def deviations(self) -> dict[str, Any]:
        return dict(DEVIATIONS) if self.available()[0] else {}

    def info(self) -> dict[str, Any]:
        import torch
        import transformers

        return {"transformers": transformers.__version__, "torch": torch.__version__,
                "device": self.device}

    # -- the warpers ---------------------------------------------------------------
    def _scores(self, logits: np.ndarray, temperature: float, top_k: int, top_p: float,
                min_p: float) -> Any:
        import torch
        from transformers.generation import logits_process as lp

        scores = to_torch(logits, self.device).to(torch.float32)
        warpers = []
        if temperature != 1.0:
            warpers.append(lp.TemperatureLogitsWarper(float(temperature)))
        if top_k:
            warpers.append(lp.TopKLogitsWarper(int(top_k)))
        if top_p < 1.0:
            warpers.append(lp.TopPLogitsWarper(float(top_p)))
        if min_p > 0:
            warpers.append(lp.MinPLogitsWarper(float(min_p)))
        ids = torch.zeros((scores.shape[0], 1), dtype=torch.long)
        for w in warpers:
            scores = w(ids, scores)
        return scores

    def _probs(self, logits, temperature, top_k, top_p, min_p) -> Any:
        import torch

        if temperature == 0:
            x = to_torch(logits, self.device).to(torch.float32)
            return torch.nn.functional.one_hot(torch.argmax(x, -1), x.shape[-1]).float()
        try:
            scores = self._scores(logits, temperature, top_k, top_p, min_p)
        except ValueError as exc:  # a warper refusing an option value the spec allows
            raise NotImplementedError(f"transformers: {exc}") from exc
        return torch.softmax(scores, dim=-1)

    def sampling_probs(self, logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
        return to_numpy(self._probs(logits, temperature, top_k, top_p, min_p))

    def draw_tokens(self, logits, n, seed, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
        import torch

        probs = self._probs(logits, temperature, top_k, top_p, min_p)
        if temperature == 0:
            return to_numpy(torch.argmax(probs, -1, keepdim=True).expand(-1, int(n)))
        torch.manual_seed(int(seed))
        return to_numpy(torch.multinomial(probs, int(n), replacement=True))

    def draw_speculative(self, target_probs, draft_probs, draft_ids, seed):
        import torch
        from transformers.generation.utils import _speculative_sampling

        p = to_torch(target_probs, self.device).to(torch.float32)
        q = to_torch(draft_probs, self.device).to(torch.float32)
        ids = to_torch(draft_ids, self.device)
        b, n, kk = ids.shape
        out = torch.full((b, n, kk + 1), -1, dtype=torch.long)
        torch.manual_seed(int(seed))
        with torch.no_grad():
            for row in range(b):
                new_logits, cand_logits = torch.log(p[row])[None], torch.log(q[row])[None]
                for c in range(n):
                    tokens, _ = _speculative_sampling(ids[row, c][None], cand_logits, kk,
                                                      new_logits)
                    out[row, c, :tokens.shape[1]] = tokens[0]
        return to_numpy(out)
