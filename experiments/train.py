"""Training CLI.

    python -m experiments.train --preset tiny --workdir runs/tiny [--set section.field=value ...]

Re-running the same command resumes from the newest checkpoint in the workdir (and does nothing once the run
has finished). Writes WORKDIR/config.json, metrics.jsonl, tensorboard/, checkpoints/ and, at the end,
summary.json (schema in the README).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from experiments.presets import PRESETS

    p = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", help=f"named preset: {', '.join(PRESETS)} (default: tiny)")
    p.add_argument("--workdir", help="run directory (created; re-use it to resume)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config field, e.g. --set optimizer.name=muon (repeatable)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    args = p.parse_args(argv)
    if args.workdir is None and not args.print_config:
        p.error("--workdir is required")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Multi-host start-up must precede any other JAX call.
    from experiments.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()

    import json

    from experiments.checkpoint import CheckpointError
    from experiments.config import ConfigError
    from experiments.data import DataError
    from experiments.presets import get_preset
    from experiments.trainer import NonFiniteLossError, train

    try:
        cfg = get_preset(args.preset).override(args.overrides).validate()
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        train(cfg, args.workdir)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:  # missing or malformed token files: say which, without a traceback
        print(f"data error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: re-run the same command (same --workdir {args.workdir}) to resume from the "
              "last checkpoint (every trainer.checkpoint_every steps; with 0 only the final step is saved, "
              "so the run starts over)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
