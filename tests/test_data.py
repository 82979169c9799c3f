"""Data pipeline: exact entropy of the synthetic source, stateless batches, memmap files, CLI, bad data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import data as D
from experiments.synthetic import MarkovSource, MarkovSourceConfig, config_from_dict
from experiments.tokenizers import ByteTokenizer

REPO = Path(__file__).resolve().parents[1]
SMALL = MarkovSourceConfig(vocab_size=20, order=2, weights=(0.1, 0.3, 0.6), successors=(4, 3), seed=3)


def _dense_reference(src: MarkovSource) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: dense transition P[c, x] by explicit loops over the generator tables, and the
    stationary law from a dense linear solve of the balance equations (no power iteration)."""
    V, k = src.config.vocab_size, src.config.order
    C = V**k
    P = np.zeros((C, V))
    for c in range(C):
        P[c] += src.lambdas[0] * src.unigram_V
        for j, t in enumerate(src.tables, start=1):
            row = c % V**j if t.bucket_of_context is None else t.bucket_of_context[c % V**j]
            for x, w in zip(t.succ_MxK[row], t.prob_MxK[row], strict=True):
                P[c, x] += src.lambdas[j] * w
    T = np.zeros((C, C))
    for c in range(C):
        for x in range(V):
            T[c, (c * V + x) % C] += P[c, x]
    # pi (T - I) = 0 with sum(pi) = 1: replace one (redundant) balance equation by the normalisation.
    A = T.T - np.eye(C)
    A[-1] = 1.0
    pi = np.linalg.solve(A, np.eye(C)[-1])
    return P, pi


@pytest.fixture(scope="module")
def small_source() -> MarkovSource:
    return MarkovSource.create(SMALL)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    kw = dict(vocab_size=64, n_train_tokens=40_000, n_val_tokens=5_000, seed=1, chain_length=2048)
    D.prepare_synthetic(out, **kw)
    return out


# ---- synthetic source: exact quantities ----------------------------------------------------------
def test_exact_entropies_match_dense_eigenvector_reference(small_source):
    P, pi = _dense_reference(small_source)
    V = SMALL.vocab_size
    assert np.allclose(P.sum(1), 1.0)
    ent = small_source.entropies()
    assert np.allclose(small_source.stationary().pi, pi, atol=1e-12)
    h_rows = -(P * np.log(P)).sum(1)
    assert ent["entropy_rate"] == pytest.approx(pi @ h_rows, rel=1e-10)
    pair = pi.reshape(V, V)  # joint law of two consecutive tokens
    uni = pair.sum(0)
    h_uni = -(uni * np.log(uni)).sum()
    h_pair = -(pair * np.log(pair)).sum()
    assert ent["unigram_entropy"] == pytest.approx(h_uni, rel=1e-10)
    assert ent["bigram_entropy"] == pytest.approx(h_pair - h_uni, rel=1e-10)


def test_entropy_rate_matches_monte_carlo_loss_of_true_model(small_source):
    """Mean -log p(next | context) under the true model over a sampled stream estimates the entropy rate.
    Independent chains give independent per-chain means, so their spread is an honest standard error."""
    k, chain, n_chains = SMALL.order, 2048, 96
    x = small_source.sample(chain * n_chains, np.random.default_rng(0), chain_length=chain)
    x_CxT = x.reshape(n_chains, chain)
    V = SMALL.vocab_size
    ctx = x_CxT[:, :-2] * V + x_CxT[:, 1:-1]  # order-2 context of each position t >= k
    nll = -small_source.log_prob(ctx.ravel(), x_CxT[:, k:].ravel()).reshape(n_chains, -1)
    per_chain = nll.mean(1)
    se = per_chain.std(ddof=1) / np.sqrt(n_chains)
    E = small_source.entropies()["entropy_rate"]
    assert abs(per_chain.mean() - E) < 4 * se, (per_chain.mean(), E, se)
    assert se < 0.02  # the test has power: a 0.1-nat error in E or in the sampler would be caught


def test_sampled_marginals_match_stationary_law(small_source):
    V = SMALL.vocab_size
    x = small_source.sample(200_000, np.random.default_rng(1))
    pair = small_source.stationary().pi.reshape(V, V)
    emp_uni = np.bincount(x, minlength=V) / x.size
    emp_pair = np.bincount(x[:-1] * V + x[1:], minlength=V * V).reshape(V, V) / (x.size - 1)
    # Total variation of an empirical law from n samples is O(sqrt(support / n)); the bounds are ~3x that.
    assert 0.5 * np.abs(emp_uni - pair.sum(0)).sum() < 0.02
    assert 0.5 * np.abs(emp_pair - pair).sum() < 0.05


def test_entropy_ladder_is_strictly_decreasing_for_defaults():
    ent = MarkovSource.create(MarkovSourceConfig()).entropies()
    h0, h1, h2 = ent["ngram_entropies"]
    assert ent["entropy_rate"] == h2 and ent["unigram_entropy"] == h0 and ent["bigram_entropy"] == h1
    # Conditioning on more context lowers the entropy; the default source has real structure at every order.
    assert h2 < h1 - 0.5 and h1 < h0 - 0.5
    assert h0 < np.log(256)


def test_source_is_deterministic_in_seed():
    a = MarkovSource.create(SMALL)
    b = MarkovSource.create(SMALL)
    c = MarkovSource.create(MarkovSourceConfig(**{**SMALL.__dict__, "seed": 4}))
    assert a.entropies()["entropy_rate"] == b.entropies()["entropy_rate"]
    assert a.entropies()["entropy_rate"] != c.entropies()["entropy_rate"]


def test_hashed_buckets_source_is_consistent():
    cfg = MarkovSourceConfig(vocab_size=16, order=2, successors=(3, 2), buckets=(None, 20), seed=5)
    src = MarkovSource.create(cfg)
    P, pi = _dense_reference(src)
    assert src.entropies()["entropy_rate"] == pytest.approx(pi @ -(P * np.log(P)).sum(1), rel=1e-10)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"weights": (0.0, 0.5, 0.5)}, "ergodicity"),
        ({"weights": (0.5, 0.5)}, r"order\+1"),
        ({"successors": (4,)}, "successors"),
        ({"vocab_size": 4096, "order": 3}, "too many"),
        # successive sampling of 8 distinct successors from 1e-7 of the mass (this ran for minutes)
        ({"zipf_exponent": 8.0}, r"too steep for 8 successors: .* hold only 1e-07"),
        # a unigram underflowing to 0: not ergodic (the entropy rate came out NaN)
        ({"vocab_size": 16, "order": 1, "weights": (0.5, 0.5), "successors": (1,), "buckets": (None,),
          "zipf_exponent": 800.0}, "underflows to 0"),
    ],
)
def test_bad_source_config(kw, msg):
    with pytest.raises(ValueError, match=msg):
        MarkovSourceConfig(**kw).validate()


# ---- prepared synthetic dataset ------------------------------------------------------------------
def test_prepare_synthetic_metadata_and_memmap(synth_dir):
    meta = json.loads((synth_dir / "metadata.json").read_text())
    ds = D.TokenDataset.open(synth_dir)
    assert ds.vocab_size == meta["vocab_size"] == 64 and meta["dtype"] == "uint16"
    assert meta["n_tokens"] == {"train": 40_000, "val": 5_000}
    assert ds.n_tokens("train") == 40_000 and isinstance(ds.tokens("train"), np.memmap)
    src = MarkovSource.create(config_from_dict(meta["generator"]))
    ent = src.entropies()
    assert ds.entropy_rate == pytest.approx(ent["entropy_rate"], rel=1e-12)
    assert ds.unigram_entropy == pytest.approx(ent["unigram_entropy"], rel=1e-12)
    assert ds.entropy_rate < ds.bigram_entropy < ds.unigram_entropy
    # Train and val are independent samples; the plug-in unigram entropy of the stream is close to exact.
    x = np.asarray(ds.tokens("train"))
    p = np.bincount(x, minlength=64) / x.size
    assert -(p[p > 0] * np.log(p[p > 0])).sum() == pytest.approx(ds.unigram_entropy, abs=0.02)
    assert not np.array_equal(x[:1000], np.asarray(ds.tokens("val"))[:1000])


def test_prepare_synthetic_is_deterministic_and_cached(tmp_path, synth_dir):
    kw = dict(vocab_size=64, n_train_tokens=40_000, n_val_tokens=5_000, seed=1)
    kw["chain_length"] = 2048
    D.prepare_synthetic(tmp_path / "a", **kw)
    assert (tmp_path / "a/train.bin").read_bytes() == (synth_dir / "train.bin").read_bytes()
    # Same arguments again: reused without rewriting; different arguments: refused unless overwrite.
    mtime = (tmp_path / "a/train.bin").stat().st_mtime_ns
    D.prepare_synthetic(tmp_path / "a", **kw)
    assert (tmp_path / "a/train.bin").stat().st_mtime_ns == mtime
    with pytest.raises(D.DataError, match="different dataset"):
        D.prepare_synthetic(tmp_path / "a", **{**kw, "seed": 2})
    D.prepare_synthetic(tmp_path / "a", **{**kw, "seed": 2}, overwrite=True)
    assert (tmp_path / "a/train.bin").read_bytes() != (synth_dir / "train.bin").read_bytes()
    # A MarkovSourceConfig can be passed whole.
    cfg = MarkovSourceConfig(vocab_size=64, seed=1)
    meta = D.prepare_synthetic(
        tmp_path / "b", vocab_size=0, n_train_tokens=40_000, n_val_tokens=5_000, seed=0, source=cfg,
        chain_length=2048,
    )
    assert meta["generator"]["seed"] == 1
    assert (tmp_path / "b/train.bin").read_bytes() == (synth_dir / "train.bin").read_bytes()
    # A cached file altered in place (same size and id range) is caught by its recorded sha256 and rebuilt.
    raw = np.fromfile(tmp_path / "b/train.bin", dtype=np.uint16)
    raw[:2500] = 0
    raw.tofile(tmp_path / "b/train.bin")
    with pytest.warns(RuntimeWarning, match=r"\['train'\] differ from the sha256"):
        D.prepare_synthetic(tmp_path / "b", vocab_size=0, n_train_tokens=40_000, n_val_tokens=5_000, seed=0,
                            source=cfg, chain_length=2048)
    assert (tmp_path / "b/train.bin").read_bytes() == (synth_dir / "train.bin").read_bytes()


def test_slow_mixing_source_converges():
    """lambda_0 = 0.001: power iteration needs ~30 / lambda_0 steps (it gave up at 10,000 before); the
    result satisfies the balance equations."""
    src = MarkovSource.create(MarkovSourceConfig(vocab_size=64, order=1, weights=(0.001, 0.999),
                                                 successors=(1,), buckets=(None,)))
    st = src.stationary()
    assert st.iterations > 10_000 and st.residual < 1e-13
    assert np.isfinite(src.entropies()["entropy_rate"])


# ---- batches -------------------------------------------------------------------------------------
def test_batches_are_pure_functions_of_seed_step_split(synth_dir):
    ds = D.TokenDataset.open(synth_dir)
    b = ds.batch("train", seed=7, step=3, batch_size=8, seq_len=16)
    assert b.shape == (8, 17) and b.dtype == np.int32
    again = D.TokenDataset.open(synth_dir).batch("train", seed=7, step=3, batch_size=8, seq_len=16)
    np.testing.assert_array_equal(b, again)  # a fresh reader (a resumed run) sees the same batch
    for other in (
        ds.batch("train", seed=7, step=4, batch_size=8, seq_len=16),
        ds.batch("train", seed=8, step=3, batch_size=8, seq_len=16),
        ds.batch("val", seed=7, step=3, batch_size=8, seq_len=16),
    ):
        assert not np.array_equal(b, other)
    # Rows are real windows of the stream.
    offs = ds.window_offsets("train", 7, 3, 8, 16)
    x = np.asarray(ds.tokens("train"))
    for row, o in zip(b, offs, strict=True):
        np.testing.assert_array_equal(row, x[o : o + 17])
    # Offsets cover the split, including the last valid window, and never run past it.
    many = np.concatenate([ds.window_offsets("val", 0, s, 64, 4990) for s in range(20)])
    assert many.min() >= 0 and many.max() == 5_000 - 4991


def test_host_slicing_partitions_the_global_batch(synth_dir):
    ds = D.TokenDataset.open(synth_dir)
    full = ds.batch("train", 0, 5, 12, 8)
    parts = [ds.batch("train", 0, 5, 12, 8, process_index=i, process_count=4) for i in range(4)]
    assert all(p.shape == (3, 9) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), full)
    with pytest.raises(ValueError, match="not divisible"):
        ds.batch("train", 0, 5, 10, 8, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        ds.batch("train", 0, 5, 12, 8, process_index=4, process_count=4)


def test_sequential_batch_is_seed_free_and_tiles_the_split(synth_dir):
    ds = D.TokenDataset.open(synth_dir)
    b0 = ds.sequential_batch("val", 0, 4, 10)
    x = np.asarray(ds.tokens("val"))
    np.testing.assert_array_equal(b0, np.stack([x[i * 10 : i * 10 + 11] for i in range(4)]))
    b1 = ds.sequential_batch("val", 1, 4, 10)
    np.testing.assert_array_equal(b1[0], x[40:51])


def test_memmap_round_trip_uint32(tmp_path):
    vocab = 70_000  # > 2**16 forces uint32
    toks = np.random.default_rng(0).integers(0, vocab, size=1000)
    entry = D.write_split(tmp_path, "train", toks, vocab)
    D._write_metadata(tmp_path, {"vocab_size": vocab, "dtype": D.token_dtype(vocab),
                                 "n_tokens": {"train": entry["n_tokens"]}})
    ds = D.TokenDataset.open(tmp_path)
    assert ds.dtype == np.uint32 and ds.entropy_rate is None
    np.testing.assert_array_equal(np.asarray(ds.tokens("train")), toks)


# ---- text preparation / CLI ----------------------------------------------------------------------
def test_prepare_cli_byte_level_round_trip(tmp_path):
    a = tmp_path / "a.txt"
    b = tmp_path / "b.jsonl"
    a.write_text("héllo wörld\n" * 50 + "end of a ✓\n", encoding="utf-8")
    b.write_text(json.dumps({"text": "doc one"}) + "\n\n" + json.dumps({"text": "doc two ∑"}) + "\n")
    out = tmp_path / "out"
    assert D.main(["prepare", "--input", str(a), str(b), "--out", str(out), "--val-fraction", "0.1"]) == 0
    ds = D.TokenDataset.open(out)
    assert ds.vocab_size == 320 and ds.metadata["tokenizer"]["type"] == "byte"  # 257 padded to 64
    stream = np.concatenate([np.asarray(ds.tokens("train")), np.asarray(ds.tokens("val"))])
    tok = ByteTokenizer()
    expect = [list(tok.encode(a.read_text(encoding="utf-8"))), list(tok.encode("doc one")),
              list(tok.encode("doc two ∑"))]
    expect_ids = np.concatenate([np.r_[e, 256] for e in expect])
    np.testing.assert_array_equal(stream, expect_ids)
    docs = [a.read_text(encoding="utf-8"), "doc one", "doc two ∑"]
    assert tok.decode(stream[:-1]) == "<|endoftext|>".join(docs)
    assert ds.n_tokens("val") == round(0.1 * stream.size)
    assert 0 < ds.unigram_entropy < np.log(257)


def test_cli_module_entry_point_synthetic(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "experiments.data", "synthetic", "--out", str(tmp_path), "--vocab-size", "32",
         "--train-tokens", "5000", "--val-tokens", "500", "--order", "1", "--weights", "0.2,0.8",
         "--successors", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    meta = json.loads(r.stdout)
    assert meta["generator"]["order"] == 1 and meta["entropy_rate"] < meta["unigram_entropy"]
    assert D.TokenDataset.open(tmp_path).n_tokens("val") == 500


def test_bpe_prepare_round_trip(tmp_path):
    pytest.importorskip("tokenizers")
    from experiments.tokenizers import BPETokenizer

    text = "the quick brown fox jumps over the lazy dog. " * 200
    (tmp_path / "t.txt").write_text(text)
    meta = D.prepare_text([tmp_path / "t.txt"], tmp_path / "o", tokenizer="bpe", vocab_size=300)
    ds = D.TokenDataset.open(tmp_path / "o")
    tok = BPETokenizer.from_file(tmp_path / "o" / "tokenizer.json")
    stream = np.concatenate([np.asarray(ds.tokens(s)) for s in ("train", "val")])
    assert stream.size < len(text)  # merges happened
    assert tok.decode(stream[:-1]) == text and stream[-1] == tok.eos_id
    assert meta["vocab_size"] % 64 == 0 and meta["vocab_size"] >= tok.n_tokens
    # Loading the saved tokenizer.json instead of training reproduces the stream exactly.
    D.prepare_text([tmp_path / "t.txt"], tmp_path / "o2", tokenizer="bpe",
                   tokenizer_file=tmp_path / "o" / "tokenizer.json")
    for split in ("train", "val"):
        name = f"{split}.bin"
        assert (tmp_path / "o2" / name).read_bytes() == (tmp_path / "o" / name).read_bytes()
    # A document that merely spells the end-of-text token keeps it as text: one boundary per document.
    docs = ("plain one", "before <|endoftext|> after", "plain two")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    D.prepare_text([tmp_path / "d.jsonl"], tmp_path / "o3", tokenizer="bpe",
                   tokenizer_file=tmp_path / "o" / "tokenizer.json")
    ds3 = D.TokenDataset.open(tmp_path / "o3")
    stream = np.concatenate([np.asarray(ds3.tokens(s)) for s in ("train", "val")])
    assert int((stream == tok.eos_id).sum()) == 3
    assert "before <|endoftext|> after" in tok.decode(stream)
    # An existing dataset is not replaced unless asked (a failed prepare used to leave it destroyed), and a
    # malformed tokenizer file is named.
    with pytest.raises(D.DataError, match="already holds a dataset"):
        D.prepare_text([tmp_path / "t.txt"], tmp_path / "o3")
    D.TokenDataset.open(tmp_path / "o3")
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"')
    with pytest.raises(ValueError, match="bad.json is not a tokenizers JSON file"):
        D.prepare_text([tmp_path / "t.txt"], tmp_path / "o4", tokenizer="bpe",
                       tokenizer_file=tmp_path / "bad.json")
    assert not (tmp_path / "o4").exists()
    assert D.main(["prepare", "--input", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o3"),
                   "--overwrite"]) == 0


def test_bpe_without_library_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text("hello")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` raise ImportError
    with pytest.raises(ImportError, match="pip install"):
        D.prepare_text([tmp_path / "t.txt"], tmp_path / "o", tokenizer="bpe")


# ---- bad data ------------------------------------------------------------------------------------
def _tiny_dataset(tmp_path: Path, toks, vocab=16, dtype="uint16", n=None) -> Path:
    np.asarray(toks, dtype=dtype).tofile(tmp_path / "train.bin")
    meta = {"vocab_size": vocab, "dtype": dtype, "n_tokens": {"train": len(toks) if n is None else n}}
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    return tmp_path


def test_missing_metadata_names_file(tmp_path):
    with pytest.raises(D.DataError, match=r"missing metadata file .*metadata\.json"):
        D.TokenDataset.open(tmp_path)


def test_wrong_dtype_in_metadata_names_file(tmp_path):
    d = _tiny_dataset(tmp_path, np.arange(11) % 16)  # 22 bytes of uint16
    meta = json.loads((d / "metadata.json").read_text())
    (d / "metadata.json").write_text(json.dumps({**meta, "dtype": "uint32"}))
    with pytest.raises(D.DataError, match=r"train\.bin has 22 bytes .*wrong dtype"):
        D.TokenDataset.open(d)


def test_token_id_out_of_vocab_names_file_and_position(tmp_path):
    d = _tiny_dataset(tmp_path, [1, 2, 3, 99, 4, 5, 6, 7])
    with pytest.raises(D.DataError, match=r"token id 99 >= vocab_size 16 at position 3 of .*train\.bin"):
        D.TokenDataset.open(d)
    ds = D.TokenDataset.open(d, verify_tokens=False)  # skipping the scan still never yields a bad batch
    with pytest.raises(D.DataError, match=r"token id 99 >= vocab_size 16 .*train\.bin"):
        for step in range(50):
            ds.batch("train", 0, step, 4, 4)


def test_empty_token_file_names_file(tmp_path):
    (tmp_path / "train.bin").write_bytes(b"")
    (tmp_path / "metadata.json").write_text(json.dumps({"vocab_size": 16, "dtype": "uint16",
                                                        "n_tokens": {"train": 0}}))
    with pytest.raises(D.DataError, match=r"train\.bin is empty"):
        D.TokenDataset.open(tmp_path)


def test_missing_split_file_and_bad_metadata(tmp_path):
    d = _tiny_dataset(tmp_path, np.arange(8))
    meta = json.loads((d / "metadata.json").read_text())
    (d / "metadata.json").write_text(json.dumps({**meta, "n_tokens": {"train": 8, "val": 3}}))
    with pytest.raises(D.DataError, match=r"val\.bin is missing"):
        D.TokenDataset.open(d)
    (d / "metadata.json").write_text(json.dumps({**meta, "dtype": "int8"}))
    with pytest.raises(D.DataError, match="dtype must be one of"):
        D.TokenDataset.open(d)
    (d / "metadata.json").write_text("{not json")
    with pytest.raises(D.DataError, match="not valid JSON"):
        D.TokenDataset.open(d)
    (d / "metadata.json").write_text("5")
    with pytest.raises(D.DataError, match="expected a JSON object, got int"):
        D.TokenDataset.open(d)


def test_sequence_longer_than_split_names_file(tmp_path):
    ds = D.TokenDataset.open(_tiny_dataset(tmp_path, np.arange(10)))
    ds.batch("train", 0, 0, 2, 9)  # 10 tokens hold exactly one window of 9 + 1
    with pytest.raises(D.DataError, match=r"train\.bin\) has 10 tokens, fewer than seq_len \+ 1 = 11"):
        ds.batch("train", 0, 0, 2, 10)


def test_bad_text_inputs_name_the_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(D.DataError, match=r"input file is empty: .*empty\.txt"):
        D.prepare_text([empty], tmp_path / "o")
    with pytest.raises(D.DataError, match=r"input file not found: .*nope\.txt"):
        D.prepare_text([tmp_path / "nope.txt"], tmp_path / "o")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9\n")
    with pytest.raises(D.DataError, match=r"latin\.txt is not valid UTF-8"):
        D.prepare_text([latin], tmp_path / "o")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(D.DataError, match=r"bad\.jsonl:2: expected a JSON object"):
        D.prepare_text([bad], tmp_path / "o")
    # The CLI turns these into a message and exit status 2, not a traceback.
    assert D.main(["prepare", "--input", str(empty), "--out", str(tmp_path / "o")]) == 2


# ---- boundaries and separation (each pins a behaviour a plausible one-character bug would change) ---------
@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"vocab_size": 1}, r"vocab_size must be in \[2, 2\*\*31\], got 1"),
        ({"buckets": (None, 0)}, r"buckets\[1\] \(order 2\) must be in \[1, 65536\] or None, got 0"),
        ({"seed": -1}, "seed must be >= 0, got -1"),
    ],
)
def test_bad_source_config_boundaries(kw, msg):
    with pytest.raises(ValueError, match=msg):
        MarkovSourceConfig(**kw).validate()


def test_source_config_limits_are_inclusive():
    MarkovSourceConfig(vocab_size=4096, order=2).validate()  # 4096**2 = 2**24 contexts: the limit itself
    MarkovSourceConfig(weights=(0.5, 0.0, 0.5)).validate()  # an order may have no weight; only lambda_0 > 0


def test_weights_are_normalised(small_source):
    """weights (1, 3, 6) are the same mixture as (0.1, 0.3, 0.6): the same tables (they do not depend on the
    weights) and so the same exact entropies, and every dense transition row sums to 1."""
    src = MarkovSource.create(MarkovSourceConfig(**{**SMALL.__dict__, "weights": (1.0, 3.0, 6.0)}))
    np.testing.assert_allclose(src.lambdas, [0.1, 0.3, 0.6], rtol=1e-15)
    P, _ = _dense_reference(src)
    np.testing.assert_allclose(P.sum(1), 1.0, rtol=1e-12)
    E = small_source.entropies()["entropy_rate"]
    assert src.entropies()["entropy_rate"] == pytest.approx(E, rel=1e-12)


def test_prepare_synthetic_train_and_val_are_separate_samples(tmp_path):
    """Same sizes, so the splits would be identical if they shared a sampling stream."""
    D.prepare_synthetic(tmp_path, n_train_tokens=3000, n_val_tokens=3000, source=SMALL)
    ds = D.TokenDataset.open(tmp_path)
    train, val = np.asarray(ds.tokens("train")), np.asarray(ds.tokens("val"))
    assert train.shape == val.shape == (3000,)
    assert (train != val).mean() > 0.5  # independent samples agree at a position ~H(pi)-rarely


def test_prepare_synthetic_metadata_fields(synth_dir, tmp_path):
    meta = json.loads((synth_dir / "metadata.json").read_text())
    # 40,000 tokens in ceil(40000 / 2048) = 20 chains: 19 positions start a fresh chain
    assert meta["chain_boundary_fraction"] == 19 / 40_000
    # the documented defaults for orders other than 2: weights (0.1, 0.9 / k, ...), 4 successors, no hashing
    D.prepare_synthetic(tmp_path / "o3", vocab_size=8, n_train_tokens=200, n_val_tokens=50, order=3)
    g = json.loads((tmp_path / "o3" / "metadata.json").read_text())["generator"]
    assert g["weights"] == pytest.approx([0.1, 0.3, 0.3, 0.3], rel=1e-15)
    assert (g["successors"], g["buckets"]) == ([4, 4, 4], [None, None, None])
    # a cached dataset of other sizes is not silently reused
    with pytest.raises(D.DataError, match="different dataset"):
        D.prepare_synthetic(tmp_path / "o3", vocab_size=8, n_train_tokens=300, n_val_tokens=50, order=3)


def test_window_offsets_depend_on_split_seed_and_step(tmp_path):
    """Two splits of equal size: equal offsets would read the same positions of both; and (seed, step) are
    not interchangeable (a seed + step key would give seed 0 step 1 the batches of seed 1 step 0)."""
    for split in ("train", "val"):
        D.write_split(tmp_path, split, np.arange(1000) % 7, 8)
    meta = {"vocab_size": 8, "dtype": "uint16", "n_tokens": {"train": 1000, "val": 1000}}
    D._write_metadata(tmp_path, meta)
    ds = D.TokenDataset.open(tmp_path)
    off = ds.window_offsets("train", 0, 1, 16, 8)
    assert not np.array_equal(off, ds.window_offsets("val", 0, 1, 16, 8))
    assert not np.array_equal(off, ds.window_offsets("train", 1, 0, 16, 8))


def test_sequential_batch_wraps_around(synth_dir):
    ds = D.TokenDataset.open(synth_dir)
    x = np.asarray(ds.tokens("val"))
    # 5,000 tokens hold 499 windows of 10 + 1 (starts 0, 10, ..., 4980; one at 4990 would need token 5000)
    assert ds.n_windows("val", 10) == 499
    b = ds.sequential_batch("val", 124, 4, 10)  # windows 496, 497, 498, then 499 % 499 = 0
    np.testing.assert_array_equal(b, np.stack([x[4960:4971], x[4970:4981], x[4980:4991], x[0:11]]))


def test_batch_argument_errors(synth_dir):
    ds = D.TokenDataset.open(synth_dir)
    with pytest.raises(ValueError, match=r"batch_size and seq_len must be >= 1, got 0, 8"):
        ds.batch("train", 0, 0, 0, 8)
    with pytest.raises(ValueError, match=r"seed and step must be >= 0, got seed=-1, step=0"):
        ds.batch("train", -1, 0, 4, 8)


def test_uint16_holds_a_65536_token_vocabulary(tmp_path):
    assert D.token_dtype(2**16) == "uint16" and D.token_dtype(2**16 + 1) == "uint32"
    d = _tiny_dataset(tmp_path, [0, 65535, 7], vocab=2**16)
    assert int(D.TokenDataset.open(d).tokens("train").max()) == 65535
    _tiny_dataset(tmp_path, [0, 65535, 7], vocab=2**16 + 1)
    with pytest.raises(D.DataError, match="vocab_size 65537 does not fit dtype uint16"):
        D.TokenDataset.open(d)


def test_odd_sized_token_file_names_file(tmp_path):
    d = _tiny_dataset(tmp_path, np.arange(11))
    with open(d / "train.bin", "ab") as f:
        f.write(b"\x00")  # 23 bytes: 11 whole uint16 tokens and half of another
    with pytest.raises(D.DataError, match=r"train\.bin has 23 bytes"):
        D.TokenDataset.open(d)


def test_token_id_equal_to_vocab_size_is_caught(tmp_path, monkeypatch):
    d = _tiny_dataset(tmp_path, [1, 2, 3, 16, 4, 5, 6, 7])
    with pytest.raises(D.DataError, match=r"token id 16 >= vocab_size 16 at position 3 of"):
        D.TokenDataset.open(d)
    ds = D.TokenDataset.open(d, verify_tokens=False)
    with pytest.raises(D.DataError, match=r"token id 16 >= vocab_size 16 at position 3 of"):
        ds.sequential_batch("train", 0, 2, 3)  # windows [0, 4) and [3, 7)
    # the scan goes in chunks and reports the position in the file, not in the chunk
    monkeypatch.setattr(D, "_CHUNK", 4)
    d = _tiny_dataset(tmp_path, [1, 2, 3, 4, 5, 6, 99, 7])
    with pytest.raises(D.DataError, match=r"token id 99 >= vocab_size 16 at position 6 of"):
        D.TokenDataset.open(d)


@pytest.mark.parametrize("toks", [[0, 1, -1], [0, 1, 8]])
def test_write_split_refuses_ids_outside_the_vocabulary(tmp_path, toks):
    with pytest.raises(D.DataError, match=r"token ids must be in \[0, 8\)"):
        D.write_split(tmp_path, "train", np.asarray(toks), 8)


def test_prepare_text_split_sizes_and_train_statistics(tmp_path):
    """One document of 10 bytes + end-of-text = 11 tokens; val_fraction 0.15 gives round(1.65) = 2 val tokens.
    The train split's statistics are of the train split alone."""
    (tmp_path / "t.txt").write_bytes(b"aabbbcccc\n")
    meta = D.prepare_text([tmp_path / "t.txt"], tmp_path / "o", val_fraction=0.15)
    ds = D.TokenDataset.open(tmp_path / "o")
    np.testing.assert_array_equal(np.asarray(ds.tokens("val")), [ord("\n"), 256])
    assert meta["n_tokens"] == {"train": 9, "val": 2}
    assert meta["max_token_id"] == {"train": ord("c"), "val": 256}
    # train = "aabbbcccc": counts 2, 3, 4 of 9
    p = np.array([2, 3, 4]) / 9
    assert meta["unigram_entropy"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)


def test_prepare_text_argument_boundaries(tmp_path):
    (tmp_path / "t.txt").write_text("hello world\n")
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 0"):
        D.prepare_text([tmp_path / "t.txt"], tmp_path / "o", val_fraction=0)
    with pytest.raises(ValueError, match="byte-level tokenizer needs vocab_size >= 257, got 256"):
        D.prepare_text([tmp_path / "t.txt"], tmp_path / "o", vocab_size=256)
    assert D.prepare_text([tmp_path / "t.txt"], tmp_path / "o", vocab_size=257)["vocab_size"] == 320
