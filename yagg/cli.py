"""The `yagg` command: one subcommand per job, each a thin wrapper over an importable function.

Heavy imports (JAX, Beam) happen inside the handlers, so `yagg --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _make_shapes(args: argparse.Namespace) -> None:
    from pipeline.shapes import make_shapes

    manifest = make_shapes(args.out, num=args.num, seed=args.seed)
    print(f"wrote {args.num} GIFs, {manifest}, labels.jsonl and heldout.json under {args.out}")


def _make_tiny_clip(args: argparse.Namespace) -> None:
    from model.tiny_clip import make_tiny_clip

    out = make_tiny_clip(args.out, seed=args.seed)
    print(f"wrote a tiny random CLIP (Hugging Face layout) to {out}")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yagg",
        description="yet another GIF generator: captioned GIFs -> ArrayRecord -> 3D U-Net diffusion -> scored GIFs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("make-shapes", help="write the moving-shapes dataset (GIFs, manifest.tsv, labels.jsonl)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num", type=int, default=512, help="number of training clips (default 512)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same files")
    p.set_defaults(handler=_make_shapes)

    p = sub.add_parser("make-tiny-clip", help="write a tiny random CLIP in the Hugging Face layout (for tests, demo)")
    p.add_argument("--out", required=True, help="output folder; pass it wherever a CLIP name is taken")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same files")
    p.set_defaults(handler=_make_tiny_clip)

    for name, help_text in PASSTHROUGH_HELP.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _passthrough_commands() -> dict[str, Callable[[Sequence[str]], int | None]]:
    """Subcommands with many flags of their own: their module parses the rest of the command line."""

    def preprocess(argv: Sequence[str]) -> int | None:
        from pipeline.run import main

        return main(argv)

    def train(argv: Sequence[str]) -> int | None:
        from train.main import main

        return main(argv)

    def evaluate(argv: Sequence[str]) -> int | None:
        from eval.main import main

        return main(argv)

    def sample(argv: Sequence[str]) -> int | None:
        from inference.sample import main

        return main(argv)

    def export(argv: Sequence[str]) -> int | None:
        from inference.export import main

        return main(argv)

    def serve(argv: Sequence[str]) -> int | None:
        from serve.main import main

        return main(argv)

    def model_info(argv: Sequence[str]) -> int | None:
        from model.info import main

        return main(argv)

    def fvd(argv: Sequence[str]) -> int | None:
        from eval.main import main_fvd

        return main_fvd(argv)

    return {
        "preprocess": preprocess,
        "train": train,
        "eval": evaluate,
        "sample": sample,
        "export": export,
        "serve": serve,
        "model-info": model_info,
        "fvd": fvd,
    }


PASSTHROUGH_HELP = {
    "preprocess": "run the Beam job: captioned GIF manifest -> ArrayRecord shards (see `yagg preprocess --help`)",
    "train": "train the diffusion model on a device mesh; resumes from the workdir (see `yagg train --help`)",
    "eval": "sample and score every checkpoint of a run: GIFs, metrics, TensorBoard, HTML gallery (`yagg eval --help`)",
    "sample": "write GIFs for text prompts from a checkpoint or an exported model (see `yagg sample --help`)",
    "export": "write a self-contained model folder from a checkpoint (see `yagg export --help`)",
    "serve": "serve a model over HTTP: batched generation, jobs with progress, a web page (`yagg serve --help`)",
    "model-info": "parameters, training FLOPs and activation memory of a config's model (`yagg model-info --help`)",
    "fvd": "Fréchet Video Distance (Kinetics-400 I3D) between two sets of GIFs or datasets (see `yagg fvd --help`)",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = _passthrough_commands()
    if argv and argv[0] in passthrough:
        return int(passthrough[argv[0]](argv[1:]) or 0)
    args = _build_parser().parse_args(argv)
    args.handler(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
