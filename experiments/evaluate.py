"""Scoring a language model on downstream tasks: multiple-choice log-probabilities and generative pass rates.

Multiple choice (the usual log-likelihood protocol, e.g. Gao et al., "lm-evaluation-harness"; Brown et al.
2020): every (context + choice) sequence is scored by one forward pass; a choice's log-probability is the
sum of the model's next-token log-probabilities over its tokens. Per item we report the summed
log-probability and the token count of every choice (their ratio is the length-normalised, per-token
log-probability); per task the accuracy (correct choice has the
strictly highest summed log-probability; ``accuracy_norm`` uses the per-token one), p(correct) (softmax of the
summed log-probabilities over the choices) and the margin (correct minus best incorrect). The per-item arrays
``logprob_correct`` [I] and ``logprob_incorrect`` [I, K] are the inputs of
``scaling.downstream.item_scores`` / ``per_item_analysis`` once stacked over models (``stack_runs``).

Sequences are right-padded to one fixed length and batched with a fixed batch size, so a model is compiled
once for the whole battery. A context longer than the model's window is cut from the left.

Generative (``gen`` tasks): temperature sampling of k tokens, pass = exact match with the target. Sampling
is exact but cheap: a sample passes only if each of its tokens equals the target's, and while the sample's
prefix equals the target's prefix the model's next-token distribution is the one computed by ONE
teacher-forced forward pass over (context + target). So each token is drawn by inverse-CDF sampling from
those distributions and the sample stops at its first mismatch: the same pass/fail outcomes as full
autoregressive sampling with the same uniforms (``sample_continuations`` does that, and the tests compare),
for one forward pass per item instead of k per sample. This makes thousands of samples per item affordable:
pass@k with the unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models Trained on Code")
and PassUntil (Hu et al. 2024): sample until ``passuntil_k`` passes or a budget, estimated per item by
``scaling.downstream.passuntil_estimate`` (unbiased (k - 1) / (n - 1)). The exact pass probability of one
sample, the product of the k teacher-forced token probabilities, is reported as well ("infinite-resolution"
pass@1).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.files import read_json_object, write_text_atomic
from experiments.tasks import MCItem, Task, TaskError, default_battery, encode_items
from scaling.downstream import passuntil_estimate

DOWNSTREAM_FILE = "downstream.json"
DOWNSTREAM_SCHEMA_VERSION = 1

LogitsFn = Callable[[jax.Array], jax.Array]  # tokens_BxL int32 -> logits_BxLxV (traceable)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings (defaults keep a tiny model's battery at a few seconds on a CPU)."""

    batch_size: int = 256  # sequences per forward pass (fixed: one compilation)
    temperature: float = 1.0
    n_samples: int = 100  # samples per gen item for pass@k
    pass_ks: tuple[int, ...] = (1, 10, 100)
    passuntil_k: int = 4  # PassUntil stops at this many passes (>= 2 allows the unbiased estimator)
    passuntil_max_samples: int = 16384  # PassUntil budget per item
    seed: int = 0


# ---- the scorer ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _compiled(apply_fn: Callable[..., jax.Array]) -> tuple[Any, Any]:
    """Jitted (score, logits) for ``apply_fn(params, tokens_BxL) -> logits_BxLxV``. Memoised on the function
    and taking params as an argument, so runs with the same model shape reuse one compilation."""

    def score(params, tokens_BxL, temperature):
        # For each position t, the next token tokens[t+1] under softmax(logits_t / T): its log-prob and
        # its inverse-CDF interval [lo, hi). Multiple choice uses the log-probs at T = 1, generation the
        # intervals; one function for both keeps it to a single compilation per model and batch shape.
        logits_BxLxV = apply_fn(params, tokens_BxL).astype(jnp.float32)[:, :-1] / temperature
        logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
        nxt_BxL = tokens_BxL[:, 1:, None]
        logp = jnp.take_along_axis(logp_BxLxV, nxt_BxL, axis=-1)[..., 0]
        hi = jnp.take_along_axis(jnp.cumsum(jnp.exp(logp_BxLxV), axis=-1), nxt_BxL, axis=-1)[..., 0]
        return hi - jnp.exp(logp), hi, logp

    return jax.jit(score), jax.jit(apply_fn)


class Scorer:
    """Batched, jitted scoring of a language model.

    ``apply_fn(params, tokens_BxL) -> logits_BxLxV`` must be traceable; pass the same function object for
    every run of one model shape (``model_apply_fn`` does) to compile once. With ``params=None``,
    ``apply_fn`` is called as ``apply_fn(tokens_BxL)`` (a stub or a closure over its parameters).
    """

    def __init__(
        self,
        apply_fn: Callable[..., jax.Array],
        params: Any = None,
        *,
        max_len: int | None = None,
        batch_size: int = 256,
        vocab_size: int | None = None,
        pad_to: int | None = None,
    ):
        if params is None:
            fn = _without_params(apply_fn)
        else:
            fn = apply_fn
        # Host (numpy) parameters are copied to the device once here, not at every batch.
        params = None if params is None else jax.tree.map(jnp.asarray, params)
        self.params = params
        self.max_len = max_len
        self.pad_to = pad_to  # every batch padded to this length, whatever the items need (eval_pad_length)
        self.batch_size = batch_size
        self.vocab_size = vocab_size
        score, logits = _compiled(fn)
        self._score = lambda tokens, temperature: score(params, tokens, temperature)
        self._logits = lambda tokens: logits(params, tokens)

    def _batches(self, rows_NxL: np.ndarray):
        # Out-of-range ids would be silently clipped by the embedding lookup: refuse them instead.
        if self.vocab_size is not None and rows_NxL.size and rows_NxL.max() >= self.vocab_size:
            raise TaskError(
                f"token id {int(rows_NxL.max())} is outside the vocabulary the model was trained on "
                f"({self.vocab_size} ids): the items were made for another tokenizer or corpus"
            )
        B = self.batch_size
        for lo in range(0, len(rows_NxL), B):
            chunk = rows_NxL[lo : lo + B]
            pad = np.zeros((B, rows_NxL.shape[1]), np.int32)  # fixed batch shape: compiled once
            pad[: len(chunk)] = chunk
            yield lo, len(chunk), pad

    def choice_logprobs(self, items: list[MCItem], length: int | None = None) -> dict[str, np.ndarray]:
        """Summed log-probabilities and token counts of every choice: ``logprob`` [I, C] and ``n_tokens``
        [I, C] (NaN / 0 where an item has fewer than C choices), plus ``answer`` [I] and ``truncated`` (how
        many items had their context cut from the left, for at least one choice, to fit the window)."""
        if not items:
            raise TaskError("no items to score")
        if any(it.is_text for it in items):
            raise TaskError("text items must be encoded first (experiments.tasks.encode_items)")
        C = max(len(it.choices) for it in items)
        need = max(len(it.context) + len(c) for it in items for c in it.choices)
        L = self.pad_to or length or need
        if self.max_len is not None:
            L = min(L, self.max_len)
        rows, spans, truncated = [], [], 0
        for i, it in enumerate(items):
            truncated += len(it.context) + max(len(c) for c in it.choices) > L  # items, not (item, choice)s
            for j, ch in enumerate(it.choices):
                if len(ch) >= L:
                    raise TaskError(f"item {it.id or i}: choice {j} has {len(ch)} tokens; the window is {L}")
                if not it.context:
                    raise TaskError(f"item {it.id or i}: empty context (the first choice token needs one)")
                ctx = it.context[-(L - len(ch)) :]
                seq = np.zeros(L, np.int32)
                seq[: len(ctx) + len(ch)] = ctx + ch
                rows.append(seq)
                spans.append((i, j, len(ctx), len(ch)))
        rows_NxL = np.stack(rows)
        lp_NxLm1 = np.empty((len(rows), L - 1), np.float64)
        for lo, n, batch in self._batches(rows_NxL):
            lp_NxLm1[lo : lo + n] = np.asarray(self._score(batch, jnp.float32(1.0))[2])[:n]
        logprob = np.full((len(items), C), np.nan)
        ntok = np.zeros((len(items), C), np.int64)
        for r, (i, j, lc, lch) in enumerate(spans):
            # Choice tokens sit at positions lc .. lc+lch-1, predicted from positions lc-1 .. lc+lch-2.
            logprob[i, j] = lp_NxLm1[r, lc - 1 : lc - 1 + lch].sum()
            ntok[i, j] = lch
        answer = np.array([it.answer for it in items])
        return {"logprob": logprob, "n_tokens": ntok, "answer": answer, "truncated": truncated}

    def target_pass_bounds(
        self, contexts_NxL: np.ndarray, targets_NxK: np.ndarray, temperature: float, length: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per item and target position, the inverse-CDF interval [lo, hi) of the target token under the
        model's temperature-T next-token distribution given (context + target prefix); plus its log-prob."""
        ctx, tgt = np.asarray(contexts_NxL), np.asarray(targets_NxK)
        L0, k = ctx.shape[1], tgt.shape[1]
        L = max(self.pad_to or length or 0, L0 + k)
        if L0 < 1 or (self.max_len is not None and k >= self.max_len):
            raise TaskError(f"gen task needs a context and k < the window (k={k}, window {self.max_len})")
        if self.max_len is not None and L > self.max_len:
            L = self.max_len
            if L0 + k > L:
                ctx = ctx[:, L0 + k - L :]
                L0 = ctx.shape[1]
        rows = np.zeros((len(ctx), L), np.int32)
        rows[:, : L0 + k] = np.concatenate([ctx, tgt], 1)
        out = [np.empty((len(rows), k)) for _ in range(3)]
        for s, n, batch in self._batches(rows):
            res = self._score(batch, jnp.float32(temperature))
            for o, x in zip(out, res, strict=True):
                o[s : s + n] = np.asarray(x)[:n, L0 - 1 : L0 - 1 + k]
        return tuple(out)

    def sample_continuations(self, contexts_NxL: np.ndarray, u_NxSxK: np.ndarray, temperature: float):
        """Full autoregressive sampling (k forward passes per sample): [N, S, k] tokens, token t drawn by
        inverse CDF with uniform u[n, s, t] from softmax(logits / T). The reference for the early-exit
        sampler used by ``gen_metrics``; use it for small N * S."""
        N, S, k = u_NxSxK.shape
        L0 = contexts_NxL.shape[1]
        seq = np.zeros((N * S, L0 + k), np.int32)
        seq[:, :L0] = np.repeat(contexts_NxL, S, axis=0)
        u = u_NxSxK.reshape(N * S, k)
        for t in range(k):
            for s, n, batch in self._batches(seq):
                logits = np.asarray(self._logits(batch)[:, L0 + t - 1], np.float32)[:n]
                p = np.asarray(jax.nn.softmax(jnp.asarray(logits) / temperature, axis=-1))
                cdf = np.cumsum(p, axis=-1)
                seq[s : s + n, L0 + t] = np.minimum((cdf <= u[s : s + n, t, None]).sum(-1), p.shape[-1] - 1)
        return seq[:, L0:].reshape(N, S, k)


@functools.lru_cache(maxsize=32)
def _without_params(fn: LogitsFn) -> Callable[..., jax.Array]:
    return lambda _params, tokens_BxL: fn(tokens_BxL)


def as_variables(params_or_variables: Any) -> dict[str, Any]:
    """flax variables from either a bare parameter tree or ``{"params": ..., **model_state}``.

    Stateful models (MoE with ``moe_bias_update_rate > 0``, MoR's loss-free bias) need their non-parameter
    collections at apply time; a model's parameter tree never has a top-level "params" key, so the two forms
    cannot be confused."""
    if isinstance(params_or_variables, dict) and "params" in params_or_variables:
        return params_or_variables
    return {"params": params_or_variables}


def eval_pad_length(model_cfg: Any) -> int | None:
    """The one length every scored sequence is padded to, for a model whose outputs depend on the padded
    length itself: MoR token choice gives recursion step r floor(capacity_r * L) slots, so L -- otherwise the
    longest item of the whole battery -- would make a task's score depend on the other tasks. Its window
    (``max_seq_len``) then, for every task; None (pad to the batch's need) for every other model."""
    if model_cfg.family == "mor" and model_cfg.mor_router == "token_choice":
        return int(model_cfg.max_seq_len)
    return None


@functools.lru_cache(maxsize=32)
def model_apply_fn(model_cfg: Any) -> Callable[..., jax.Array]:
    """``apply_fn(params, tokens) -> logits`` of ``models.build_model(model_cfg)``; one function object per
    (hashable, frozen) model config, so the scorer's compilation is shared by runs of the same shape.
    ``params`` may be the parameter tree or the variables ``{"params": ..., **model_state}``
    (``as_variables``).

    The model runs in its inference mode, as models/decode.py decodes it: MoR expert choice with
    ``causal_routing=True``, MoE with the dropless dispatch. Why: the training modes pick tokens over the
    whole (padded) sequence -- expert choice's top-k per recursion, capacity dispatch's slots -- so a
    token's log-prob would depend on later tokens and on padding, i.e. on which other tasks share the batch
    (tests/test_evaluate_model_state.py::test_scoring_does_not_depend_on_padding)."""
    from models import build_model, inference_mode

    model_cfg, kw = inference_mode(model_cfg)
    model = build_model(model_cfg)
    return lambda params, tokens_BxL: model.apply(as_variables(params), tokens_BxL, **kw)[0]


# ---- metrics ---------------------------------------------------------------------------------------
def mc_metrics(logprob_IxC: np.ndarray, n_tokens_IxC: np.ndarray, answer_I: np.ndarray) -> dict[str, Any]:
    """Task metrics and per-item arrays from the choice log-probabilities (NaN = no such choice).

    accuracy: correct choice's summed log-prob strictly above every incorrect one (ties are wrong);
    accuracy_norm: the same with per-token log-probs; p_correct: mean over items of
    softmax_over_choices(summed log-probs)[correct]; margin: mean of correct minus best incorrect.
    """
    lp = np.asarray(logprob_IxC, np.float64)
    nt = np.asarray(n_tokens_IxC, np.float64)
    a = np.asarray(answer_I)
    I = len(a)
    rows = np.arange(I)
    lc = lp[rows, a]
    if not np.isfinite(lc).all():
        raise TaskError("the correct choice of every item needs a finite log-probability")
    mask = np.ones(lp.shape, bool)
    mask[rows, a] = False
    C = lp.shape[1]
    li = lp[mask].reshape(I, C - 1)  # incorrect choices in their original order; NaN pads absent ones
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = lp / nt
    best_inc = np.nanmax(li, axis=1)
    best_inc_norm = np.nanmax(norm[mask].reshape(I, C - 1), axis=1)
    lse = np.logaddexp.reduce(np.where(np.isnan(lp), -np.inf, lp), axis=1)
    p_correct = np.exp(lc - lse)
    n_choices = (~np.isnan(lp)).sum(1)
    return {
        "accuracy": float((lc > best_inc).mean()),
        "accuracy_norm": float((norm[rows, a] > best_inc_norm).mean()),
        "p_correct": float(p_correct.mean()),
        "margin": float((lc - best_inc).mean()),
        "logprob_correct_mean": float(lc.mean()),
        "chance": float((1.0 / n_choices).mean()),
        "n_items": I,
        "items": {
            "logprob_correct": lc,
            "logprob_incorrect": li,
            "n_tokens": nt,
            "logprob": lp,
            "p_correct": p_correct,
            "margin": lc - best_inc,
            "correct": (lc > best_inc).astype(np.float64),
        },
    }


def pass_at_k(n, c, k: int) -> np.ndarray:
    """Unbiased pass@k from n samples with c passes (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), computed as
    1 - prod_{i=n-c+1}^{n} (1 - k / i) for numerical stability; 1 when n - c < k."""
    n = np.asarray(n, dtype=np.int64)
    c = np.asarray(c, dtype=np.int64)
    n, c = np.broadcast_arrays(n, c)
    if (c < 0).any() or (c > n).any() or k < 1 or (n < k).any():
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n (k={k})")
    out = np.empty(n.shape, np.float64)
    for idx in np.ndindex(n.shape):
        nn, cc = int(n[idx]), int(c[idx])
        out[idx] = 1.0 if nn - cc < k else 1.0 - float(np.prod(1.0 - k / np.arange(nn - cc + 1, nn + 1)))
    return out


def passes_from_uniforms(lo_IxK: np.ndarray, hi_IxK: np.ndarray, u_IxSxK: np.ndarray) -> np.ndarray:
    """[I, S] pass outcomes of samples whose token t is drawn by inverse CDF with uniform u[i, s, t]: the
    sample passes iff every u falls in its target token's interval [lo, hi)."""
    return ((u_IxSxK >= lo_IxK[:, None]) & (u_IxSxK < hi_IxK[:, None])).all(-1)


def _pass_stream(lo_IxK, hi_IxK, n: int, rng: np.random.Generator) -> np.ndarray:
    return passes_from_uniforms(lo_IxK, hi_IxK, rng.random((lo_IxK.shape[0], n, lo_IxK.shape[1])))


def gen_metrics(lo_IxK, hi_IxK, logp_IxK, cfg: EvalConfig, stream: int = 0) -> dict[str, Any]:
    """pass@k (Chen et al.), PassUntil (Hu et al.) and the exact pass probability from the target bounds.

    The uniforms depend on (cfg.seed, stream, item) only, so every run sees the same ones (common random
    numbers: differences between models are not blurred by sampling noise); ``stream`` separates tasks.
    PassUntil draws each item's samples from a generator of its own: with one shared generator, which
    uniforms an item got after the first chunk depended on how many other items were still sampling, i.e.
    on the model, exactly for the rare passes PassUntil is for.
    """
    I = lo_IxK.shape[0]
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, stream, 0x9A55]))
    passes = _pass_stream(lo_IxK, hi_IxK, cfg.n_samples, rng)
    c = passes.sum(1)
    out: dict[str, Any] = {
        "temperature": cfg.temperature,
        "n_samples": cfg.n_samples,
        "pass_prob_exact": float(np.exp(logp_IxK.sum(1)).mean()),
    }
    for k in cfg.pass_ks:
        if k <= cfg.n_samples:
            out[f"pass@{k}"] = float(pass_at_k(cfg.n_samples, c, k).mean())
    # PassUntil: draw in chunks until every item has passuntil_k passes or the budget is spent; trials = the
    # index of the k-th pass (exactly what sequential sampling-until-k would have used).
    K, budget = cfg.passuntil_k, cfg.passuntil_max_samples
    successes = np.zeros(I, np.int64)
    trials = np.full(I, budget, np.int64)
    drawn, chunk = 0, 1024
    todo = np.arange(I)
    item_rngs = [np.random.default_rng([cfg.seed, stream, 0x9A56, i]) for i in range(I)]
    while todo.size and drawn < budget:
        m = min(chunk, budget - drawn)
        u = np.stack([item_rngs[i].random((m, lo_IxK.shape[1])) for i in todo])
        st = passes_from_uniforms(lo_IxK[todo], hi_IxK[todo], u)
        cum = successes[todo, None] + np.cumsum(st, 1)
        hit = cum[:, -1] >= K
        first = np.argmax(cum >= K, axis=1)
        trials[todo[hit]] = drawn + first[hit] + 1
        successes[todo] = np.where(hit, K, cum[:, -1])
        todo = todo[~hit]
        drawn += m
    pr = passuntil_estimate(successes, trials, k=K, unbiased=K >= 2)
    out["passuntil"] = {
        "k": K,
        "max_samples": budget,
        "mean_rate": float(pr.estimate.mean()),
        "n_censored": int((successes < K).sum()),
    }
    out["items"] = {
        "n_pass": c,
        "successes": successes,
        "trials": trials,
        "pass_rate": pr.estimate,
        "pass_prob": np.exp(logp_IxK.sum(1)),
        "logprob_target": logp_IxK.sum(1),
    }
    return out


# ---- tasks -> results ------------------------------------------------------------------------------
def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)  # JSON has no NaN: NaN pads become null
    if isinstance(x, np.integer):
        return int(x)
    return x


@dataclass(frozen=True)
class Corpus:
    """What a run was trained on, as the evaluator needs it: the vocabulary its data used (token ids at or
    above it never occurred in training) and the tokenizer for text items (None: the corpus is synthetic,
    so there is no text to encode)."""

    vocab_size: int
    tokenizer: Any | None


def corpus_of(cfg: Any) -> Corpus:
    """The corpus of a run: the synthetic source, or the prepared dataset ``data.path`` read from its
    ``metadata.json``. A relative ``data.path`` is relative to the directory the run was trained from; a
    dataset that cannot be found there is an error (``evaluate_params`` then scores token-id items against the
    model's vocabulary and refuses text), never a silent fallback to the byte tokenizer: text would be encoded
    with the wrong tokenizer and scored without complaint."""
    from experiments.data import DataError, TokenDataset
    from experiments.tokenizers import BPETokenizer, ByteTokenizer

    if cfg.data.path == "synthetic":
        return Corpus(int(cfg.data.synthetic.vocab_size), None)
    try:
        ds = TokenDataset.open(cfg.data.path, verify_tokens=False)
    except DataError as e:
        raise TaskError(
            f"cannot read the run's dataset data.path={cfg.data.path!r} from {Path.cwd()} ({e}); a relative "
            "data.path is relative to the directory the run was trained from: evaluate from there"
        ) from e
    tokenizer = ds.metadata.get("tokenizer")
    kind = tokenizer.get("type") if isinstance(tokenizer, dict) else None
    if kind == "bpe":
        tok = BPETokenizer.from_file(ds.directory / "tokenizer.json")
    elif kind == "byte":
        tok = ByteTokenizer()
    else:  # synthetic, or tokenised elsewhere and not recorded: token ids only (text items are refused)
        tok = None
    return Corpus(ds.vocab_size, tok)


def evaluate_tasks(
    scorer: Scorer, tasks: list[Task], cfg: EvalConfig | None = None, *, tokenizer: Any | None = None
) -> dict[str, Any]:
    """Score every task; returns {task name: metrics dict with an "items" sub-dict of per-item arrays}.
    Text items are encoded with ``tokenizer`` (default: bytes)."""
    cfg = cfg or EvalConfig()
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise TaskError(f"task names must be unique, got {names}")
    encoded = {t.name: encode_items(t.items, tokenizer) for t in tasks}
    # One padded length for every task, so the model compiles once (a scorer's pad_to overrides it).
    lengths = [len(it.context) + len(c) for t in tasks for it in encoded[t.name] for c in it.choices]
    lengths += [t.contexts.shape[1] + t.targets.shape[1] for t in tasks if t.spec.kind == "gen"]
    length = max(lengths, default=None)
    out: dict[str, Any] = {}
    for t in tasks:
        if t.spec.kind == "mc":
            items = encoded[t.name]
            r = scorer.choice_logprobs(items, length)
            m = mc_metrics(r["logprob"], r["n_tokens"], r["answer"])
            m["items"]["id"] = [it.id for it in items]
            m["truncated_contexts"] = r["truncated"]
        else:
            lo, hi, lp = scorer.target_pass_bounds(t.contexts, t.targets, cfg.temperature, length)
            m = gen_metrics(lo, hi, lp, cfg, stream=zlib.crc32(t.name.encode()))
        out[t.name] = {**t.info, **m}
    return out


def summarize(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-task scalars of ``evaluate_tasks`` output (drops the per-item arrays)."""
    return {name: {k: v for k, v in r.items() if k != "items"} for name, r in results.items()}


def stack_runs(results: list[dict[str, Any]], task: str) -> dict[str, np.ndarray]:
    """Stack one mc task over runs (same battery seed): ``logprob_correct_MxI`` and
    ``logprob_incorrect_MxIxK`` for ``scaling.downstream.per_item_analysis``, plus ``accuracy_M``.
    ``results`` are evaluate_tasks outputs or downstream.json dicts (their "tasks" entry)."""
    rs = [r.get("tasks", r)[task] for r in results]
    ids = [r["items"].get("id") for r in rs]
    if any(i != ids[0] for i in ids):
        raise ValueError(f"task {task!r} has different items across runs (different battery seeds?)")
    lc = np.array([np.asarray(r["items"]["logprob_correct"], np.float64) for r in rs])
    li = np.array([np.asarray(r["items"]["logprob_incorrect"], np.float64) for r in rs])
    return {
        "logprob_correct_MxI": lc,
        "logprob_incorrect_MxIxK": li,
        "accuracy_M": np.array([r["accuracy"] for r in rs]),
    }


# ---- runs --------------------------------------------------------------------------------------------
def load_params(workdir: str | Path, step: int | None = None) -> tuple[Any, Any, int]:
    """(ExperimentConfig, params on one device, checkpoint step) of a trainer work directory. Stateful models
    (router biases) also need their model state to be applied: use ``load_variables``."""
    cfg, variables, step = load_variables(workdir, step)
    return cfg, variables["params"], step


def load_variables(workdir: str | Path, step: int | None = None) -> tuple[Any, dict[str, Any], int]:
    """(ExperimentConfig, variables on one device, checkpoint step) of a trainer work directory: variables
    is ``{"params": ..., **model_state}`` -- the non-parameter collections the trainer checkpoints as
    ``model_state`` (MoE's "moe_state", MoR's "mor_state" router biases) are restored too."""
    import flax.linen as nn

    import optim
    from experiments.checkpoint import Checkpointer, abstract_like
    from experiments.config import ExperimentConfig
    from experiments.run_record import CHECKPOINT_DIR, CONFIG_FILE
    from models import build_model

    workdir = Path(workdir)
    cfg_path = workdir / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: is {workdir} a training work directory?")
    cfg = ExperimentConfig.from_dict(json.loads(cfg_path.read_text()))
    model = build_model(cfg.model)
    dummy = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
    abstract_vars = jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy)
    boxed = abstract_vars["params"]
    abstract_params = nn.meta.unbox(boxed)
    tx, _ = optim.build_optimizer(
        cfg.optimizer, abstract_params, nn.get_partition_spec(boxed), cfg.total_steps
    )
    abstract = {"params": abstract_params, "opt_state": jax.eval_shape(tx.init, abstract_params)}
    abstract_mstate = nn.meta.unbox({k: v for k, v in abstract_vars.items() if k != "params"})
    if abstract_mstate:  # the trainer's state layout: "model_state" only for stateful models
        abstract["model_state"] = abstract_mstate
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = abstract_like(abstract, jax.tree.map(lambda _: dev, abstract))
    ckpt = Checkpointer(workdir / CHECKPOINT_DIR, keep=cfg.trainer.keep_checkpoints, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir / CHECKPOINT_DIR}")
        kept = sorted(ckpt.all_steps())
        if step not in kept:
            raise FileNotFoundError(
                f"no checkpoint at step {step} in {workdir / CHECKPOINT_DIR}; kept steps: {kept} "
                f"(trainer.keep_checkpoints={cfg.trainer.keep_checkpoints})"
            )
        state, _ = ckpt.restore(step, abstract)
    finally:
        ckpt.close()
    return cfg, {"params": state["params"], **state.get("model_state", {})}, int(step)


@functools.lru_cache(maxsize=8)
def _cached_battery(source_key: Any, seed: int, names: tuple[str, ...] | None) -> list[Task]:
    return default_battery(source_key, seed, names=names)


def battery_for(cfg: Any, seed: int = 0, names=None) -> list[Task]:
    """The default battery of a run's corpus: its synthetic source, or a prepared synthetic dataset
    directory (``data.path``). Memoised per process: every run of a study shares one battery."""
    d = cfg.data
    key = d.synthetic if d.path == "synthetic" else str(Path(d.path).absolute())
    return _cached_battery(key, seed, None if names is None else tuple(names))


def evaluate_params(cfg: Any, params: Any, tasks: list[Task], eval_cfg: EvalConfig | None = None):
    """Evaluate ``params`` (the parameter tree, or variables ``{"params": ..., **model_state}`` for stateful
    models) of an ExperimentConfig's model on ``tasks``."""
    text = [t.name for t in tasks if t.spec.kind == "mc" and any(it.is_text for it in t.items)]
    try:
        corpus = corpus_of(cfg)
    except TaskError:
        if text:
            raise
        # token ids need no tokenizer: without the dataset, the model's own vocabulary bounds them
        corpus = Corpus(int(cfg.model.vocab_size), None)
    if corpus.tokenizer is None and text:
        raise TaskError(
            f"task(s) {text} have text items, but this run's corpus has no text tokenizer (a synthetic "
            "corpus, or a dataset whose metadata.json names none): give its items as token ids, or score "
            "them on a run trained on text (python -m experiments.data prepare)"
        )
    scorer = Scorer(
        model_apply_fn(cfg.model),
        params,
        max_len=cfg.model.max_seq_len,
        batch_size=(eval_cfg or EvalConfig()).batch_size,
        vocab_size=corpus.vocab_size,  # ids the model's embedding has but the corpus never used are refused
        pad_to=eval_pad_length(cfg.model),
    )
    return evaluate_tasks(scorer, tasks, eval_cfg, tokenizer=corpus.tokenizer)


def evaluate_and_write(
    cfg: Any,
    params: Any,
    workdir: str | Path | None,
    step: int,
    *,
    tasks: list[Task] | None = None,
    names: list[str] | tuple[str, ...] | None = None,
    eval_cfg: EvalConfig | None = None,
    battery_seed: int = 0,
    filename: str = DOWNSTREAM_FILE,
) -> dict[str, Any]:
    """Evaluate ``params`` on the battery (or ``tasks``) and write ``workdir/filename`` (if workdir)."""
    t0 = time.perf_counter()
    tasks = tasks if tasks is not None else battery_for(cfg, battery_seed, names)
    eval_cfg = eval_cfg or EvalConfig()
    res = evaluate_params(cfg, params, tasks, eval_cfg)
    out = _jsonable(
        {
            "schema_version": DOWNSTREAM_SCHEMA_VERSION,
            "step": int(step),
            "battery_seed": battery_seed,
            "eval_config": dataclasses.asdict(eval_cfg),
            "eval_seconds": time.perf_counter() - t0,
            "tasks": res,
        }
    )
    if workdir is not None:
        path = Path(workdir) / filename
        out["tasks"] = {**_kept_tasks(path, out), **out["tasks"]}
        write_text_atomic(path, json.dumps(out) + "\n")
    return out


def _kept_tasks(path: Path, new: dict[str, Any]) -> dict[str, Any]:
    """Tasks of an existing ``path`` that ``new`` does not evaluate again, when both score the same step
    with the same battery seed and evaluation settings: evaluating a JSONL benchmark on a run adds it to
    the battery's results instead of replacing them (the study's report reads the battery from this file)."""
    old = read_json_object(path) or {}
    same = all(old.get(k) == new[k] for k in ("schema_version", "step", "battery_seed", "eval_config"))
    if not same or not isinstance(old.get("tasks"), dict):
        return {}
    return {k: v for k, v in old["tasks"].items() if k not in new["tasks"]}


def evaluate_run(
    workdir: str | Path,
    *,
    tasks: list[Task] | None = None,
    names: list[str] | tuple[str, ...] | None = None,
    step: int | None = None,
    eval_cfg: EvalConfig | None = None,
    battery_seed: int = 0,
    write: bool = True,
) -> dict[str, Any]:
    """Evaluate a trained run's checkpoint (the newest by default) on the battery and write
    ``<workdir>/downstream.json`` (``downstream_step<N>.json`` for an explicit intermediate ``step``).

    Returns the written dict: {"schema_version", "step", "battery_seed", "eval_config", "eval_seconds",
    "tasks": {name: task info + metrics, with per-item lists under "items"}}.
    """
    t0 = time.perf_counter()
    cfg, variables, ckpt_step = load_variables(workdir, step)  # params + model state (router biases)
    name = DOWNSTREAM_FILE if step is None else f"downstream_step{ckpt_step}.json"
    out = evaluate_and_write(
        cfg,
        variables,
        workdir if write else None,
        ckpt_step,
        tasks=tasks,
        names=names,
        eval_cfg=eval_cfg,
        battery_seed=battery_seed,
        filename=name,
    )
    out["eval_seconds"] = time.perf_counter() - t0  # including the checkpoint restore
    return out


def read_downstream(workdir: str | Path, filename: str = DOWNSTREAM_FILE) -> dict[str, Any]:
    path = Path(workdir) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (run experiments.evaluate.evaluate_run first)")
    d = json.loads(path.read_text())
    if d.get("schema_version") != DOWNSTREAM_SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {d.get('schema_version')} != {DOWNSTREAM_SCHEMA_VERSION}")
    return d


def post_run(cfg: Any, run_dir: str | Path) -> None:
    """Executor hook (``post_run="experiments.evaluate:post_run"``): evaluate a finished run unless its
    downstream.json is already there for the final step."""
    path = Path(run_dir) / DOWNSTREAM_FILE
    if path.is_file():
        try:
            if read_downstream(run_dir)["step"] == cfg.total_steps:
                return
        except (ValueError, KeyError, json.JSONDecodeError):
            pass  # unreadable or stale: evaluate again
    evaluate_run(run_dir)


# ---- CLI -----------------------------------------------------------------------------------------------
def format_table(results: dict[str, Any]) -> str:
    """One line per task: accuracy vs ceiling for mc, pass rates for gen."""
    lines = [
        f"{'task':<18} {'acc':>6} {'p_corr':>7} {'margin':>7} {'ceiling':>7}   gen: pass@1 / exact / source"
    ]
    for name, r in summarize(results).items():
        if r.get("kind") == "gen":
            lines.append(
                f"{name:<18} {'':>31}   {r['pass@1']:.4f} / {r['pass_prob_exact']:.2e} / "
                f"{r.get('source_pass_prob', float('nan')):.2e}"
            )
        else:
            ceil = r.get("ceiling_accuracy")
            lines.append(
                f"{name:<18} {r['accuracy']:>6.3f} {r['p_correct']:>7.3f} {r['margin']:>7.2f} "
                f"{'' if ceil is None else f'{ceil:.3f}':>7}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m experiments.evaluate",
        description="Evaluate a trained run on the downstream battery and/or multiple-choice JSONL files; "
        "writes WORKDIR/downstream.json (downstream_step<N>.json with --step).",
    )
    p.add_argument("workdir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--tasks", default=None, help="comma-separated built-in task names (default: all)")
    p.add_argument("--jsonl", nargs="*", default=[], help="multiple-choice JSONL files to score as well")
    p.add_argument("--no-battery", action="store_true", help="only the --jsonl files")
    p.add_argument("--battery-seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        out, n_tasks = _evaluate_cli(args, p)
    except (FileNotFoundError, TaskError, ValueError) as e:  # a bad file, item, step or task name: named
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(out["tasks"]))
    written = DOWNSTREAM_FILE if args.step is None else f"downstream_step{out['step']}.json"
    print(f"{n_tasks} tasks in {out['eval_seconds']:.1f}s -> {Path(args.workdir) / written}")
    return 0


def _evaluate_cli(args: Any, p: Any) -> tuple[dict[str, Any], int]:
    from experiments.tasks import jsonl_task

    names = args.tasks.split(",") if args.tasks else None
    tasks: list[Task] = []
    if not args.no_battery:
        from experiments.config import ExperimentConfig
        from experiments.run_record import CONFIG_FILE

        cfg_path = Path(args.workdir) / CONFIG_FILE
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path} not found: is {args.workdir} a training work directory?")
        cfg = ExperimentConfig.from_dict(json.loads(cfg_path.read_text()))
        tasks += battery_for(cfg, args.battery_seed, names)
    tasks += [jsonl_task(f) for f in args.jsonl]
    if not tasks:
        p.error("nothing to evaluate: give --jsonl files or drop --no-battery")
    return evaluate_run(args.workdir, tasks=tasks, step=args.step, battery_seed=args.battery_seed), len(tasks)


if __name__ == "__main__":
    raise SystemExit(main())
