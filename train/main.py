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
import glob
import logging
import sys
from collections.abc import Sequence

log = logging.getLogger("train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yagg train",
        description="Train the text-to-GIF diffusion model on ArrayRecord shards; resumes from WORKDIR's newest "
        "checkpoint. Any --config.FIELD=VALUE overrides a config field (e.g. --config.batch_size=64).",
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="a configs/*.py file (get_config())")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard events, samples")
    parser.add_argument(
        "--coordinator_address",
        help="HOST:PORT of process 0, for a job of several processes (not needed on Cloud TPU VMs)",
    )
    parser.add_argument("--num_processes", type=int, help="number of processes in the job (with --coordinator_address)")
    parser.add_argument("--process_id", type=int, help="this process's index, 0..N-1 (with --coordinator_address)")
    return parser


def _on_cloud_tpu_vm() -> bool:
    # TPU VMs expose their chips as /dev/accel* (v2-v4) or /dev/vfio/N (v5e and later).
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def initialize_distributed(args: argparse.Namespace) -> None:
    """Joins the multi-process job (before anything touches a JAX backend); a single process needs nothing.

    Raises ConfigError for an incomplete or inconsistent set of the three flags."""
    import jax

    from yagg.config import ConfigError  # these flags configure the run as much as the config file does

    explicit = (args.coordinator_address, args.num_processes, args.process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ConfigError("--coordinator_address, --num_processes and --process_id go together: give all three")
        if not 0 <= args.process_id < args.num_processes:
            raise ConfigError(f"--process_id must be in [0, {args.num_processes}), got {args.process_id}")
        # CPU processes exchange data over gloo (TCP); the default CPU backend has no cross-process collectives.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    elif _on_cloud_tpu_vm():
        jax.distributed.initialize()  # the TPU runtime tells every worker the coordinator, count and index


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
    from train.loop import NonFiniteLossError, UsageErrors, train_and_evaluate
    from yagg.config import load_config

    try:
        initialize_distributed(args)
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
