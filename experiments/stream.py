"""A training stream drawn fresh from the synthetic source: no window is ever a repeat.

A prepared corpus is a fixed number of tokens, and windows drawn from it with replacement repeat data once a
run reads more than the train split holds, while a scaling law fitted on a run's tokens reads them as unique
(Muennighoff et al. 2023, "Scaling Data-Constrained Language Models", arXiv:2305.16264, measure what
repetition costs). A cluster sweep reads ~1e10 tokens per run, far past what is worth writing to disk, so
with ``data.stream`` a synthetic run samples every training window from the Markov source itself.

Each window is an exact stationary sample path of ``seq_len + 1`` tokens (up to the alias tables' fixed-point
probabilities, 2**-44 for V=1024), and row ``r`` of step ``s`` reads its own block of draws of one generator
seeded ``[seed, s, STREAM_KEY]``: a batch is a pure function of (seed, step) as with a file (resuming needs no
iterator state), and each host jumps to its own rows of the global batch.
The validation split stays the prepared file, so every run of a study is scored on one fixed set.

Cost: the rows' chains are stepped together one position at a time, so the rate grows with the batch; each
step reads one packed alias-table word per row (``MarkovSource._alias_tables``). ``python -m
experiments.bench_stream`` on one core of the 2-core CPU machine, V=1024 source of the GPU presets, seq_len
512: 7.4 Mtok/s at batch 64, 17.0 at 256, 23.2 at 1024 (0.04-0.12x the rate of copying windows from a prepared
corpus, which needs no sampling; the same command on 658fa16, before the alias tables and the one generator
per step, measured 5.2, 7.7 and 8.0). The trainer draws step s+1's batch while the device runs step s, so this
is hidden unless the device is faster: gpu-full's smallest model (7M params, batch 256) would train at ~8e6
tokens/s at 40% of an H100's bf16 peak (an estimate, not a measurement), half the stream's rate; its larger
models, which take nearly all the compute, are far slower per token. gpu-quick (batches of 32-64 on models
down to 0.24M params, 8-minute target) keeps its prepared corpus: the stream gives 7.4 Mtok/s at batch 64 and
less below.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from experiments.data import DataError, TokenDataset, check_batch_args, host_rows
from experiments.synthetic import MarkovSource, cached_source, config_from_dict

STREAM_KEY = 0x57EA  # in every row's seed, so stream draws share no generator with the file-based loaders


@dataclass(frozen=True)
class SyntheticStream:
    """Training batches sampled on the fly from a dataset's synthetic source."""

    source: MarkovSource

    @classmethod
    def of(cls, ds: TokenDataset) -> SyntheticStream:
        if "generator" not in ds.metadata:
            raise DataError(
                f"data.stream samples training windows from the synthetic source, and {ds.directory} is not "
                "a synthetic dataset (its metadata.json has no 'generator'); set data.stream=false"
            )
        return cls(cached_source(config_from_dict(ds.metadata["generator"])))

    def batch(
        self,
        seed: int,
        step: int,
        batch_size: int,
        seq_len: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ) -> np.ndarray:
        """int32 [batch_size // process_count, seq_len + 1], the same layout as ``TokenDataset.batch``."""
        check_batch_args(seed, step, batch_size, seq_len)
        rows = host_rows(np.arange(batch_size), process_index, process_count)  # contiguous
        per_row = self.source.window_uniforms(seq_len + 1)
        # One generator per (seed, step); row r reads its draws r*per_row .. (r+1)*per_row - 1, and a host
        # jumps to its first row with PCG64.advance (one 64-bit output per float64 draw) instead of drawing
        # the rows before it (seeding one generator per row cost more than drawing the row's uniforms).
        bits = np.random.PCG64(np.random.SeedSequence([seed, step, STREAM_KEY]))
        bits.advance(int(rows[0]) * per_row)
        u_RxU = np.random.Generator(bits).random((len(rows), per_row))
        return self.source.sample_windows(u_RxU, seq_len + 1)
