"""How fast does ``data.stream`` draw training batches, against reading windows of a prepared corpus?

    python -m experiments.bench_stream [--steps 20] [--json out.json]

For each source (cpu presets' V=256 and the GPU presets' V=1024, order 2) and batch shape, times
``SyntheticStream.batch`` and, as the baseline in the same process, ``TokenDataset.batch`` on a corpus of
that source, and prints both in tokens/s and their ratio. The stream steps its rows' chains together, one
token position at a time, so its rate grows with the batch; the file loader copies contiguous windows. It also
times the stream's stepper (alias tables) against the corpus sampler's (inverse CDF) on the same draws.
One-off costs (building the source and its stepping tables, generating the corpus) are reported apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments.data import TokenDataset, config_dict, prepare_synthetic
from experiments.stream import SyntheticStream
from experiments.synthetic import MarkovSource, MarkovSourceConfig

SOURCES = {
    "cpu (V=256)": MarkovSourceConfig(),
    "gpu (V=1024)": MarkovSourceConfig(vocab_size=1024, order=2, successors=(16, 8)),
}
SHAPES = ((16, 128), (64, 512), (256, 512), (1024, 512))  # (batch, seq_len)


def _rate(draw, steps: int, tokens_per_batch: int) -> float:
    draw(0)  # first-call costs (lazy tables) are not throughput
    t0 = time.perf_counter()
    for s in range(1, steps + 1):
        draw(s)
    return steps * tokens_per_batch / (time.perf_counter() - t0)


def _stepper_ratio(src: MarkovSource, batch: int, seq_len: int, steps: int) -> float:
    """Chain stepping alone, on the same contexts and uniforms: the stream's alias stepper over the corpus
    sampler's inverse-CDF one (the stream's stepper before the alias tables), as a rate ratio; the faster of
    ``steps`` alternating rounds of each."""
    rng = np.random.default_rng(0)
    ctx_R = rng.integers(0, src.n_contexts, batch)
    v_SxR = rng.random((seq_len, batch))
    out_SxR = np.empty((seq_len, batch), dtype=np.int32)
    best = {"alias": np.inf, "icdf": np.inf}
    for _ in range(max(2, steps // 4)):
        for name, step in (("alias", src._advance_alias), ("icdf", src._advance)):
            t0 = time.perf_counter()
            step(ctx_R, v_SxR, out_SxR)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best["icdf"] / best["alias"]


def measure(steps: int, log=print) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in SOURCES.items():
            t0 = time.perf_counter()
            src = MarkovSource.create(cfg)
            src.stationary()
            src._alias_tables()
            build = time.perf_counter() - t0
            t0 = time.perf_counter()
            src._step_tables()
            build_icdf = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = Path(tmp) / name.split()[0]
            prepare_synthetic(out, n_train_tokens=4_000_000, n_val_tokens=10_000, **config_dict(cfg))
            generate = time.perf_counter() - t0
            log(f"{name}: source and alias tables built in {build:.2f} s (the corpus sampler's inverse-CDF "
                f"tables: {build_icdf:.2f} s more); a 4M-token corpus generated in {generate:.2f} s")
            ds, stream = TokenDataset.open(out), SyntheticStream(src)
            for B, L in SHAPES:
                n = B * (L + 1)
                s_rate = _rate(lambda s, B=B, L=L, st=stream: st.batch(0, s, B, L), steps, n)
                f_rate = _rate(lambda s, B=B, L=L, ds=ds: ds.batch("train", 0, s, B, L), steps, n)
                alias_over_icdf = _stepper_ratio(src, B, L, steps)
                row = {"source": name, "batch": B, "seq_len": L, "stream_tokens_per_s": s_rate,
                       "file_tokens_per_s": f_rate, "stream_over_file": s_rate / f_rate,
                       "stream_ms_per_batch": 1e3 * n / s_rate, "alias_over_inverse_cdf": alias_over_icdf}
                rows.append(row)
                log(f"  batch {B:>4} x {L}: stream {s_rate / 1e6:6.2f} Mtok/s "
                    f"({row['stream_ms_per_batch']:6.1f} ms/batch), file {f_rate / 1e6:7.2f} Mtok/s, "
                    f"stream / file {s_rate / f_rate:.3f}; alias / inverse-CDF "
                    f"stepping {alias_over_icdf:.2f}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.steps < 1:
        print(f"error: --steps must be >= 1, got {a.steps}", file=sys.stderr)
        return 2
    rows = measure(a.steps)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
