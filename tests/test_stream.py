"""The synthetic training stream (experiments/stream.py, data.stream): exact stationary windows, pure in
(seed, step), split across hosts without changing the global batch, and a run that never repeats data."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from experiments import data as D
from experiments.stream import SyntheticStream
from experiments.synthetic import MarkovSource, MarkovSourceConfig

SMALL = MarkovSourceConfig(vocab_size=20, order=2, weights=(0.1, 0.3, 0.6), successors=(4, 3), seed=3)


@pytest.fixture(scope="module")
def stream() -> SyntheticStream:
    return SyntheticStream(MarkovSource.create(SMALL))


def test_file_sampler_output_is_unchanged():
    """Corpora are cached by their generator parameters (prepare_synthetic), so the file sampler must keep
    producing the same tokens from the same parameters and seed; the chain stepping it now shares with the
    stream must not change them. The hash was taken from the sampler before that refactor (and depends on
    numpy's PCG64 streams, which numpy keeps stable: a change there would change every corpus too)."""
    x = MarkovSource.create(SMALL).sample(50_000, np.random.default_rng(7), chain_length=512)
    assert x.dtype == np.int32 and x.shape == (50_000,)
    assert hashlib.sha256(x.tobytes()).hexdigest()[:16] == "8edb589cbe8268f8"


def test_alias_tables_reproduce_every_conditional_law():
    """The stream steps through Walker alias tables: column j drawn w.p. 1/K, then its own successor w.p. q,
    else its alias. The law that implies, per context, must be the sparse part of p(x | c) (up to q's
    fixed-point rounding), for every one of the V**k contexts."""
    src = MarkovSource.create(SMALL)
    words, b = src._alias_tables()
    assert b == 5  # ids of V=20 need 5 bits, leaving 54 for q
    cols, vals = src._sparse_parts()
    C, K = cols.shape
    rows_CxK = np.broadcast_to(np.arange(C)[:, None], (C, K))
    mask = (1 << b) - 1
    keep, other = (words >> np.uint64(b)) & np.uint64(mask), words & np.uint64(mask)
    q = (words >> np.uint64(2 * b)).astype(np.float64) / 2.0 ** (64 - 2 * b)
    implied, target = np.zeros((C, SMALL.vocab_size)), np.zeros((C, SMALL.vocab_size))
    np.add.at(implied, (rows_CxK, keep.astype(np.int64)), q / K)
    np.add.at(implied, (rows_CxK, other.astype(np.int64)), (1.0 - q) / K)
    np.add.at(target, (rows_CxK, cols), vals / vals.sum(1, keepdims=True))
    np.testing.assert_array_equal(np.sort(keep, 1), np.sort(cols, 1))
    np.testing.assert_allclose(implied, target, atol=1e-12)


def test_batches_are_pure_in_seed_and_step(stream):
    a = stream.batch(0, 5, 6, 31)
    assert a.dtype == np.int32 and a.shape == (6, 32)
    assert 0 <= a.min() and a.max() < SMALL.vocab_size
    np.testing.assert_array_equal(a, stream.batch(0, 5, 6, 31))
    assert not np.array_equal(a, stream.batch(0, 6, 6, 31))
    assert not np.array_equal(a, stream.batch(1, 5, 6, 31))
    # a row depends only on (seed, step, row): a larger batch starts with the same rows
    np.testing.assert_array_equal(stream.batch(0, 5, 12, 31)[:6], a)
    with pytest.raises(ValueError, match="seed and step must be >= 0"):
        stream.batch(0, -1, 6, 31)


def test_hosts_draw_their_rows_of_the_one_global_batch(stream):
    whole = stream.batch(3, 2, 8, 15)
    parts = [stream.batch(3, 2, 8, 15, process_index=i, process_count=4) for i in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    with pytest.raises(ValueError, match="not divisible by process_count 3"):
        stream.batch(3, 2, 8, 15, process_index=0, process_count=3)


def test_windows_are_stationary_sample_paths(stream):
    """Every position of a window follows the stationary law (a window started from a uniform context would
    not: its first tokens would be uniform, TV ~0.3 from this Zipf marginal), and the true model's mean loss
    on streamed tokens estimates the exact entropy rate (per-row means are independent: an honest SE)."""
    src = stream.source
    V, k = SMALL.vocab_size, SMALL.order
    marginal = src.stationary().pi.reshape(V, V).sum(0)
    x = stream.batch(0, 0, 8000, 7)
    for pos in (0, 1, 2, 7):
        freq = np.bincount(x[:, pos], minlength=V) / len(x)
        assert 0.5 * np.abs(freq - marginal).sum() < 0.04, pos
    rows = stream.batch(1, 0, 400, 255)
    nll_RxT = np.empty((len(rows), rows.shape[1] - k))
    ctx = rows[:, 0].astype(np.int64) * V + rows[:, 1]
    for t in range(k, rows.shape[1]):
        nll_RxT[:, t - k] = -src.log_prob(ctx, rows[:, t])
        ctx = (ctx % V) * V + rows[:, t]
    per_row = nll_RxT.mean(1)
    se = per_row.std(ddof=1) / math.sqrt(len(per_row))
    assert abs(per_row.mean() - src.entropies()["entropy_rate"]) < 4 * se


def test_a_non_synthetic_dataset_is_refused(tmp_path):
    D.write_split(tmp_path, "train", np.arange(100) % 7, 8)
    D.write_split(tmp_path, "val", np.arange(100) % 7, 8)
    meta = {"format": D.FORMAT, "format_version": 1, "vocab_size": 8, "dtype": "uint16",
            "n_tokens": {"train": 100, "val": 100}, "tokenizer": {"type": "byte"}}
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(D.DataError, match="is not a synthetic dataset.*set data.stream=false"):
        SyntheticStream.of(D.TokenDataset.open(tmp_path))


def test_a_streamed_run_trains_on_fresh_windows_and_repeats_nothing(tmp_path):
    """A run reading 3x its train split: with data.stream it warns of no repetition, records no epochs, and
    its batches are the stream's; the same run from files warns and counts 3 epochs."""
    import jax

    from experiments.presets import get_preset
    from experiments.trainer import build_program, data_warnings, open_dataset, train, train_batch

    base = [
        "model.vocab_size=64", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
        "model.max_seq_len=16", "data.synthetic.vocab_size=64", "data.synthetic.successors=[4, 2]",
        f"data.synthetic_dir={tmp_path / 'data'}", "data.n_train_tokens=256", "data.n_val_tokens=256",
        "data.seq_len=16", "data.batch_size=4", "trainer.steps=12", "trainer.eval_steps=1",
        "trainer.progress=false", "optimizer.warmup_steps=1", "mesh.data=1",
    ]
    files = get_preset("tiny").override(base).validate()
    streamed = get_preset("tiny").override([*base, "data.stream=true"]).validate()
    ds = open_dataset(files, tmp_path)
    (warning,) = data_warnings(files, ds)
    assert "3.00 epochs" in warning
    assert data_warnings(streamed, ds) == []

    lines = []
    s = train(streamed, tmp_path / "run", devices=jax.devices()[:1], log=lines.append)
    assert s["epochs"] is None and s["tokens"] == 12 * 4 * 16 and math.isfinite(s["final_eval_loss"])
    assert not any("epochs" in line for line in lines)
    prog = build_program(streamed, jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                                                     ("data", "fsdp", "tensor")))
    stream = SyntheticStream.of(ds)
    got = np.asarray(train_batch(ds, streamed, prog, 7, stream)).reshape(4, 17)
    np.testing.assert_array_equal(got, stream.batch(streamed.seed, 7, 4, 16))
    # every window is fresh: none of them occurs in the 256-token train split the files would repeat
    split = np.asarray(ds.tokens("train"))
    windows = {tuple(split[i : i + 17]) for i in range(len(split) - 16)}
    assert not any(tuple(row) in windows for row in got)


def test_batches_replay_the_documented_generator(stream):
    """Row r of step s reads its block of draws of ONE generator seeded [seed, s, STREAM_KEY] (module
    docstring): replaying that by hand gives the batch. seed and step are not interchangeable, and the key
    keeps the stream off the file loader's generator: numpy pads a short SeedSequence entropy with zeros, so
    [seed, step] would be default_rng([seed, step, 0]), the train split's window-offset generator."""
    from experiments.stream import STREAM_KEY

    src = stream.source
    B, L = 5, 12
    U = 1 + (L + 1) - SMALL.order  # one uniform for the start context, one per token after it
    u = np.random.Generator(np.random.PCG64(np.random.SeedSequence([2, 9, STREAM_KEY]))).random((B, U))
    np.testing.assert_array_equal(stream.batch(2, 9, B, L), src.sample_windows(u, L + 1))
    assert not np.array_equal(stream.batch(0, 1, B, L), stream.batch(1, 0, B, L))
    u_file = np.random.default_rng([2, 9, D.split_id("train")]).random((B, U))
    assert not np.array_equal(stream.batch(2, 9, B, L), src.sample_windows(u_file, L + 1))
