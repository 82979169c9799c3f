"""Does fetching metrics one step late (``trainer.async_metrics``) speed up the training loop here?

    python -m experiments.bench_metrics_fetch [--preset tiny] [--steps 60] [--rounds 3] [--set k=v ...]

Trains the same run with synchronous and asynchronous metric fetches, alternating (sync, async, sync, ...)
``--rounds`` times in one process so drift in machine load hits both alike, and prints the training
tokens/s of each (the trainer's own ``train_seconds``: compilation, eval and checkpoints excluded) and the
median ratio async / sync. Every run logs every step (``log_every=1``), the trainer's worst case for host
work between steps. The answer decides ``async_metrics``'s default per platform (experiments/trainer.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from experiments.config import ConfigError
from experiments.presets import get_preset
from experiments.trainer import train


def measure(preset: str, steps: int, rounds: int, overrides: Sequence[str] = (),
            log=print) -> dict:
    base = [f"trainer.steps={steps}", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_steps=1",
            "trainer.checkpoint_every=0", "trainer.progress=false", *overrides]
    rows: dict[str, list[float]] = {"sync": [], "async": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for mode in ("sync", "async"):
                cfg = get_preset(preset).override(
                    [*base, f"trainer.async_metrics={'true' if mode == 'async' else 'false'}"])
                summary = train(cfg, Path(tmp) / f"{mode}{r}", log=lambda s: None)
                tps = summary["tokens_per_second"]
                rows[mode].append(tps)
                log(f"round {r} {mode:>5}: {tps:,.0f} tok/s")
    ratios = [a / s for a, s in zip(rows["async"], rows["sync"], strict=True)]
    out = {"preset": preset, "steps": steps, "tokens_per_second": rows, "ratios": ratios,
           "median_ratio_async_over_sync": statistics.median(ratios)}
    log(f"async / sync tokens/s: median {out['median_ratio_async_over_sync']:.3f} "
        f"(per round {', '.join(f'{x:.3f}' for x in ratios)})")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    try:
        out = measure(a.preset, a.steps, a.rounds, a.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
