"""Downstream battery: the multiple-choice evaluator against hand-computed log-probabilities, the metric
formulas, task generation (determinism, exact Bayes/ceiling accuracies by enumeration, the Viterbi mode),
pass@k and PassUntil, the early-exit sampler against full autoregressive sampling, JSONL I/O and errors, and
downstream.json written at the end of training."""

from __future__ import annotations

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import evaluate as ev
from experiments.synthetic import MarkovSource, MarkovSourceConfig
from experiments.tasks import (
    MCItem,
    Task,
    TaskError,
    TaskSpec,
    continuation_logprob,
    default_battery,
    encode_items,
    make_task,
    parse_item,
    read_jsonl,
    source_mode,
    write_jsonl,
)
from scaling.downstream import item_scores

V = 7


@pytest.fixture(scope="module")
def bigram():
    """A stub LM: logits at position t depend only on token t (a random bigram table), so the expected
    log-probabilities are easy to compute with numpy."""
    W = np.random.default_rng(0).normal(size=(V, V)) * 2.0
    Wj = jnp.asarray(W, jnp.float32)
    logp = W - np.logaddexp.reduce(W, axis=1, keepdims=True)  # float64 reference
    return (lambda tok_BxL: Wj[tok_BxL]), logp


def ref_logprob(logp, context, choice):
    seq = list(context) + list(choice)
    return sum(logp[seq[t - 1], seq[t]] for t in range(len(context), len(seq)))


def random_items(rng, n):
    items = []
    for i in range(n):
        nc = int(rng.integers(2, 5))
        ctx = tuple(int(x) for x in rng.integers(0, V, size=rng.integers(1, 6)))
        ch = tuple(tuple(int(x) for x in rng.integers(0, V, size=rng.integers(1, 4))) for _ in range(nc))
        items.append(MCItem(ctx, ch, int(rng.integers(nc)), f"q{i}"))
    return items


# ---- evaluator ----------------------------------------------------------------------------------------
def test_choice_logprobs_match_hand_computation(bigram):
    fn, logp = bigram
    items = random_items(np.random.default_rng(1), 11)
    # batch_size 4 < rows: several batches, the last one padded.
    r = ev.Scorer(fn, batch_size=4).choice_logprobs(items)
    for i, it in enumerate(items):
        for j, ch in enumerate(it.choices):
            assert r["logprob"][i, j] == pytest.approx(ref_logprob(logp, it.context, ch), abs=1e-4)
            assert r["n_tokens"][i, j] == len(ch)
        assert np.isnan(r["logprob"][i, len(it.choices) :]).all()
    # A bigram model only sees the previous token: cutting contexts to fit a short window changes nothing.
    short = ev.Scorer(fn, batch_size=4, max_len=5).choice_logprobs(items)
    cut = sum(len(it.context) + max(map(len, it.choices)) > 5 for it in items)
    assert 0 < cut < len(items) and short["truncated"] == cut  # items cut, not (item, choice) rows
    np.testing.assert_allclose(short["logprob"], r["logprob"], atol=1e-4)


def test_transformer_scores_do_not_depend_on_padding():
    import flax.linen as nn

    from models import ModelConfig, build_model

    cfg = ModelConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)
    model = build_model(cfg)
    init = jax.jit(model.init)  # eager init dispatches op by op: far slower than compiling it
    params = nn.meta.unbox(init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    rng = np.random.default_rng(2)
    # Same lengths everywhere so the unpadded reference compiles once; the scorer pads them to 12.
    items = [
        MCItem(
            tuple(rng.integers(0, V, 3).tolist()),
            tuple(tuple(rng.integers(0, V, 2).tolist()) for _ in range(3)),
            0,
        )
        for _ in range(4)
    ]
    r = ev.Scorer(ev.model_apply_fn(cfg), params, batch_size=8).choice_logprobs(items, length=12)
    apply = jax.jit(lambda tok: jax.nn.log_softmax(model.apply({"params": params}, tok)[0]))
    for i, it in enumerate(items):
        seqs = [list(it.context) + list(ch) for ch in it.choices]
        logp = np.asarray(apply(jnp.asarray(seqs, jnp.int32)), np.float64)  # unpadded: [3, 5, V]
        for j, s in enumerate(seqs):
            want = sum(logp[j, t - 1, s[t]] for t in range(3, 5))
            assert r["logprob"][i, j] == pytest.approx(want, abs=1e-4)


def test_mc_metric_formulas():
    nan = np.nan
    lp = np.array([[-1.0, -2.0, -3.0], [-2.0, -1.0, nan], [-1.0, -1.0, -5.0], [-6.0, -2.0, -3.0]])
    nt = np.array([[1, 4, 1], [1, 1, 0], [2, 1, 1], [6, 1, 1]])
    ans = np.array([0, 0, 1, 0])
    m = ev.mc_metrics(lp, nt, ans)
    # item 0 right; item 1 wrong; item 2 a tie (counts as wrong); item 3 wrong by sum, right per token.
    assert m["accuracy"] == pytest.approx(1 / 4)
    norm_correct = [-1 > max(-0.5, -3), -2 > -1, -1 > max(-1 / 2, -5), -1 > max(-2, -3)]
    assert m["accuracy_norm"] == pytest.approx(np.mean(norm_correct))
    p = [
        math.exp(-1) / (math.exp(-1) + math.exp(-2) + math.exp(-3)),
        math.exp(-2) / (math.exp(-2) + math.exp(-1)),
        math.exp(-1) / (2 * math.exp(-1) + math.exp(-5)),
        math.exp(-6) / (math.exp(-6) + math.exp(-2) + math.exp(-3)),
    ]
    assert m["p_correct"] == pytest.approx(np.mean(p))
    assert m["margin"] == pytest.approx(np.mean([1.0, -1.0, 0.0, -4.0]))
    assert m["chance"] == pytest.approx(np.mean([1 / 3, 1 / 2, 1 / 3, 1 / 3]))
    np.testing.assert_array_equal(m["items"]["logprob_incorrect"][1], [-1.0, nan])
    # The per-item arrays are what scaling.downstream consumes; its view of them must agree.
    sc = item_scores(m["items"]["logprob_correct"][None], m["items"]["logprob_incorrect"][None])
    np.testing.assert_allclose(sc["p_choice_correct"][0], p)
    np.testing.assert_array_equal(sc["correct"][0], m["items"]["correct"])


# ---- generated tasks ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_source():
    cfg = MarkovSourceConfig(vocab_size=4, order=1, weights=(0.2, 0.8), successors=(2,), buckets=(None,))
    return MarkovSource.create(cfg)


def test_battery_is_deterministic_and_items_are_well_formed():
    src_cfg = MarkovSourceConfig(vocab_size=16, successors=(4, 2))
    names = ["mc-k2-unigram", "mc-k4-perturb", "gen-k2"]
    a = default_battery(src_cfg, seed=0, names=names)
    b = default_battery(src_cfg, seed=0, names=names)
    c = default_battery(src_cfg, seed=1, names=names)
    for ta, tb in zip(a, b, strict=True):
        assert ta.items == tb.items and ta.info == tb.info
    assert a[0].items != c[0].items
    # A task's items do not depend on which other tasks are generated with it.
    assert default_battery(src_cfg, seed=0, names=["mc-k4-perturb"])[0].items == a[1].items
    for task in a[:2]:
        for it in task.items:
            choices = np.array(it.choices)
            assert len({tuple(c) for c in choices}) == 4  # distinct, truth included once
            truth = choices[it.answer]
            others = np.delete(choices, it.answer, axis=0)
            if task.spec.distractor == "perturb":
                assert ((others != truth).sum(1) == 1).all()
    np.testing.assert_array_equal(a[2].targets, b[2].targets)


def enumerate_accuracies(src, k, distractor):
    """Exact Bayes and ceiling accuracy of a 2-choice task by enumerating every (context, truth, distractor,
    answer position), independently of the generator's code."""
    Vs = src.config.vocab_size
    pi = src.stationary().pi
    u = src.unigram_V
    seqs = list(itertools.product(range(Vs), repeat=k))
    bayes = ceiling = 0.0
    for c in range(Vs):
        ctx = np.array([[c]])
        lp = {s: float(continuation_logprob(src, ctx, np.array([s]))[0]) for s in seqs}
        for x, y in itertools.permutations(seqs, 2):  # observed choices (x, y), x != y

            def q(d, t):  # P(distractor d | truth t)
                if distractor == "unigram":
                    return np.prod(u[list(d)]) / (1 - np.prod(u[list(t)]))
                diff = [j for j in range(k) if d[j] != t[j]]
                return u[d[diff[0]]] / (k * (1 - u[t[diff[0]]])) if len(diff) == 1 else 0.0

            jx = pi[c] * 0.5 * math.exp(lp[x]) * q(y, x)  # truth at position 0
            jy = pi[c] * 0.5 * math.exp(lp[y]) * q(x, y)  # truth at position 1
            bayes += max(jx, jy)
            ceiling += jx * (lp[x] > lp[y]) + jy * (lp[y] > lp[x])
    return bayes, ceiling


@pytest.mark.parametrize("k, distractor", [(1, "unigram"), (2, "perturb")])
def test_bayes_and_ceiling_accuracy_match_enumeration(small_source, k, distractor):
    spec = TaskSpec("mc", k, distractor, n_choices=2, n_items=1500, context_len=3)
    task = make_task(small_source, spec, seed=0)
    bayes, ceiling = enumerate_accuracies(small_source, k, distractor)
    n = spec.n_items
    # bayes_accuracy averages the max posterior (sd <= 0.5); ceiling is a mean of 0/1 outcomes.
    assert task.info["bayes_accuracy"] == pytest.approx(bayes, abs=4 * 0.5 / math.sqrt(n))
    sd = math.sqrt(ceiling * (1 - ceiling) / n)
    assert task.info["ceiling_accuracy"] == pytest.approx(ceiling, abs=4 * sd + 1e-3)
    assert task.info["bayes_rule_accuracy_empirical"] == pytest.approx(bayes, abs=4 * 0.5 / math.sqrt(n))


@pytest.mark.parametrize(
    "cfg",
    [
        MarkovSourceConfig(vocab_size=5, successors=(2, 2), seed=3),
        MarkovSourceConfig(vocab_size=5, successors=(2, 3), buckets=(3, 7), seed=4),
        MarkovSourceConfig(vocab_size=6, order=1, weights=(0.2, 0.8), successors=(3,), buckets=(None,)),
        MarkovSourceConfig(
            vocab_size=4, order=3, weights=(0.1, 0.2, 0.3, 0.4), successors=(2, 2, 2), buckets=(None,) * 3
        ),
    ],
    ids=["order2", "order2-hashed", "order1", "order3"],
)
def test_source_mode_is_the_argmax_continuation(cfg):
    src = MarkovSource.create(cfg)
    V = cfg.vocab_size
    ctx = np.random.default_rng(0).integers(0, V, size=(6, 4))
    k = 3
    mode, lp = source_mode(src, ctx, k)
    seqs = np.array(list(itertools.product(range(V), repeat=k)))
    for i in range(len(ctx)):
        all_lp = continuation_logprob(src, np.repeat(ctx[i : i + 1], len(seqs), 0), seqs)
        assert tuple(mode[i]) == tuple(seqs[all_lp.argmax()])
        assert lp[i] == pytest.approx(all_lp.max())


def test_source_mode_for_a_large_vocabulary():
    """The GPU studies' 1024-token order-2 corpus: V**3 = 1e9 is too many for a dense table; the mode is
    still exact (checked by brute force over all V**2 two-token continuations of a few contexts)."""
    src = MarkovSource.create(MarkovSourceConfig(vocab_size=1024, order=2, successors=(16, 8)))
    ctx = np.random.default_rng(1).integers(0, 1024, size=(3, 8))
    mode, lp = source_mode(src, ctx, 2)
    seqs = np.stack(np.meshgrid(np.arange(1024), np.arange(1024), indexing="ij"), -1).reshape(-1, 2)
    for i in range(len(ctx)):
        all_lp = continuation_logprob(src, np.repeat(ctx[i : i + 1], len(seqs), 0), seqs)
        assert tuple(mode[i]) == tuple(seqs[all_lp.argmax()])
        assert lp[i] == pytest.approx(all_lp.max())


# ---- generative -----------------------------------------------------------------------------------------
def test_pass_at_k_matches_exact_formula():
    for n, c, k in itertools.product([1, 5, 20, 100], [0, 1, 3, 20], [1, 2, 10]):
        if c > n or k > n:
            continue
        want = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert ev.pass_at_k(n, c, k) == pytest.approx(want, rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError):
        ev.pass_at_k(5, 6, 1)


def test_early_exit_sampler_equals_full_sampling(bigram):
    fn, logp = bigram
    rng = np.random.default_rng(3)
    N, S, k, T = 6, 400, 3, 0.7
    ctx = rng.integers(0, V, size=(N, 4))
    # Targets: the stub's greedy continuation (passes are frequent) for half the items, random for the rest.
    tgt = rng.integers(0, V, size=(N, k))
    for i in range(N // 2):
        prev = ctx[i, -1]
        for t in range(k):
            tgt[i, t] = prev = int(np.argmax(logp[prev]))
    scorer = ev.Scorer(fn, batch_size=64)
    lo, hi, lpt = scorer.target_pass_bounds(ctx, tgt, T)
    u = rng.random((N, S, k))
    fast = ev.passes_from_uniforms(lo, hi, u)
    full = (scorer.sample_continuations(ctx, u, T) == tgt[:, None, :]).all(-1)
    near = (np.abs(u[..., None] - np.stack([lo, hi], -1)[:, None]) < 1e-5).any((-1, -2))
    assert (fast == full)[~near].all() and fast.sum() > 100
    # Exact pass probability: product of the temperature-T target probabilities along the target.
    pT = np.exp(logp / T) / np.exp(logp / T).sum(1, keepdims=True)  # softmax(logits/T): logits = logp + c
    prev = ctx[:, -1]
    want = np.ones(N)
    for t in range(k):
        want *= pT[prev, tgt[:, t]]
        prev = tgt[:, t]
    np.testing.assert_allclose(np.exp(lpt.sum(1)), want, rtol=1e-4)


def test_gen_metrics_estimates_known_pass_rates():
    # One-token targets whose inverse-CDF interval has width p: each sample passes with probability exactly p.
    p = np.repeat([0.3, 0.01, 0.001, 1e-7], 300)
    lo = (0.3 * (1 - p))[:, None]
    hi = lo + p[:, None]
    cfg = ev.EvalConfig(n_samples=50, pass_ks=(1, 10), passuntil_k=4, passuntil_max_samples=20_000, seed=1)
    m = ev.gen_metrics(lo, hi, np.log(p)[:, None], cfg)
    it = m["items"]
    assert m["pass_prob_exact"] == pytest.approx(p.mean())
    for g, pg in enumerate([0.3, 0.01, 0.001]):
        sl = slice(300 * g, 300 * (g + 1))
        # PassUntil: stopped at the 4th pass, (k-1)/(n-1) is unbiased with sd about p / sqrt(k - 2).
        assert (it["successes"][sl] == 4).all() and (it["trials"][sl] < 20_000).all()
        assert it["pass_rate"][sl].mean() == pytest.approx(pg, abs=4 * pg / math.sqrt(2 * 300))
        # pass@1 over 50 samples is the plain pass fraction.
        assert (it["n_pass"][sl] / 50).mean() == pytest.approx(pg, abs=4 * math.sqrt(pg / (50 * 300)) + 1e-9)
    # 1e-7 is far below what 20k samples resolve: censored at the budget with fewer than k passes (0.6 passes
    # expected over all 300 items x 20k samples)
    assert (it["trials"][900:] == 20_000).all() and it["successes"][900:].sum() <= 5
    assert m["passuntil"]["n_censored"] == 300
    np.testing.assert_allclose(m["pass@10"], ev.pass_at_k(50, it["n_pass"], 10).mean())
    # common random numbers: an item's PassUntil draws (keyed by its position in the task) do not depend on
    # the other items -- which of them are still sampling depends on the model
    sub = [0, 450, 700]  # one item from each of the three resolvable rates
    other = hi.copy()
    other[900:] = lo[900:] + 0.9  # the unresolvable items now pass at once: they stop sampling after chunk 1
    np.testing.assert_array_equal(ev.gen_metrics(lo, other, np.log(p)[:, None], cfg)["items"]["trials"][sub],
                                  it["trials"][sub])


# ---- JSONL and errors -------------------------------------------------------------------------------------
def test_jsonl_round_trip_and_text_encoding(tmp_path):
    items = [
        MCItem((1, 2, 3), ((4,), (5, 6)), 1, "a", {"src": "x"}),
        MCItem("Paris is in", (" France", " Spain"), 0, "b"),
    ]
    path = tmp_path / "items.jsonl"
    write_jsonl(path, items)
    back = read_jsonl(path)
    assert back == items and back[0].meta == {"src": "x"}
    enc = encode_items(back)
    assert enc[0] == items[0]
    assert enc[1].context == (256,) + tuple(b"Paris is in") and enc[1].choices[0] == tuple(b" France")


@pytest.mark.parametrize(
    "item, message",
    [
        ({"choices": [[1], [2]], "answer": 0}, r"missing required field\(s\) \['context'\]"),
        ({"context": [1], "choices": [[1], [2]]}, r"missing required field\(s\) \['answer'\]"),
        ({"context": [1], "choices": [[1], [2]], "answer": 2}, r"answer=2 is out of range for 2 choices"),
        ({"context": [1], "choices": [[1], [2]], "answer": -1}, r"out of range"),
        ({"context": [1], "choices": [[1], [2]], "answer": True}, r"answer must be an integer"),
        ({"context": [1], "choices": [], "answer": 0}, r"choices must be a non-empty list"),
        ({"context": [1], "choices": [[1]], "answer": 0}, r"need at least 2"),
        ({"context": [1], "choices": [[1], []], "answer": 0}, r"choices\[1\] is an empty list"),
        ({"context": [], "choices": [[1], [2]], "answer": 0}, r"context is an empty list"),
        ({"context": [1, -3], "choices": [[1], [2]], "answer": 0}, r"non-negative integer token ids"),
        ({"context": "a", "choices": [[1], "b"], "answer": 0}, r"all be text or all be token ids"),
        ({"context": [1], "choices": [[1], [2]], "answer": 0, "label": 1}, r"unknown field\(s\) \['label'\]"),
        ({"context": [1], "choices": [[5], [2], [5]], "answer": 0}, r"choices 0 and 2 are identical"),
        ({"context": "a", "choices": [" b", " b"], "answer": 1}, r"choices 0 and 1 are identical"),
    ],
)
def test_malformed_items_are_rejected(item, message):
    with pytest.raises(TaskError, match=message):
        parse_item(item)


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": [1], "choices": [[1], [2]], "answer": 0}\n{"context": [1]\n')
    with pytest.raises(TaskError, match=r"bad.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"context": [1], "choices": [[1], [2]], "answer": 5}\n')
    with pytest.raises(TaskError, match=r"bad.jsonl:1.answer=5 is out of range"):
        read_jsonl(path)
    # ids key the per-item results across runs: 1 and "1" are the same id
    path.write_text('{"id": 1, "context": [1], "choices": [[1], [2]], "answer": 0}\n\n'
                    '{"id": "1", "context": [2], "choices": [[1], [2]], "answer": 1}\n')
    with pytest.raises(TaskError, match=r"bad.jsonl:3: id '1' was already used on line 1"):
        read_jsonl(path)


def test_text_items_use_the_datasets_own_tokenizer(tmp_path, monkeypatch):
    """Text items are encoded with the tokenizer the run's dataset was prepared with (its metadata.json), and
    the vocabulary guard is the corpus's: a dataset that cannot be found from the working directory is an
    error (it used to fall back to bytes and score BPE-model text silently); text on a synthetic run is
    refused even when the corpus vocabulary is large enough for byte ids (1024 here); ids the model's
    embedding has but the corpus never used are refused."""
    import flax.linen as nn

    from experiments.data import prepare_text
    from experiments.presets import get_preset
    from experiments.tokenizers import BPETokenizer
    from models import build_model

    (tmp_path / "a.txt").write_text("The capital of France is Paris. " * 200 + "hello world " * 100)
    monkeypatch.chdir(tmp_path)
    prepare_text(["a.txt"], "data/bpe", tokenizer="bpe", vocab_size=300, progress=False)
    cfg = get_preset("tiny").override(["model.vocab_size=320", "data.path=data/bpe"])
    corpus = ev.corpus_of(cfg)
    assert isinstance(corpus.tokenizer, BPETokenizer) and corpus.vocab_size == 320
    params = nn.meta.unbox(build_model(cfg.model).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    text = Task(TaskSpec("mc", n_items=1), [MCItem("The capital of France is", (" Paris", " Rome"), 0)], {},
                label="text")
    res = ev.evaluate_params(cfg, params["params"], [text])["text"]
    assert res["items"]["n_tokens"][0][0] == len(corpus.tokenizer.encode(" Paris")) < len(" Paris")
    monkeypatch.chdir(tmp_path / "data")
    with pytest.raises(TaskError, match=r"cannot read the run's dataset data.path='data/bpe' from .*there"):
        ev.evaluate_params(cfg, params["params"], [text])
    ids = Task(TaskSpec("mc", n_items=1), [MCItem((1, 2), ((3,), (300,)), 0)], {}, label="ids")
    assert ev.evaluate_params(cfg, params["params"], [ids])["ids"]["n_items"] == 1  # ids need no dataset
    # a dataset tokenised elsewhere, whose metadata.json names no tokenizer: token ids score, text is refused
    meta = json.loads((tmp_path / "data" / "bpe" / "metadata.json").read_text())
    del meta["tokenizer"]
    (tmp_path / "data" / "bpe" / "metadata.json").write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)
    assert ev.corpus_of(cfg) == ev.Corpus(320, None)
    assert ev.evaluate_params(cfg, params["params"], [ids])["ids"]["n_items"] == 1
    with pytest.raises(TaskError, match=r"have text items, but this run's corpus has no text tokenizer"):
        ev.evaluate_params(cfg, params["params"], [text])

    syn = get_preset("tiny").override(["model.vocab_size=1024", "data.synthetic.vocab_size=1024"])
    params = nn.meta.unbox(build_model(syn.model).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    with pytest.raises(TaskError, match=r"task\(s\) \['text'\] have text items, but this run's corpus has "
                                        r"no text tokenizer \(a synthetic corpus"):
        ev.evaluate_params(syn, params["params"], [text])
    syn = syn.override(["data.synthetic.vocab_size=64"])
    ids = Task(TaskSpec("mc", n_items=1), [MCItem((1, 2), ((3,), (100,)), 0)], {}, label="ids")
    with pytest.raises(TaskError, match=r"token id 100 is outside the vocabulary the model was trained on"):
        ev.evaluate_params(syn, params["params"], [ids])


def test_unknown_task_name_and_non_synthetic_source(tmp_path):
    with pytest.raises(TaskError, match=r"unknown task\(s\) \['mc-k3-unigram'\]"):
        default_battery(MarkovSourceConfig(vocab_size=16), names=["mc-k3-unigram"])
    (tmp_path / "metadata.json").write_text(json.dumps({"vocab_size": 320}))
    with pytest.raises(TaskError, match="not synthetic"):
        default_battery(tmp_path)


def test_config_rejects_unknown_eval_tasks_before_training():
    from experiments.config import ConfigError
    from experiments.presets import get_preset

    with pytest.raises(ConfigError, match=r"trainer.eval_tasks: unknown task\(s\) \['gen-k3'\]"):
        get_preset("tiny").override(['trainer.eval_tasks=["gen-k3"]']).validate()
    assert get_preset("tiny").override(["trainer.eval_tasks=true"]).validate().trainer.eval_tasks is True


# ---- end of training ----------------------------------------------------------------------------------
def test_downstream_json_written_after_training(tmp_path, capsys):
    from experiments.presets import get_preset
    from experiments.trainer import train

    names = ["mc-k4-perturb", "gen-k2"]
    cfg = get_preset("tiny").override(
        [
            "model.d_model=16",
            "model.n_layers=1",
            "model.n_heads=2",
            "model.max_seq_len=32",
            "model.vocab_size=16",
            "data.synthetic.vocab_size=16",
            "data.seq_len=32",
            "data.batch_size=8",
            "data.n_train_tokens=4096",
            "data.n_val_tokens=1024",
            "trainer.steps=2",
            "trainer.eval_steps=1",
            "optimizer.warmup_steps=1",
            "trainer.eval_every=0",
            "trainer.checkpoint_every=0",
            "trainer.progress=false",
            "mesh.data=1",
            f"trainer.eval_tasks={json.dumps(names)}",
        ]
    )
    train(cfg, tmp_path, devices=jax.devices()[:1], log=lambda s: None)
    d = ev.read_downstream(tmp_path)
    assert d["step"] == 2 and list(d["tasks"]) == names
    mc = d["tasks"]["mc-k4-perturb"]
    for key in ("accuracy", "accuracy_norm", "p_correct", "margin", "chance", "ceiling_accuracy"):
        assert key in mc and "bayes_accuracy" in mc
    assert np.array(mc["items"]["logprob_incorrect"]).shape == (200, 3)
    assert "pass@1" in d["tasks"]["gen-k2"] and "passuntil" in d["tasks"]["gen-k2"]
    # Re-evaluating from the checkpoint reproduces the in-memory evaluation exactly (determinism).
    again = ev.evaluate_run(tmp_path, names=names, write=False)
    for name in names:
        a, b = d["tasks"][name], again["tasks"][name]
        for key in ("accuracy", "p_correct", "pass@1"):
            assert a.get(key) == pytest.approx(b.get(key), abs=1e-6)
    stacked = ev.stack_runs([d, again], "mc-k4-perturb")
    assert stacked["logprob_incorrect_MxIxK"].shape == (2, 200, 3)
    # The executor hook skips a run whose downstream.json is current.
    before = (tmp_path / ev.DOWNSTREAM_FILE).stat().st_mtime_ns
    ev.post_run(cfg, tmp_path)
    assert (tmp_path / ev.DOWNSTREAM_FILE).stat().st_mtime_ns == before
    # CLI on a user JSONL file (token ids of the 16-token corpus) for the checkpoint at step 2.
    user = tmp_path / "mine.jsonl"
    write_jsonl(user, [MCItem((1, 2, 3), ((4,), (5, 6), (7,)), 2, "u0"), MCItem((3,), ((1,), (2,)), 0)])
    assert ev.main([str(tmp_path), "--no-battery", "--jsonl", str(user), "--step", "2"]) == 0
    mine = ev.read_downstream(tmp_path, "downstream_step2.json")["tasks"]["mine"]
    assert mine["n_items"] == 2 and np.array(mine["items"]["logprob_incorrect"]).shape == (2, 2)
    assert mine["items"]["logprob_incorrect"][1][1] is None  # NaN pad of the 2-choice item -> null
    # Scoring a JSONL file on the final checkpoint adds it to downstream.json: the battery's results, which
    # the study's report reads, used to be replaced by it. Re-scoring a task replaces only that task.
    assert ev.main([str(tmp_path), "--no-battery", "--jsonl", str(user)]) == 0
    merged = ev.read_downstream(tmp_path)["tasks"]
    assert list(merged) == [*names, "mine"] and merged["mine"] == mine
    assert all(merged[n] == d["tasks"][n] for n in names)
    ev.evaluate_run(tmp_path, names=names[:1], battery_seed=1)  # another battery: nothing of the old kept
    assert list(ev.read_downstream(tmp_path)["tasks"]) == names[:1]
    # a step that was not kept, text items on a synthetic-corpus run, no work directory: one-line errors
    assert ev.main([str(tmp_path), "--no-battery", "--jsonl", str(user), "--step", "1"]) == 2
    assert "no checkpoint at step 1" in capsys.readouterr().err
    text = tmp_path / "text.jsonl"
    text.write_text('{"context": "The capital of France is", "choices": [" Paris", " Rome"], "answer": 0}\n')
    assert ev.main([str(tmp_path), "--no-battery", "--jsonl", str(text)]) == 2
    assert "have text items, but this run's corpus has no text tokenizer" in capsys.readouterr().err
    assert ev.main([str(tmp_path / "nowhere")]) == 2
    assert "config.json not found: is" in capsys.readouterr().err


# ---- exact checks of the generator's bookkeeping and of the metrics' less-used outputs --------------------
def test_mc_metrics_normalise_by_token_count_and_fill_per_item_arrays():
    # item 0: wrong by sum (-4 < -3), right per token (-1 > -3); item 1: a per-token tie (-1 == -1), wrong;
    # item 2: right both ways.
    lp = np.array([[-4.0, -3.0], [-2.0, -1.0], [-0.5, -2.0]])
    nt = np.array([[4, 1], [2, 1], [1, 1]])
    m = ev.mc_metrics(lp, nt, np.array([0, 0, 0]))
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["accuracy_norm"] == pytest.approx(2 / 3)
    it = m["items"]
    np.testing.assert_allclose(it["margin"], [-1.0, -1.0, 1.5])
    p = [1 / (1 + math.exp(1)), 1 / (1 + math.exp(1)), 1 / (1 + math.exp(-1.5))]
    np.testing.assert_allclose(it["p_correct"], p)
    assert m["p_correct"] == pytest.approx(np.mean(p))


def _uniform_source():
    """p(x | c) = 1/4 exactly (all weight on a flat unigram): every k-token continuation ties."""
    cfg = MarkovSourceConfig(vocab_size=4, order=1, weights=(1.0, 0.0), successors=(2,), buckets=(None,),
                             zipf_exponent=0.0)
    return MarkovSource.create(cfg)


def test_ceiling_counts_ties_as_wrong_and_answers_are_spread_over_positions():
    task = make_task(_uniform_source(), TaskSpec("mc", 2, "unigram", n_choices=4, n_items=200), seed=0)
    # the likelihood rule never strictly prefers the truth; the posterior is flat (uniform distractors)
    assert task.info["ceiling_accuracy"] == 0.0
    assert task.info["bayes_accuracy"] == pytest.approx(0.25, rel=1e-12)
    # the true continuation is put at a uniformly random position (200 items: 50 +- 6 per position)
    counts = np.bincount([it.answer for it in task.items], minlength=4)
    assert counts.min() >= 25 and counts.max() <= 75


def _draw_prob(others, truth, u, distractor):
    """P(distractors = others, in this order | truth): successive draws without replacement from the
    population the module docstring describes, its weights summed by enumeration."""
    k = len(truth)
    pop = list(itertools.product(range(len(u)), repeat=k))

    def w(s):
        diff = [j for j in range(k) if s[j] != truth[j]]
        if distractor == "unigram":
            return float(np.prod(u[list(s)])) if diff else 0.0
        return u[s[diff[0]]] / (k * (1 - u[truth[diff[0]]])) if len(diff) == 1 else 0.0

    left, prob = sum(w(s) for s in pop), 1.0
    for d in others:
        prob *= w(tuple(d)) / left
        left -= w(tuple(d))
    return prob


@pytest.mark.parametrize("distractor", ["unigram", "perturb"])
def test_bayes_accuracy_is_the_mean_max_posterior_of_the_items(small_source, distractor):
    """Exactly (not within sampling noise): each item's posterior over which of its 3 choices is the truth,
    p(choice | context) * P(other choices, in their order | that truth), recomputed here."""
    task = make_task(small_source, TaskSpec("mc", 2, distractor, n_choices=3, n_items=60, context_len=3))
    u = small_source.unigram_V
    assert np.ptp(u) > 0.05  # a non-uniform unigram, so the distractor law's normalisers matter
    best, ceiling = [], []
    for it in task.items:
        ch = np.array(it.choices)
        lp = continuation_logprob(small_source, np.repeat([it.context], 3, 0), ch)
        joint = [math.exp(lp[j]) * _draw_prob(np.delete(ch, j, 0), ch[j], u, distractor) for j in range(3)]
        best.append(max(joint) / sum(joint))
        ceiling.append(lp[it.answer] > np.delete(lp, it.answer).max())
    assert task.info["bayes_accuracy"] == pytest.approx(np.mean(best), rel=1e-9)
    assert task.info["ceiling_accuracy"] == pytest.approx(np.mean(ceiling))


def test_gen_source_pass_prob_is_the_mean_probability_of_the_mode():
    src = MarkovSource.create(MarkovSourceConfig(vocab_size=5, successors=(2, 2), seed=3))
    task = make_task(src, TaskSpec("gen", 2, n_items=20, context_len=4))
    seqs = np.array(list(itertools.product(range(5), repeat=2)))
    best = [np.exp(continuation_logprob(src, np.repeat(c[None], len(seqs), 0), seqs)).max()
            for c in task.contexts]
    assert task.info["source_pass_prob"] == pytest.approx(np.mean(best), rel=1e-9)


@pytest.mark.parametrize("k, distractor, vocab", [(1, "unigram", 4), (2, "unigram", 3), (2, "perturb", 4)])
def test_spec_rejects_more_choices_than_possible_distractors(k, distractor, vocab):
    room = vocab**k - 1 if distractor == "unigram" else k * (vocab - 1)
    TaskSpec("mc", k, distractor, n_choices=room + 1).validate(vocab, 1)  # every possible distractor: fine
    with pytest.raises(TaskError, match="possible distractors"):
        TaskSpec("mc", k, distractor, n_choices=room + 2).validate(vocab, 1)


def test_passuntil_and_exact_pass_prob_follow_each_items_own_uniforms():
    """Sequential sampling-until-k replayed with each item's documented generator
    default_rng([seed, stream, 0x9A56, item]); a budget that is not a multiple of the 1024-sample chunks and
    rates that often have exactly k passes at a chunk's end."""
    rng = np.random.default_rng(7)
    I, k_tok, K, budget = 120, 2, 4, 3000
    width = np.sqrt(rng.choice([0.004, 0.002, 0.5], size=I))[:, None] * np.ones(k_tok)  # per-token widths
    lo = rng.random((I, k_tok)) * (1 - width)
    hi = lo + width
    logp = np.log(width)
    cfg = ev.EvalConfig(n_samples=8, pass_ks=(1,), passuntil_k=K, passuntil_max_samples=budget, seed=3)
    m = ev.gen_metrics(lo, hi, logp, cfg, stream=5)
    succ, trials = np.zeros(I, int), np.full(I, budget)
    for i in range(I):
        u = np.random.default_rng([3, 5, 0x9A56, i]).random((budget, k_tok))
        cum = np.cumsum(((u >= lo[i]) & (u < hi[i])).all(1))
        succ[i] = min(cum[-1], K)
        if cum[-1] >= K:
            trials[i] = np.argmax(cum >= K) + 1
    it = m["items"]
    np.testing.assert_array_equal(it["successes"], succ)
    np.testing.assert_array_equal(it["trials"], trials)
    assert 0 < (succ < K).sum() < I  # some censored, some stopped
    np.testing.assert_allclose(it["pass_rate"], np.where(succ == K, (K - 1) / (trials - 1), succ / trials))
    # the exact pass probability of one sample is the product over the k target tokens
    assert m["pass_prob_exact"] == pytest.approx(np.prod(width, 1).mean())
    np.testing.assert_allclose(it["pass_prob"], np.prod(width, 1))


def test_perturb_distractor_position_is_uniform_whatever_the_true_tokens(small_source):
    """The generator's law (used by the Bayes posterior): a uniformly random position, then a unigram token
    other than the true one there. Tally which position is replaced relative to the truth's tokens: the
    position holding the more frequent true token is replaced half the time (not in proportion to 1 - u)."""
    task = make_task(small_source, TaskSpec("mc", 2, "perturb", n_choices=2, n_items=2000, context_len=3))
    u = small_source.unigram_V
    hits = []
    for it in task.items:
        truth, other = np.array(it.choices[it.answer]), np.array(it.choices[1 - it.answer])
        if u[truth[0]] != u[truth[1]]:
            j = int(np.argmax(truth != other))
            hits.append(j == int(np.argmax(u[truth])))
    assert len(hits) > 1000
    assert np.mean(hits) == pytest.approx(0.5, abs=4 * 0.5 / math.sqrt(len(hits)))
