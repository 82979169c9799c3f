"""Synthetic corpus: a seeded sparse Markov source whose entropy rate is computed exactly.

The entropy rate of the source is the irreducible loss E of next-token prediction on it (no model can beat
the true conditional distribution, Shannon 1948; Cover & Thomas, *Elements of Information Theory*, ch. 4), so
a scaling-law fit of ``L(N, D) = E + ...`` (Hoffmann et al. 2022, arXiv:2203.15556) can be checked against
ground truth instead of being an unverifiable extrapolation.

The source is an order-``k`` Markov chain over ``V`` tokens whose next-token distribution mixes structure at
every order ``j = 0..k``::

    p(x | c) = lambda_0 * u(x) + sum_{j=1..k} lambda_j * Q_j[bucket_j(last j tokens of c)](x)

- ``u`` is a full-support Zipf(s) unigram over a random permutation of the vocabulary. Its mass
  ``lambda_0 > 0`` makes every transition possible, so the chain is irreducible and aperiodic (hence
  ergodic: a unique stationary distribution and a well-defined entropy rate).
- ``Q_j`` holds ``M_j`` sparse distributions, each over ``K_j`` distinct successors (drawn Zipf-biased, so
  frequent tokens stay frequent) with Dirichlet(alpha) weights. The last ``j`` tokens pick a row through a
  seeded random hash into ``M_j`` buckets (identity when ``M_j = V**j``).

Because there is structure at every order, a model that only learns unigram statistics reaches ``H_0``, one
that learns bigrams reaches ``H_1 < H_0``, and so on down to ``E = H_k``: bigger models capture more of the
(Zipf-skewed) higher-order contexts, which gives the smooth loss-vs-size curve a scaling study needs.

Exact quantities (``entropies``): the stationary distribution ``pi`` over the ``V**k`` contexts comes from
power iteration on the transition operator, split into a dense part that depends only on the last ``k-1``
tokens plus a sparse order-``k`` matrix, so one iteration costs ``O(V**k * (1 + K_k))``. Then
``E = sum_c pi(c) H(p(. | c))`` and the n-gram ladder ``H_j = H(X_t | X_{t-j..t-1}) = H(pi_{j+1}) - H(pi_j)``
with ``pi_j`` the stationary law of ``j`` consecutive tokens; ``H_0`` is the unigram entropy (the loss of the
best context-free model).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class MarkovSourceConfig:
    """Generator parameters. Tuples are indexed by order: ``weights`` by j = 0..k, the rest by j = 1..k."""

    vocab_size: int = 256
    order: int = 2
    # lambda_0 (unigram smoothing, > 0 for ergodicity) ... lambda_k; normalised to sum to 1.
    weights: tuple[float, ...] = (0.1, 0.3, 0.6)
    successors: tuple[int, ...] = (8, 4)  # K_j: successors per bucket at order j
    buckets: tuple[int | None, ...] = (None, None)  # M_j; None means V**j (no hashing)
    zipf_exponent: float = 1.0
    dirichlet_alpha: float = 0.5
    seed: int = 0

    def validate(self) -> None:
        V, k = self.vocab_size, self.order
        if not 2 <= V <= 2**31:
            raise ValueError(f"vocab_size must be in [2, 2**31], got {V}")
        if k < 1:
            raise ValueError(f"order must be >= 1, got {k}")
        if V**k > 2**24:
            raise ValueError(
                f"vocab_size**order = {V}**{k} = {V**k} contexts is too many for the exact entropy "
                f"computation (limit 2**24); lower vocab_size or order"
            )
        if len(self.weights) != k + 1:
            raise ValueError(f"weights needs order+1 = {k + 1} entries (lambda_0..k), got {self.weights}")
        if not all(math.isfinite(w) and w >= 0 for w in self.weights) or not self.weights[0] > 0:
            raise ValueError(f"weights must be >= 0 with weights[0] > 0 (ergodicity), got {self.weights}")
        if len(self.successors) != k or len(self.buckets) != k:
            raise ValueError(
                f"successors and buckets need order = {k} entries each, got {self.successors}, {self.buckets}"
            )
        for j, (K, M) in enumerate(zip(self.successors, self.buckets, strict=True), start=1):
            if not 1 <= K <= V:
                raise ValueError(f"successors[{j - 1}] (order {j}) must be in [1, vocab_size], got {K}")
            if M is not None and not 1 <= M <= V**j:
                raise ValueError(f"buckets[{j - 1}] (order {j}) must be in [1, {V**j}] or None, got {M}")
        # written so that NaN fails too (a NaN exponent made successor sampling loop forever)
        if not (math.isfinite(self.zipf_exponent) and self.zipf_exponent >= 0):
            raise ValueError(f"zipf_exponent must be finite and >= 0, got {self.zipf_exponent}")
        if not (math.isfinite(self.dirichlet_alpha) and self.dirichlet_alpha > 0):
            raise ValueError(f"dirichlet_alpha must be finite and > 0, got {self.dirichlet_alpha}")
        # The Zipf unigram (by rank; which token gets which rank does not matter here) must keep every token
        # reachable, and leave enough mass outside the top K-1 tokens for K distinct successors to be drawn:
        # successive sampling needs ~1 / (that mass) draws for the last one (exponent 8 ran for minutes).
        u = np.arange(1.0, V + 1) ** -self.zipf_exponent
        u /= u.sum()
        if not u[-1] > 0:
            raise ValueError(f"zipf_exponent={self.zipf_exponent} is too steep for vocab_size={V}: the "
                             "rarest token's probability underflows to 0 (the chain would not be ergodic)")
        tail = 1.0 - u[: max(self.successors) - 1].sum()
        if tail < _MIN_SUCCESSOR_TAIL:
            raise ValueError(
                f"zipf_exponent={self.zipf_exponent} is too steep for {max(self.successors)} successors: the "
                f"tokens below the top {max(self.successors) - 1} hold only {tail:.2g} of the unigram mass "
                f"(< {_MIN_SUCCESSOR_TAIL:g}), so drawing distinct successors would take ~{1 / tail:.2g} "
                "tries each; lower the exponent or the successors"
            )
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


# Least unigram mass outside the top K-1 tokens that MarkovSourceConfig.validate accepts (<= 1000 expected
# redraws for a row's last successor).
_MIN_SUCCESSOR_TAIL = 1e-3


def _distinct_successors(rng: np.random.Generator, cdf_V: np.ndarray, M: int, K: int) -> np.ndarray:
    """[M, K] distinct token ids per row, drawn successively without replacement with probability proportional
    to the unigram (inverse-CDF draws, re-drawing duplicates: conditioned on missing the already chosen ids a
    fresh draw is proportional to the remaining weights, so this is exact successive sampling). O(M K) instead
    of the O(M V) of Gumbel-top-K, which matters for V = 1024, order 2 (a million rows)."""
    out = np.empty((M, K), dtype=np.int64)
    V = len(cdf_V)
    for k in range(K):
        todo = np.arange(M)
        while todo.size:
            cand = np.minimum(np.searchsorted(cdf_V, rng.random(todo.size) * cdf_V[-1], side="right"), V - 1)
            dup = (out[todo, :k] == cand[:, None]).any(1)
            out[todo[~dup], k] = cand[~dup]
            todo = todo[dup]
    return out


def _entropy(p: np.ndarray) -> float:
    """Shannon entropy in nats of a (flattened) probability vector; 0 log 0 = 0."""
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@dataclass
class _OrderTable:
    bucket_of_context: np.ndarray | None  # [V**j] int -> bucket, or None for the identity
    succ_MxK: np.ndarray  # successor token ids, distinct within a row
    prob_MxK: np.ndarray  # successor probabilities, rows sum to 1

    def rows(self, ctx_j: np.ndarray) -> np.ndarray:
        return ctx_j if self.bucket_of_context is None else self.bucket_of_context[ctx_j]


@dataclass
class StationaryInfo:
    pi: np.ndarray  # [V**k] stationary distribution over contexts (float64)
    iterations: int
    residual: float  # L1 change of the last power-iteration step


@dataclass
class MarkovSource:
    """The sparse Markov source of the module docstring. Build with ``MarkovSource.create(cfg)``."""

    config: MarkovSourceConfig
    unigram_V: np.ndarray
    tables: list[_OrderTable]
    lambdas: np.ndarray
    _stationary: StationaryInfo | None = field(default=None, repr=False)
    _tables_cache: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    _cdf_pi: np.ndarray | None = field(default=None, repr=False)
    _alias_cache: tuple[np.ndarray, int] | None = field(default=None, repr=False)

    @classmethod
    def create(cls, config: MarkovSourceConfig) -> MarkovSource:
        config.validate()
        V, k = config.vocab_size, config.order
        # One independent child stream per table so changing one order's parameters leaves the others intact.
        rngs = [np.random.default_rng(s) for s in np.random.SeedSequence([config.seed, 0x5EED]).spawn(k + 1)]
        ranks = rngs[0].permutation(V)  # token id -> Zipf rank, so id order carries no information
        zipf_V = (ranks + 1.0) ** -config.zipf_exponent
        unigram_V = zipf_V / zipf_V.sum()
        lambdas = np.asarray(config.weights, dtype=np.float64)
        lambdas = lambdas / lambdas.sum()
        tables = []
        for j in range(1, k + 1):
            rng = rngs[j]
            K, M = config.successors[j - 1], config.buckets[j - 1]
            n_ctx = V**j
            bucket = None if M is None else rng.integers(0, M, size=n_ctx)
            M = n_ctx if M is None else M
            succ_MxK = _distinct_successors(rng, np.cumsum(unigram_V), M, K)
            prob_MxK = rng.dirichlet(np.full(K, config.dirichlet_alpha), size=M)
            tables.append(_OrderTable(bucket, succ_MxK, prob_MxK))
        return cls(config, unigram_V, tables, lambdas)

    # ---- exact quantities -----------------------------------------------------------------------
    @property
    def n_contexts(self) -> int:
        return self.config.vocab_size**self.config.order

    def _sparse_parts(self) -> tuple[np.ndarray, np.ndarray]:
        """Per context, the successor ids and masses of the sparse part of p(x | c), all orders side by side:
        ``[V**k, sum_j K_j]`` each (a token may appear under several orders; consumers sum duplicates)."""
        V, C = self.config.vocab_size, self.n_contexts
        ctx = np.arange(C)
        cols, vals = [], []
        for j, t in enumerate(self.tables, start=1):
            r = t.rows(ctx % V**j)
            cols.append(t.succ_MxK[r].astype(np.int32))
            vals.append(self.lambdas[j] * t.prob_MxK[r])
        return np.concatenate(cols, axis=1), np.concatenate(vals, axis=1)

    def _low_dense(self) -> np.ndarray:
        """[V**(k-1), V] dense part of p(x | c) that depends only on the last k-1 tokens r of c:
        lambda_0 u(x) + sum_{j<k} lambda_j Q_j[bucket_j(r)](x). It has V**k entries, as many as pi."""
        V, k = self.config.vocab_size, self.config.order
        R = V ** (k - 1)
        low_RxV = np.tile(self.lambdas[0] * self.unigram_V, (R, 1))
        r = np.arange(R)
        for j, t in enumerate(self.tables[:-1], start=1):
            rows = t.rows(r % V**j)
            # Successors are distinct within a row, so this fancy-indexed += never hits an index twice.
            low_RxV[r[:, None], t.succ_MxK[rows]] += self.lambdas[j] * t.prob_MxK[rows]
        return low_RxV

    def _top(self) -> tuple[np.ndarray, np.ndarray]:
        """Order-k part of p(x | c): successor ids and masses [V**k, K_k]; the only part needing all of c."""
        t = self.tables[-1]
        rows = t.rows(np.arange(self.n_contexts))
        return t.succ_MxK[rows], self.lambdas[-1] * t.prob_MxK[rows]

    def stationary(self, tol: float = 1e-13, max_iter: int | None = None) -> StationaryInfo:
        """Stationary distribution over contexts by power iteration; raises if it does not converge.

        ``max_iter`` default: max(10_000, 40 / lambda_0). The lambda_0 unigram part alone contracts the error
        by (1 - lambda_0) a step, so a source with a small lambda_0 (weights 0.001, 0.999) needs about
        30 / lambda_0 steps: it is slow to mix, not ill-posed."""
        if self._stationary is not None:
            return self._stationary
        if max_iter is None:
            max_iter = max(10_000, math.ceil(40.0 / float(self.lambdas[0])))
        V, C = self.config.vocab_size, self.n_contexts
        R = C // V
        # Context c = (a, r), index a * R + r, moves to (r, x), index r * V + x. Split p(x | c) into the
        # dense part that depends on r only (applied through the suffix marginal m(r) = sum_a pi(a, r)) and
        # the sparse order-k part, a matrix with C * K_k nonzeros; one iteration is O(C * (1 + K_k)).
        low_RxV = self._low_dense()
        cols, vals = self._top()
        nxt = ((np.arange(C, dtype=np.int64) % R) * V)[:, None] + cols
        prev = np.repeat(np.arange(C, dtype=np.int64), cols.shape[1])
        A = sp.csr_matrix((vals.ravel(), (nxt.ravel(), prev)), shape=(C, C))
        del nxt, prev
        pi = np.full(C, 1.0 / C)
        residual = math.inf
        for it in range(1, max_iter + 1):
            m_R = pi.reshape(V, R).sum(0)
            new = (m_R[:, None] * low_RxV).ravel() + A @ pi
            new /= new.sum()  # guards against float drift; the exact operator preserves mass
            residual = float(np.abs(new - pi).sum())
            pi = new
            if residual < tol:
                self._stationary = StationaryInfo(pi, it, residual)
                return self._stationary
        raise RuntimeError(
            f"power iteration did not converge: L1 residual {residual:.3g} after {max_iter} steps "
            f"(lambda_0 = {self.lambdas[0]:.3g}: a larger weights[0] mixes faster)"
        )

    def entropies(self) -> dict:
        """Exact entropy rate and n-gram ladder, in nats/token."""
        V, k, C = self.config.vocab_size, self.config.order, self.n_contexts
        st = self.stationary()
        low_RxV = self._low_dense()
        cols, vals = self._top()
        # H(p(.|c)) = entropy of the dense row low[r], corrected on the K_k order-k successors: exact, and
        # O(V**k * K_k) instead of a dense V**k x V table.
        h_low_R = -(low_RxV * np.log(low_RxV)).sum(1)
        r = np.arange(C) % (C // V)
        q = low_RxV[r[:, None], cols]
        p = q + vals
        h_ctx = h_low_R[r] + (q * np.log(q) - p * np.log(p)).sum(1)
        entropy_rate = float(st.pi @ h_ctx)
        # Stationary law of the last j tokens of a context = law of j consecutive tokens.
        block_h = [0.0] + [_entropy(st.pi.reshape(V ** (k - j), V**j).sum(0)) for j in range(1, k + 1)]
        ladder = [block_h[j + 1] - block_h[j] for j in range(k)] + [entropy_rate]
        return {
            "entropy_rate": entropy_rate,
            "unigram_entropy": ladder[0],
            "bigram_entropy": ladder[1],
            "ngram_entropies": ladder,  # H_j = H(X_t | previous j tokens), j = 0..k
            "stationary_iterations": st.iterations,
            "stationary_residual": st.residual,
        }

    # ---- sampling -------------------------------------------------------------------------------
    def log_prob(self, ctx: np.ndarray, x: np.ndarray) -> np.ndarray:
        """log p(x | ctx) under the true source; ctx are context indices in [0, V**k)."""
        V = self.config.vocab_size
        p = self.lambdas[0] * self.unigram_V[x]
        for j, t in enumerate(self.tables, start=1):
            r = t.rows(ctx % V**j)
            p = p + self.lambdas[j] * (t.prob_MxK[r] * (t.succ_MxK[r] == x[:, None])).sum(1)
        return np.log(p)

    def _step_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """What inverse-CDF stepping needs, built once per source (O(V**k * sum_j K_j), hundreds of MB for
        V=1024, order 2): successor ids [V**k, sum_j K_j] and their cumulative thresholds above lambda_0."""
        if self._tables_cache is None:
            cols, vals = self._sparse_parts()
            self._tables_cache = (cols, self.lambdas[0] + np.cumsum(vals, axis=1))
        return self._tables_cache

    def _unigram_draws(self, v_SxR: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which uniforms ``v`` take the mixture's unigram component (v < lambda_0), and the unigram token
        each of them picks: given v < lambda_0, v / lambda_0 is again uniform. Shared by both steppers."""
        lam0, cdf_u = self.lambdas[0], np.cumsum(self.unigram_V)
        is_uni = v_SxR < lam0
        uni = np.zeros(v_SxR.shape, dtype=np.int64)
        uni[is_uni] = np.searchsorted(cdf_u, v_SxR[is_uni] / lam0 * cdf_u[-1], side="right")
        # guards the measure-zero draw of exactly the top of the CDF
        return is_uni, np.minimum(uni, self.config.vocab_size - 1)

    def _advance(self, ctx_R: np.ndarray, v_SxR: np.ndarray, out_SxR: np.ndarray) -> np.ndarray:
        """Step R chains S times from contexts ``ctx_R``, one uniform ``v`` per token; writes the tokens into
        ``out_SxR`` and returns the final contexts. x ~ lambda_0 u + sparse part: v < lambda_0 takes a unigram
        token, otherwise v is located among the row's cumulative sparse masses (above lambda_0)."""
        V, C = self.config.vocab_size, self.n_contexts
        cols, thresholds = self._step_tables()
        last = cols.shape[1] - 1
        is_uni, uni = self._unigram_draws(v_SxR)
        for i in range(v_SxR.shape[0]):
            idx = np.minimum((thresholds[ctx_R] <= v_SxR[i, :, None]).sum(1), last)
            x = np.where(is_uni[i], uni[i], cols[ctx_R, idx])
            out_SxR[i] = x
            ctx_R = (ctx_R % (C // V)) * V + x
        return ctx_R

    def _alias_tables(self) -> tuple[np.ndarray, int]:
        """Walker alias tables of the sparse part of every p(x | c), built once per source, and the id width
        in bits.

        ``[V**k, K]`` uint64 words (K = sum_j K_j), one per column: the probability q of keeping the column's
        own successor in the high ``64 - 2b`` bits (fixed point; b = id bits, so 44 bits of q for V=1024)
        above the two token ids, b bits each (kept id, then its alias). One draw reads ONE word, where the
        inverse-CDF stepper (``_advance``) reads a context's K float64 thresholds and K ids; the stream's
        steps are bound by those random reads (1M contexts x 24 columns for V=1024, order 2, far past any
        cache), and ``python -m experiments.bench_stream`` measures the gain. Built by Vose's pairing of a
        column under the mean with one over it, in one sweep of each row's sorted columns, vectorised over
        contexts.
        """
        if self._alias_cache is None:
            cols, vals = self._sparse_parts()
            C, K = cols.shape
            flat = np.argsort(vals, axis=1, kind="stable") + (np.arange(C) * K)[:, None]
            cols, vals = cols.reshape(-1)[flat], vals.reshape(-1)[flat]  # each row ascending by mass
            vals *= K / vals.sum(1, keepdims=True)  # row mean 1: column j is drawn with probability 1/K
            p = vals.reshape(-1)
            q = np.ones(C * K)
            other = cols.reshape(-1).astype(np.uint64)  # a column never paired keeps its own successor
            cols = cols.reshape(-1)
            # Indices are flat (row * K + column). Columns s.. are untouched, l is the current donor. While
            # the donor holds >= 1 the untouched s is <= 1 (the remaining masses average 1) and is paired with
            # it; once the donor drops below 1 it is finished against l - 1, the largest untouched column.
            s, l = np.arange(C) * K, np.arange(C) * K + K - 1
            for _ in range(K - 1):
                spent = p[l] < 1.0
                small, large = np.where(spent, l, s), np.where(spent, l - 1, l)
                p_small = p[small]
                q[small] = p_small
                other[small] = cols[large]
                p[large] -= 1.0 - p_small
                s, l = np.where(spent, s, s + 1), np.where(spent, l - 1, l)
            # The last column left has p = 1 up to rounding, and keeps q = 1: always its own successor.
            b = max(1, (self.config.vocab_size - 1).bit_length())
            q_bits = 64 - 2 * b  # >= 16: V**order <= 2**24 contexts bounds V by 2**24
            q *= 2.0**q_bits  # in place: 24M entries for V=1024
            np.clip(q, 0.0, 2.0**q_bits - 1, out=q)
            words = q.astype(np.uint64)
            words <<= np.uint64(2 * b)
            words |= cols.astype(np.uint64) << np.uint64(b)
            words |= other
            words = words.reshape(C, K)
            self._alias_cache = (words, b)
        return self._alias_cache

    def _advance_alias(self, ctx_R: np.ndarray, v_SxR: np.ndarray, out_SxR: np.ndarray) -> np.ndarray:
        """``_advance`` through the alias tables: the same law, other tokens for the same ``v``. Given
        v >= lambda_0, w = (v - lambda_0) / (1 - lambda_0) is uniform: floor(w K) picks a column and the
        fraction left, against q, picks one of its two ids. (The corpus sampler keeps ``_advance``, so every
        prepared corpus, and every result computed on one, stays bit-identical.)"""
        V, C = self.config.vocab_size, self.n_contexts
        lam0 = self.lambdas[0]
        words_CxK, b = self._alias_tables()
        K = words_CxK.shape[1]
        words = words_CxK.reshape(-1)
        id_mask, q_shift = np.uint64((1 << b) - 1), np.uint64(2 * b)
        is_uni, uni = self._unigram_draws(v_SxR)
        wK_SxR = np.maximum(v_SxR - lam0, 0.0) / (1.0 - lam0) * K
        col_SxR = np.minimum(wK_SxR.astype(np.int64), K - 1)
        frac_SxR = ((wK_SxR - col_SxR) * 2.0 ** (64 - 2 * b)).astype(np.uint64)
        for i in range(v_SxR.shape[0]):
            w = np.take(words, ctx_R * K + col_SxR[i])
            alias = np.where(frac_SxR[i] < (w >> q_shift), w >> np.uint64(b), w) & id_mask
            x = np.where(is_uni[i], uni[i], alias.astype(np.int64))
            out_SxR[i] = x
            ctx_R = (ctx_R % (C // V)) * V + x
        return ctx_R

    def _context_digits(self, ctx_R: np.ndarray, out_kxR: np.ndarray) -> None:
        """The k tokens of each context, oldest first."""
        V, k = self.config.vocab_size, self.config.order
        for i in range(k):
            out_kxR[i] = (ctx_R // V ** (k - 1 - i)) % V

    def sample(
        self, n_tokens: int, rng: np.random.Generator, chain_length: int = 8192, progress: bool = False
    ) -> np.ndarray:
        """``n_tokens`` tokens from independent chains started in the stationary law, concatenated.

        Chains of ``chain_length`` tokens are stepped together (vectorised over chains). Each chain is an
        exact stationary sample path; only the first token of each chain after the first ignores its
        predecessor (a fraction ~1/chain_length of positions), which is why chains are long.
        Returns int32 [n_tokens].
        """
        from tqdm.auto import tqdm

        k, C = self.config.order, self.n_contexts
        if n_tokens <= 0:
            raise ValueError(f"n_tokens must be positive, got {n_tokens}")
        n_chains = max(1, math.ceil(n_tokens / chain_length))
        steps = math.ceil(n_tokens / n_chains)
        pi = self.stationary().pi
        ctx = rng.choice(C, size=n_chains, p=pi)
        out_TxC = np.empty((max(steps, k), n_chains), dtype=np.int32)  # step-major: contiguous writes
        self._context_digits(ctx, out_TxC[:k])
        block = max(1, (1 << 21) // n_chains)  # steps per block of pre-drawn randomness (bounds memory)
        bar = tqdm(total=max(steps - k, 0) * n_chains, unit="tok", unit_scale=True, desc="sampling",
                   disable=not progress)
        for s0 in range(k, steps, block):
            s1 = min(steps, s0 + block)
            ctx = self._advance(ctx, rng.random((s1 - s0, n_chains)), out_TxC[s0:s1])
            bar.update((s1 - s0) * n_chains)
        bar.close()
        return np.ascontiguousarray(out_TxC.T).reshape(-1)[:n_tokens]

    def window_uniforms(self, length: int) -> int:
        """How many uniforms ``sample_windows`` reads per window of ``length`` tokens: one for the start
        context, then one per token after it."""
        return 1 + max(length - self.config.order, 0)

    def sample_windows(self, u_RxU: np.ndarray, length: int) -> np.ndarray:
        """int32 [R, length]: one stationary sample path per row of uniforms ``u_RxU`` [R, U], U =
        ``window_uniforms(length)``, stepped together (through the alias tables, ``_advance_alias``).

        Row r reads only ``u_RxU[r]`` (its start context from the stationary law, then one uniform per
        token), so a row does not depend on which other rows are drawn with it: a host drawing its own rows
        of a global batch gets exactly those rows of the one-host batch. This is the training stream of
        ``experiments.stream``: every window is a fresh, exact sample of the source, never a repeat."""
        k, C = self.config.order, self.n_contexts
        if length < 1 or u_RxU.ndim != 2 or not len(u_RxU) or u_RxU.shape[1] != self.window_uniforms(length):
            raise ValueError(
                f"need length >= 1 and uniforms [R >= 1, {self.window_uniforms(max(length, 1))}], got length "
                f"{length} and shape {u_RxU.shape}"
            )
        if self._cdf_pi is None:
            self._cdf_pi = np.cumsum(self.stationary().pi)
        steps = u_RxU.shape[1] - 1
        ctx = np.minimum(np.searchsorted(self._cdf_pi, u_RxU[:, 0] * self._cdf_pi[-1], side="right"), C - 1)
        out_TxR = np.empty((k + steps, len(u_RxU)), dtype=np.int32)
        self._context_digits(ctx, out_TxR[:k])
        self._advance_alias(ctx, np.ascontiguousarray(u_RxU[:, 1:].T), out_TxR[k:])
        return np.ascontiguousarray(out_TxR.T[:, :length])


@functools.lru_cache(maxsize=4)
def cached_source(config: MarkovSourceConfig) -> MarkovSource:
    """One MarkovSource per config and process: building one (tables, stationary law) and the stream's alias
    tables takes ~7 s for V=1024, order 2 (``python -m experiments.bench_stream``; the alias tables alone are
    192 MB, 8 bytes per context and successor column), and a study's runs, its training stream and its
    downstream battery all ask for the same source."""
    return MarkovSource.create(config)


def describe(config: MarkovSourceConfig) -> str:
    return (
        f"sparse order-{config.order} Markov source over {config.vocab_size} tokens: mixture of a Zipf("
        f"{config.zipf_exponent}) unigram and sparse order-1..{config.order} tables "
        f"(weights {config.weights}, "
        f"successors {config.successors}, buckets {config.buckets}, Dirichlet({config.dirichlet_alpha})), "
        f"seed {config.seed}"
    )


def config_dict(config: MarkovSourceConfig) -> dict:
    return asdict(config)


def config_from_dict(d: dict) -> MarkovSourceConfig:
    """Inverse of ``config_dict`` after a JSON round-trip (lists back to tuples); extra keys such as the
    ``chain_length`` recorded next to the generator parameters in metadata.json are ignored."""
    names = {f.name for f in fields(MarkovSourceConfig)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
    return MarkovSourceConfig(**kwargs)
