"""`yagg train` / `python -m train.main`: parses flags, joins the multi-process job, calls `train_and_evaluate`.

    python -m train.main --config configs/demo.py --workdir runs/demo/train [--config.num_train_steps=200 ...]
    # one of several processes (GPU hosts, or CPU processes on one machine):
    python -m train.main --config C --workdir W --coordinator_address HOST:PORT --num_processes N --process_id I

On a Cloud TPU VM the processes find each other without flags. Exit status: 0 when training finished or was
preempted (SIGTERM: a checkpoint was saved and a restart resumes), 1 when the loss became non-finite, 2 for a usage
error (a bad flag, config, mesh or dataset).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from parallel.distributed import add_flags

log = logging.getLogger("train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yagg train",
        description="Train the text-to-GIF diffusion model on ArrayRecord shards; resumes from WORKDIR's newest "
        "checkpoint. Any --config.FIELD=VALUE overrides a config field (e.g. --config.batch_size=64).",
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="a configs/*.py file (get_config())")
    parser.add_argument(
        "--workdir",
        required=True,
        help="checkpoints, metrics.jsonl, TensorBoard events, samples: a local path or gs://",
    )
    add_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs training; returns the exit status described in the module docstring."""
    args, rest = build_parser().parse_known_args(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Orbax logs several INFO lines (through absl) per checkpoint; its warnings still show.
    logging.getLogger("absl").setLevel(logging.WARNING)
    strays = [a for a in rest if not a.startswith("--config.")]
    if strays:
        print(
            f"yagg train: error: unrecognised argument(s) {' '.join(strays)} (overrides are --config.a.b=value)",
            file=sys.stderr,
        )
        return 2

    # Imported here so that `--help` and flag errors answer before JAX loads.
    from parallel.distributed import initialize_distributed
    from train.loop import NonFiniteLossError, UsageErrors, train_and_evaluate
    from yagg.config import load_config

    try:
        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
        config = load_config(args.config, rest)
        train_and_evaluate(config, args.workdir)
    except UsageErrors as e:
        print(f"yagg train: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"yagg train: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
