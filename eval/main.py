"""`yagg eval`: flag parsing around `eval.job.evaluate`.

Exit status: 0 on success, 2 for a usage error (a bad flag, config, checkpoint or dataset), with a message that says
what to change. Heavy imports (JAX, Orbax) happen after parsing, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from parallel.distributed import add_flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yagg eval",
        description="Sample and score every finished checkpoint of a training run, once each: GIFs, samples.json, "
        "metrics.jsonl, TensorBoard scalars and an HTML gallery under WORKDIR/eval/. Any --config.FIELD=VALUE "
        "overrides a config field (e.g. --config.eval.prompts=shapes).",
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="the configs/*.py file the run was trained with")
    parser.add_argument("--workdir", required=True, help="the training run's folder (WORKDIR/checkpoints/STEP)")
    parser.add_argument(
        "--follow",
        action="store_true",
        help="keep waiting for new checkpoints until training has finished (its last step is evaluated)",
    )
    parser.add_argument("--step", type=int, help="evaluate only this checkpoint (again, if it was evaluated before)")
    add_flags(parser)
    return parser


def main(argv: Sequence[str]) -> int:
    """`yagg eval ARGS`; returns the exit status."""
    args, rest = build_parser().parse_known_args(list(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file it opens at INFO
    strays = [a for a in rest if not a.startswith("--config.")]
    if strays:
        print(
            f"yagg eval: error: unrecognised argument(s) {' '.join(strays)} (overrides are --config.a.b=value)",
            file=sys.stderr,
        )
        return 2

    from contracts.checkpoint import ReadError
    from contracts.dataset import DataError
    from eval.job import EvalError, evaluate
    from inference.generator import GenerateError
    from parallel.distributed import initialize_distributed
    from parallel.mesh import MeshError
    from yagg.config import ConfigError, load_config

    try:
        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
        config = load_config(args.config, rest)
        steps = evaluate(config, args.workdir, follow=args.follow, step=args.step)
    except (ConfigError, DataError, MeshError, ReadError, GenerateError, EvalError) as e:
        print(f"yagg eval: error: {e}", file=sys.stderr)
        return 2
    print(f"evaluated {len(steps)} checkpoint(s) {steps}; gallery: {args.workdir}/eval/index.html")
    summary = latest_summary(Path(args.workdir) / "eval")
    if summary:
        print(summary)
    return 0


# The scores the one-line summary shows, when present: the shapes probe, else the validation loss.
SUMMARY_METRICS = (
    "probe/color_acc",
    "probe/direction_acc",
    "probe/heldout_color_acc",
    "probe/heldout_direction_acc",
    "val/loss",
)


def latest_summary(eval_dir: Path) -> str:
    """One line with the newest evaluated step's headline scores (empty before any evaluation)."""
    from contracts.scores import read_rows

    rows = read_rows(str(eval_dir))
    if not rows:
        return ""
    row = max(rows, key=lambda r: r["step"])
    line = "  ".join(f"{name} {row[name]:.3f}" for name in SUMMARY_METRICS if name in row)
    return f"step {row['step']}: {line}"
