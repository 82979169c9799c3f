"""Downstream tasks: the multiple-choice JSONL format and a battery generated from the synthetic source.

Multiple-choice items (one JSON object per line)::

    {"id": "q17", "context": [12, 7, 3] | "The capital of France is",
     "choices": [[40, 2], [9]] | [" Paris", " Rome"], "answer": 0, "meta": {...}}

``context`` and ``choices`` are token ids or text (text is encoded by ``encode_items`` with the tokenizer
of the run's dataset, ``experiments.evaluate.corpus_of``); ``answer`` indexes ``choices``; ``id`` and
``meta`` are optional. Users convert real benchmarks to this format and score them with
``experiments.evaluate``.

Built-in battery (``default_battery``): tasks generated from the corpus's exact source
(``experiments.synthetic.MarkovSource``), so their difficulty is graded and their ceiling known.

- ``mc-k{k}-{distractor}``: a context of ``context_len`` tokens sampled from the stationary chain and its
  true next ``k`` tokens (sampled from the source); the model must pick the true continuation among
  ``n_choices`` options. Distractors (drawn without replacement, never equal to the truth):

  * ``unigram`` (easy): ``k`` i.i.d. tokens from the stationary unigram, ignoring the chain;
  * ``perturb`` (hard): the true continuation with one random position replaced by a unigram token, so the
    model must know the chain's conditional at that position (and its effect on the following tokens).

  Any model that knows which tokens follow which rejects ``unigram`` distractors, the more easily the longer
  ``k`` (more evidence). A ``perturb`` distractor differs from the truth in one position, so only a model
  that knows the chain's conditional there (and how it changes the next tokens' probabilities) rejects it.
  In four ``tiny``-preset runs (50 to 600 steps, eval loss 3.23 -> 2.29) ``mc-k8-unigram`` rose early
  (accuracy 0.51 -> 0.95) while ``mc-k8-perturb`` started at chance and rose late (0.24 -> 0.78).
- ``gen-k{k}``: generate ``k`` tokens after the context; a sample passes iff it equals the source's most
  likely ``k``-token continuation (the mode, exact by Viterbi over the source's contexts). Success needs
  every one of the ``k`` tokens right, so the pass rate behaves like a product of ``k`` per-token
  probabilities: the sharp, emergent-looking curves of Schaeffer et al. (2023, "Are Emergent Abilities of
  Large Language Models a Mirage?"), which PassUntil (Hu et al. 2024) resolves.

Each task records two ceilings computed from the exact source:

- ``ceiling_accuracy``: the accuracy of the evaluator's own rule (highest summed log-probability) when the
  model IS the source; what a perfectly trained model reaches, hence the ceiling to plot for trained models.
  Below 1 because the truth is a sample, not always the most likely option.
- ``bayes_accuracy``: the accuracy of the Bayes-optimal decision, which also uses how distractors were made
  (posterior over which choice is true; expected accuracy = mean of the maximal posterior). It upper-bounds
  every rule. For ``perturb`` with k >= 2 it is close to 1 because the truth is the one option every
  distractor differs from in a single position, a structural cue that likelihood scoring does not use.

For ``gen`` tasks: ``source_pass_prob`` is the mean probability that a temperature-1 sample from the source
itself passes (the model's pass@1 at temperature 1 tends to it as the loss reaches the entropy rate).
"""

from __future__ import annotations

import functools
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from experiments.synthetic import MarkovSource, MarkovSourceConfig, cached_source, config_from_dict
from experiments.tokenizers import ByteTokenizer

TASKS_FORMAT_VERSION = 1
Distractor = Literal["unigram", "perturb"]
DISTRACTORS = ("unigram", "perturb")


class TaskError(ValueError):
    """Malformed task item or task specification; the message names the item and the field."""


# ---- the multiple-choice item format ---------------------------------------------------------------
@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item. ``context``/``choices`` are token-id tuples or strings (see module doc)."""

    context: tuple[int, ...] | str
    choices: tuple[tuple[int, ...] | str, ...]
    answer: int
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def is_text(self) -> bool:
        return isinstance(self.context, str)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.id is not None:
            d["id"] = self.id
        d["context"] = self.context if self.is_text else list(self.context)
        d["choices"] = [c if isinstance(c, str) else list(c) for c in self.choices]
        d["answer"] = self.answer
        if self.meta:
            d["meta"] = self.meta
        return d


def _tokens(v: Any, where: str, *, allow_empty: bool) -> tuple[int, ...] | str:
    if isinstance(v, str):
        if not v and not allow_empty:
            raise TaskError(f"{where} is an empty string")
        return v
    if not isinstance(v, (list, tuple)):
        raise TaskError(f"{where} must be a string or a list of token ids, got {type(v).__name__}")
    if not v and not allow_empty:
        raise TaskError(f"{where} is an empty list")
    bad = [x for x in v if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 0]
    if bad:
        raise TaskError(f"{where} must hold non-negative integer token ids, found {bad[:5]}")
    return tuple(int(x) for x in v)


def parse_item(d: Any, where: str = "item") -> MCItem:
    """Validate one JSON object as a multiple-choice item; raise TaskError naming the problem."""
    if not isinstance(d, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(d).__name__}")
    missing = [k for k in ("context", "choices", "answer") if k not in d]
    if missing:
        raise TaskError(f"{where}: missing required field(s) {missing} (need context, choices, answer)")
    unknown = sorted(set(d) - {"id", "context", "choices", "answer", "meta"})
    if unknown:
        raise TaskError(f"{where}: unknown field(s) {unknown}; allowed: id, context, choices, answer, meta")
    # An empty context is allowed for text (encode_items prepends the end-of-text token), not for ids: the
    # first choice token needs a preceding token to be predicted from.
    context = _tokens(d["context"], f"{where}.context", allow_empty=isinstance(d["context"], str))
    if not isinstance(d["choices"], (list, tuple)) or len(d["choices"]) == 0:
        raise TaskError(f"{where}.choices must be a non-empty list of choices")
    if len(d["choices"]) < 2:
        raise TaskError(f"{where}.choices has {len(d['choices'])} choice; need at least 2")
    choices = tuple(
        _tokens(c, f"{where}.choices[{i}]", allow_empty=False) for i, c in enumerate(d["choices"])
    )
    kinds = {isinstance(x, str) for x in (context, *choices)}
    if len(kinds) > 1:
        raise TaskError(f"{where}: context and choices must all be text or all be token ids, not a mix")
    same = [(i, j) for j in range(len(choices)) for i in range(j) if choices[i] == choices[j]]
    if same:  # a tie is scored as wrong, so the item could never count as right
        raise TaskError(f"{where}: choices {same[0][0]} and {same[0][1]} are identical")
    a = d["answer"]
    if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
        raise TaskError(f"{where}.answer must be an integer index into choices, got {a!r}")
    if not 0 <= a < len(choices):
        raise TaskError(f"{where}.answer={a} is out of range for {len(choices)} choices")
    item_id = d.get("id")
    if item_id is not None and not isinstance(item_id, (str, int)):
        raise TaskError(f"{where}.id must be a string or an integer, got {item_id!r}")
    meta = d.get("meta", {})
    if not isinstance(meta, dict):
        raise TaskError(f"{where}.meta must be an object, got {type(meta).__name__}")
    return MCItem(context, choices, int(a), None if item_id is None else str(item_id), meta)


def write_jsonl(path: str | os.PathLike, items: list[MCItem]) -> None:
    with open(path, "w") as f:
        for it in items:
            f.write(json.dumps(it.to_dict()) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[MCItem]:
    """Read and validate a multiple-choice JSONL file (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    from scaling.io import iter_jsonl  # here, not at the top: importing scaling loads jax

    lines = iter_jsonl(path, error=TaskError, invalid="not valid JSON ({e})")
    items, seen = [], {}
    for n, d in lines:
        it = parse_item(d, f"{path}:{n}")
        if it.id is not None:
            if it.id in seen:  # per-item results are keyed by id (stack_runs, per_item_analysis)
                raise TaskError(f"{path}:{n}: id {it.id!r} was already used on line {seen[it.id]}")
            seen[it.id] = n
        items.append(it)
    if not items:
        raise TaskError(f"{path} holds no items")
    return items


def encode_items(
    items: list[MCItem], tokenizer: Any | None = None, *, prepend_eos: bool = True
) -> list[MCItem]:
    """Token-id version of text items (id items pass through unchanged).

    ``tokenizer`` defaults to the byte tokenizer. ``prepend_eos`` puts the end-of-text token before the
    context: the training data separates documents with it, so it is what a model saw before a document
    start, and it gives the first choice token a predecessor when the context is empty. Note that the
    choices are encoded on their own, so a leading space belongs in the choice text (" Paris").
    """
    tok = tokenizer or ByteTokenizer()
    out = []
    for it in items:
        if not it.is_text:
            out.append(it)
            continue
        ctx = [int(x) for x in tok.encode(it.context)]
        if prepend_eos:
            ctx = [int(tok.eos_id)] + ctx
        if not ctx:
            raise TaskError(f"item {it.id}: empty context after encoding; use prepend_eos=True")
        choices = tuple(tuple(int(x) for x in tok.encode(c)) for c in it.choices)
        out.append(MCItem(tuple(ctx), choices, it.answer, it.id, it.meta))
    return out


# ---- task specs and the synthetic battery ---------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    """A built-in task. ``kind`` "mc" (multiple choice) or "gen" (generate k tokens, exact match)."""

    kind: Literal["mc", "gen"] = "mc"
    k: int = 1
    distractor: Distractor = "unigram"  # mc only
    n_choices: int = 4  # mc only
    n_items: int = 200
    context_len: int = 16

    @property
    def name(self) -> str:
        return f"mc-k{self.k}-{self.distractor}" if self.kind == "mc" else f"gen-k{self.k}"

    def validate(self, vocab_size: int, order: int) -> None:
        if self.kind not in ("mc", "gen"):
            raise TaskError(f"task kind must be 'mc' or 'gen', got {self.kind!r}")
        if self.k < 1 or self.n_items < 1:
            raise TaskError(f"{self.name}: k and n_items must be >= 1 (k={self.k}, n_items={self.n_items})")
        if self.context_len < order:
            raise TaskError(
                f"{self.name}: context_len={self.context_len} is shorter than the source order {order}"
            )
        if self.kind == "mc":
            if self.distractor not in DISTRACTORS:
                raise TaskError(
                    f"{self.name}: distractor must be one of {DISTRACTORS}, got {self.distractor!r}"
                )
            if self.n_choices < 2:
                raise TaskError(f"{self.name}: n_choices must be >= 2, got {self.n_choices}")
            room = vocab_size**self.k - 1 if self.distractor == "unigram" else self.k * (vocab_size - 1)
            if self.n_choices - 1 > room:
                raise TaskError(
                    f"{self.name}: only {room} possible distractors for {self.n_choices - 1} slots"
                )


@dataclass
class Task:
    """A generated task: items plus what is known exactly about it.

    mc: ``items`` (token ids), ``info`` with chance, ceiling_accuracy, bayes_accuracy.
    gen: ``contexts`` [I, context_len] and ``targets`` [I, k] (the source's mode), ``info`` with
    source_pass_prob; ``items`` is empty.
    """

    spec: TaskSpec
    items: list[MCItem]
    info: dict[str, Any]
    contexts: np.ndarray | None = None
    targets: np.ndarray | None = None
    label: str | None = None  # name of a user task (JSONL); built-in tasks are named by their spec

    @property
    def name(self) -> str:
        return self.label or self.spec.name


def _rng(seed: int, spec: TaskSpec) -> np.random.Generator:
    # Seeded by the task's full spec (CRC32 is stable across processes, unlike hash()), so adding a task to a
    # battery leaves the others' items unchanged.
    key = zlib.crc32(repr(spec).encode())
    return np.random.default_rng(np.random.SeedSequence([seed, key, 0x7A5C]))


def _ctx_index(tokens_NxL: np.ndarray, V: int, order: int) -> np.ndarray:
    """Source context index of the last ``order`` tokens (oldest token most significant, as in sample())."""
    c = np.zeros(len(tokens_NxL), dtype=np.int64)
    for t in tokens_NxL[:, -order:].T:
        c = c * V + t
    return c


def continuation_logprob(src: MarkovSource, context_NxL: np.ndarray, cont_NxK: np.ndarray) -> np.ndarray:
    """Exact log p_source(cont | context) per row (float64 [N])."""
    V, order = src.config.vocab_size, src.config.order
    c = _ctx_index(np.asarray(context_NxL), V, order)
    R = V ** (order - 1)
    lp = np.zeros(len(c))
    for x in np.asarray(cont_NxK, dtype=np.int64).T:
        lp += src.log_prob(c, x)
        c = (c % R) * V + x
    return lp


def resolve_source(source_or_dataset: Any) -> MarkovSource:
    """A MarkovSource from a MarkovSource, MarkovSourceConfig, TokenDataset or dataset directory."""
    s = source_or_dataset
    if isinstance(s, MarkovSource):
        return s
    if isinstance(s, MarkovSourceConfig):
        return cached_source(s)
    meta = getattr(s, "metadata", None)
    if meta is None and isinstance(s, (str, os.PathLike)):
        path = Path(s) / "metadata.json"
        if not path.is_file():
            raise TaskError(f"{s} is not a dataset directory (no metadata.json)")
        meta = json.loads(path.read_text())
    if meta is None:
        raise TaskError(f"cannot get a synthetic source from {type(s).__name__}")
    if "generator" not in meta:
        raise TaskError(
            "the dataset is not synthetic (metadata has no 'generator'); the built-in battery "
            "needs the exact source -- use JSONL multiple-choice items instead"
        )
    return cached_source(config_from_dict(meta["generator"]))


def _contexts(src: MarkovSource, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    # Independent chains started in the stationary law: row i is a stationary sample path of `length` tokens.
    return src.sample(n * length, rng, chain_length=length).reshape(n, length).astype(np.int64)


def _successive_logprob(logw_D: np.ndarray, logw_total: float = 0.0) -> float:
    """log-probability of drawing the listed items in this order, without replacement, with weights w
    (Plackett-Luce; ``logw_total`` is log of the total weight of the population)."""
    w = np.exp(logw_D)
    remaining = math.exp(logw_total) - np.concatenate([[0.0], np.cumsum(w)[:-1]])
    if (remaining <= 0).any():
        return -math.inf
    return float((logw_D - np.log(remaining)).sum())


def _distractor_logprob(truth: np.ndarray, others: np.ndarray, log_u: np.ndarray, distractor: str) -> float:
    """log P(distractors = others, in this order | true continuation = truth) under the generator."""
    k = len(truth)
    if distractor == "unigram":
        if (others == truth).all(1).any():
            return -math.inf
        logw = log_u[others].sum(1)
        # Population: all V^k sequences except the truth; total weight 1 - u(truth).
        return _successive_logprob(logw, math.log1p(-math.exp(log_u[truth].sum())))
    diff = others != truth
    if not (diff.sum(1) == 1).all():
        return -math.inf
    j = diff.argmax(1)
    y = others[np.arange(len(others)), j]
    # w(j, y) = u(y) / (k (1 - u(truth_j))): uniform position, unigram token restricted to != truth_j.
    logw = log_u[y] - math.log(k) - np.log1p(-np.exp(log_u[truth[j]]))
    return _successive_logprob(logw)


def _draw_distractors(truth: np.ndarray, m: int, u: np.ndarray, distractor: str, rng) -> np.ndarray:
    k, V = len(truth), len(u)
    if distractor == "unigram":
        out: list[np.ndarray] = []
        while len(out) < m:  # rejection = successive sampling without replacement from u^k minus the truth
            d = rng.choice(V, size=k, p=u)
            if (d == truth).all() or any((d == o).all() for o in out):
                continue
            out.append(d)
        return np.stack(out)
    # Gumbel-top-m over the k*V neighbours = successive sampling without replacement (Plackett-Luce).
    w_KxV = u[None, :] / (k * (1 - u[truth]))[:, None]
    w_KxV[np.arange(k), truth] = 0.0
    with np.errstate(divide="ignore"):
        keys = np.log(w_KxV).ravel() + rng.gumbel(size=k * V)
    top = np.argsort(-keys, kind="stable")[:m]
    out_arr = np.tile(truth, (m, 1))
    out_arr[np.arange(m), top // V] = top % V
    return out_arr


def make_mc_task(src: MarkovSource, spec: TaskSpec, seed: int = 0) -> Task:
    V, order = src.config.vocab_size, src.config.order
    spec.validate(V, order)
    rng = _rng(seed, spec)
    L, k, n = spec.context_len, spec.k, spec.n_choices
    seq = _contexts(src, spec.n_items, L + k, rng)
    ctx, truth = seq[:, :L], seq[:, L:]
    u = src.unigram_V
    log_u = np.log(u)
    N = spec.n_items
    choices_NxCxK = np.empty((N, n, k), dtype=np.int64)
    answer = np.empty(N, dtype=np.int64)
    for i in range(N):
        d = _draw_distractors(truth[i], n - 1, u, spec.distractor, rng)
        answer[i] = rng.integers(n)
        choices_NxCxK[i] = np.insert(d, answer[i], truth[i], axis=0)  # distractors keep their draw order
    lp_NxC = continuation_logprob(src, np.repeat(ctx, n, 0), choices_NxCxK.reshape(N * n, k)).reshape(N, n)
    # Posterior over which choice is the truth: p(truth = c_j | ctx) * P(other choices | truth = c_j).
    log_post = lp_NxC + np.array(
        [
            [_distractor_logprob(ch[j], np.delete(ch, j, axis=0), log_u, spec.distractor) for j in range(n)]
            for ch in choices_NxCxK
        ]
    )
    post = np.exp(log_post - np.logaddexp.reduce(log_post, axis=1, keepdims=True))
    rows = np.arange(N)
    others = np.where(np.arange(n)[None] == answer[:, None], -np.inf, lp_NxC)
    ceiling = lp_NxC[rows, answer] > others.max(1)
    items = [
        MCItem(
            tuple(int(x) for x in ctx[i]),
            tuple(tuple(int(x) for x in c) for c in choices_NxCxK[i]),
            int(answer[i]),
            f"{spec.name}-{i}",
            {"source_logprobs": [float(x) for x in lp_NxC[i]]},
        )
        for i in range(N)
    ]
    info = {
        "kind": "mc",
        "k": k,
        "distractor": spec.distractor,
        "n_choices": n,
        "n_items": spec.n_items,
        "context_len": L,
        "chance": 1.0 / n,
        "ceiling_accuracy": float(ceiling.mean()),
        "bayes_accuracy": float(post.max(1).mean()),
        "bayes_rule_accuracy_empirical": float((post.argmax(1) == answer).mean()),
    }
    return Task(spec, items, info)


@functools.lru_cache(maxsize=2)
def _log_prob_parts(cfg: MarkovSourceConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log p(x | c) in the source's two parts: log of the dense low-order part [R, V] (r = the last
    order-1 tokens of c), the top-order successors [C, K] and their exact log-probabilities [C, K]."""
    src = cached_source(cfg)
    C = cfg.vocab_size**cfg.order
    R = C // cfg.vocab_size
    low_RxV = src._low_dense()
    top_CxK, top_p_CxK = src._top()
    r_C1 = (np.arange(C) % R)[:, None]
    return np.log(low_RxV), top_CxK, np.log(low_RxV[r_C1, top_CxK] + top_p_CxK)


@functools.lru_cache(maxsize=2)
def _future_tables(cfg: MarkovSourceConfig) -> list[np.ndarray]:
    """The cache ``_best_future`` extends: G_0.. of one source (the battery asks for k = 1, 2, 4, 8)."""
    return [np.zeros(cfg.vocab_size**cfg.order)]


def _best_future(cfg: MarkovSourceConfig, k: int) -> list[np.ndarray]:
    """G_0..G_k [C]: G_j(c) = the best log-probability of j more tokens from state c (Bellman, backwards)."""
    log_low_RxV, top_CxK, top_lp_CxK = _log_prob_parts(cfg)
    V, C = cfg.vocab_size, cfg.vocab_size**cfg.order
    r_C = np.arange(C) % (C // V)  # the last order-1 tokens of each state
    G = _future_tables(cfg)
    while len(G) <= k:
        G_RxV = G[-1].reshape(-1, V)  # next state of c = (a, r) after x is (r, x), index r * V + x
        # Any x scores at least log low[r, x] + G(r, x) (exact unless x is a top successor of c, which
        # the second term scores exactly), so the max of the two terms is the exact Bellman update.
        h_R = (log_low_RxV + G_RxV).max(1)
        via_top = (top_lp_CxK + G_RxV[r_C[:, None], top_CxK]).max(1)
        G.append(np.maximum(h_R[r_C], via_top))
    return G[: k + 1]


def source_mode(src: MarkovSource, contexts_NxL: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The most likely k-token continuation of each context under the source and its log-probability:
    ([N, k] int64, [N] float64).

    Dynamic programming over the V**order source states (Viterbi, run backwards): G_j(c), the best log-prob
    of j more tokens from state c, is ``max_x log p(x | c) + G_{j-1}(next(c, x))``; computed once for every
    state, then each item follows the argmax from its own state. The source's split p(x | c) = low(x | r) +
    top_c(x) (r = the last order-1 tokens, top_c sparse over K successors) makes one update O(V**order * K)
    work instead of a dense V**(order+1) table, so the exact mode exists for a 1024-token order-2 source.
    """
    V, order = src.config.vocab_size, src.config.order
    R = V ** (order - 1)
    log_low_RxV, top_CxK, top_lp_CxK = _log_prob_parts(src.config)
    G = _best_future(src.config, k)
    c = _ctx_index(contexts_NxL, V, order)
    start = c.copy()
    out = np.zeros((len(c), k), dtype=np.int64)
    rows = np.arange(len(c))
    for t in range(k):
        r = c % R
        lp_NxV = log_low_RxV[r].copy()
        lp_NxV[rows[:, None], top_CxK[c]] = top_lp_CxK[c]  # successors within a row are distinct
        x = (lp_NxV + G[k - t - 1].reshape(R, V)[r]).argmax(1)
        out[:, t] = x
        c = r * V + x
    return out, G[k][start]


def make_gen_task(src: MarkovSource, spec: TaskSpec, seed: int = 0) -> Task:
    V, order = src.config.vocab_size, src.config.order
    spec.validate(V, order)
    rng = _rng(seed, spec)
    ctx = _contexts(src, spec.n_items, spec.context_len, rng)
    targets, lp = source_mode(src, ctx, spec.k)
    info = {
        "kind": "gen",
        "k": spec.k,
        "n_items": spec.n_items,
        "context_len": spec.context_len,
        "target_rule": "mode",  # the source's most likely k-token continuation (exact, Viterbi)
        "source_pass_prob": float(np.exp(lp).mean()),
    }
    return Task(spec, [], info, contexts=ctx, targets=targets)


def make_task(source_or_dataset: Any, spec: TaskSpec, seed: int = 0) -> Task:
    src = resolve_source(source_or_dataset)
    return make_mc_task(src, spec, seed) if spec.kind == "mc" else make_gen_task(src, spec, seed)


def default_specs(n_items: int = 200, n_gen_items: int = 100, context_len: int = 16) -> list[TaskSpec]:
    """The default battery: mc over k in {1, 2, 4, 8} x {unigram, perturb} (k=1 perturb is the same
    distribution as k=1 unigram, so it is left out) and gen over k in {1, 2, 4, 8}."""
    specs = [
        TaskSpec("mc", k, d, 4, n_items, context_len)
        for k in (1, 2, 4, 8)
        for d in DISTRACTORS
        if not (k == 1 and d == "perturb")
    ]
    return specs + [TaskSpec("gen", k, n_items=n_gen_items, context_len=context_len) for k in (1, 2, 4, 8)]


def default_battery(
    source_or_dataset: Any,
    seed: int = 0,
    *,
    specs: list[TaskSpec] | None = None,
    names: list[str] | tuple[str, ...] | None = None,
) -> list[Task]:
    """Generate the battery (deterministic in ``seed``); ``names`` selects tasks of the default list."""
    src = resolve_source(source_or_dataset)
    specs = list(specs) if specs is not None else default_specs()
    if names is not None:
        known = {s.name: s for s in specs}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise TaskError(f"unknown task(s) {unknown}; available: {sorted(known)}")
        specs = [known[n] for n in names]
    return [make_task(src, s, seed) for s in specs]


def jsonl_task(path: str | os.PathLike, name: str | None = None) -> Task:
    """A user multiple-choice task from a JSONL file (see the module docstring); named after the file."""
    items = read_jsonl(path)
    n = max(len(it.choices) for it in items)
    info = {"kind": "mc", "n_items": len(items), "n_choices": n, "source_file": str(path)}
    return Task(TaskSpec("mc", n_items=len(items)), items, info, label=name or Path(path).stem)
