"""ngram family on torch tensor ops (torch has no n-gram kernel of its own).

A second, independent implementation of ``ngram_log_prob``: every m-gram is packed into
one int64 key ``Σ_i g_i·V^(m−1−i)`` (windows from ``Tensor.unfold``); counts come from
``torch.unique(return_counts=True)``, continuation counts ``N1+(·g)`` from the suffixes
``key mod V^m`` of the distinct (m+1)-grams, per-context sums and ``N_r(h·)`` from
``scatter_add_`` over ``key // V``, counts-of-counts from ``torch.bincount``, query
lookups from ``torch.searchsorted``. The log-probabilities are computed in float64, in the
log domain (``torch.logaddexp`` for each interpolation, so that probabilities below
float64's range keep a finite log), vectorised over the queries, one step per order,
and cast to ``dtype`` at the end;
the spec is exact rational arithmetic, so the float64 rounding is what the tolerance
charges. Runs on the backend's device (CPU or CUDA).
"""

from __future__ import annotations

import math

import torch

from lmspec.backends.torch_backend import device, torch_dtype

NOTES = {
    "ngram_log_prob": "composed from torch.unique / searchsorted / scatter_add_ / bincount "
                      "on packed int64 n-gram keys; log-probabilities in float64 (log "
                      "domain), then cast "
                      "(torch has no n-gram kernel). Orders with V**n >= 2**62 are unsupported.",
}

F64 = torch.float64


TINY = 2.0**-1022


def _ln(x):
    return torch.log(x.to(F64))


def _ln_ratio(num, den):
    """``ln(num/den)``: the log of the rounded ratio (one rounding), or ``ln num − ln den``
    where the ratio would leave float64's normal range."""
    num, den = num.to(F64), den.to(F64)
    r = num / den
    return torch.where((r >= TINY) | (r == 0) | r.isnan(), torch.log(r),
                       torch.log(num) - torch.log(den))


def _discounted(s, kept, log_gamma_over_c, lower):
    """``ln(kept/c(h) + (γ/c(h))·exp(lower))`` (absolute-discounting interpolation)."""
    return torch.logaddexp(_ln_ratio(kept, s.c_h), log_gamma_over_c + lower)


class _Order:
    """Statistics of one order ``m`` gathered for the queries (int64 tensors ``[M]``)."""

    def __init__(self, c_hw, c_h, n1, n2, n3p, coc):
        self.c_hw, self.c_h, self.n1, self.n2, self.n3p, self.coc = c_hw, c_h, n1, n2, n3p, coc

    @property
    def n1p(self):
        return self.n1 + self.n2 + self.n3p


class NgramModel:
    """One ``ngram_log_prob`` call. Mutation tests subclass it and override one step."""

    def __init__(self, corpus, queries, vocab_size, k, discount):
        self.corpus = corpus.to(device()).long()
        self.queries = queries.to(device()).long()
        self.V = int(vocab_size)
        self.n = self.queries.shape[1]
        self.k = float(k)
        self.D = float(discount)
        self._raw: dict = {}
        if self.V**self.n >= 2**62:
            raise NotImplementedError(f"vocab_size**n = {self.V}**{self.n} does not fit "
                                      "the int64 packed keys")

    # -- counting ---------------------------------------------------------------------
    def _pack(self, grams):
        """``[R, m]`` int64 → keys ``Σ_i g_i V^(m−1−i)``."""
        m = grams.shape[1]
        powers = self.V ** torch.arange(m - 1, -1, -1, device=grams.device, dtype=torch.int64)
        return (grams * powers).sum(dim=1)

    def _window_keys(self, m):
        if len(self.corpus) < m:
            return torch.zeros(0, dtype=torch.int64, device=self.corpus.device)
        return self._pack(self.corpus.unfold(0, m, 1))

    def raw_counts(self, m):
        """Distinct m-gram keys (sorted) and their raw counts ``c(g)`` (computed once)."""
        if m not in self._raw:
            self._raw[m] = torch.unique(self._window_keys(m), sorted=True, return_counts=True)
        return self._raw[m]

    def continuation_counts(self, m):
        """``N1+(·g)``: distinct (m+1)-grams grouped by their m-gram suffix."""
        upper, _ = self.raw_counts(m + 1)
        return torch.unique(upper % self.V**m, sorted=True, return_counts=True)

    def counts(self, m, method):
        kn = method in ("kneser_ney", "modified_kneser_ney")
        return self.continuation_counts(m) if kn and m < self.n else self.raw_counts(m)

    # -- gathering for the queries --------------------------------------------------------
    @staticmethod
    def _find(keys, values, wanted):
        """``values[i]`` where ``keys[i] == wanted``, else 0."""
        if len(keys) == 0:
            return torch.zeros_like(wanted)
        at = torch.searchsorted(keys, wanted).clamp(max=len(keys) - 1)
        return torch.where(keys[at] == wanted, values[at], torch.zeros_like(wanted))

    def order(self, m, method):
        keys, c = self.counts(m, method)
        ctx, inv = torch.unique(keys // self.V, sorted=True, return_inverse=True)

        def per_ctx(x):
            return torch.zeros(len(ctx), dtype=torch.int64, device=keys.device).scatter_add_(
                0, inv, x.long())

        q = self._pack(self.queries[:, self.n - m:])
        qctx = q // self.V
        coc = torch.bincount(c.clamp(max=5), minlength=6)[1:5].to(F64)
        return _Order(self._find(keys, c, q), *(self._find(ctx, per_ctx(x), qctx)
                      for x in (c, c == 1, c == 2, c >= 3)), coc=coc)

    # -- the estimators, in the log domain (exact probabilities can lie below float64's
    #    range, e.g. D²/2 for a tiny discount; ln of them cannot) ---------------------------
    def mle(self, s):
        return _ln_ratio(s.c_hw, s.c_h)

    def add_k(self, s):
        return _ln_ratio(s.c_hw.to(F64) + self.k, s.c_h.to(F64) + self.k * self.V)

    def wb_weights(self, s):
        """``(ln λ(h), ln(1 − λ(h)))``, ``λ(h) = c(h)/(c(h) + N1+(h·))``."""
        return _ln_ratio(s.c_h, s.c_h + s.n1p), _ln_ratio(s.n1p, s.c_h + s.n1p)

    def witten_bell(self, s, lower):
        log_lam, log_rest = self.wb_weights(s)
        return torch.logaddexp(log_lam + _ln_ratio(s.c_hw, s.c_h), log_rest + lower)

    def kneser_ney(self, s, lower):
        log_gamma = math.log(self.D) + _ln_ratio(s.n1p, s.c_h) if self.D else -math.inf
        return _discounted(s, (s.c_hw.to(F64) - self.D).clamp(min=0), log_gamma, lower)

    @staticmethod
    def mkn_discounts(coc):
        """``D_r = r − (r+1)·Y·n_{r+1}/n_r``, ``Y = n1/(n1+2n2)``; fallback ``(.5, 1, 1.5)``."""
        r = torch.arange(1, 4, dtype=F64, device=coc.device)
        fallback = torch.tensor([0.5, 1.0, 1.5], dtype=F64, device=coc.device)
        if bool((coc == 0).any()):
            return fallback
        y = coc[0] / (coc[0] + 2 * coc[1])
        d = r - (r + 1) * y * coc[1:] / coc[:3]
        return fallback if bool(((d < 0) | (d > r)).any()) else d

    def modified_kneser_ney(self, s, lower):
        d = self.mkn_discounts(s.coc)
        d_of = torch.cat([torch.zeros(1, dtype=F64, device=d.device), d])[s.c_hw.clamp(max=3)]
        gamma = d[0] * s.n1.to(F64) + d[1] * s.n2.to(F64) + d[2] * s.n3p.to(F64)
        return _discounted(s, (s.c_hw.to(F64) - d_of).clamp(min=0), _ln_ratio(gamma, s.c_h),
                           lower)

    def log_probs(self, method):
        if method in ("mle", "add_k"):
            return getattr(self, method)(self.order(self.n, method))
        lp = torch.full((len(self.queries),), -math.log(self.V), dtype=F64,
                        device=self.queries.device)
        step = getattr(self, method)
        for m in range(1, self.n + 1):
            s = self.order(m, method)
            lp = torch.where(s.c_h > 0, step(s, lp), lp)  # unseen context: all mass goes down
        return lp

    @classmethod
    def log_prob(cls, corpus, queries, vocab_size, method="add_k", k=1.0, discount=0.75,
                 dtype="float64"):
        if method not in ("mle", "add_k", "witten_bell", "kneser_ney", "modified_kneser_ney"):
            raise ValueError(f"ngram_log_prob: unknown method {method!r}")
        model = cls(corpus, queries, vocab_size, k, discount)
        return model.log_probs(method).to(torch_dtype(dtype))


def ngram_log_prob(corpus, queries, vocab_size, method="add_k", k=1.0, discount=0.75,
                   dtype="float64"):
    return NgramModel.log_prob(corpus, queries, vocab_size, method, k, discount, dtype)
