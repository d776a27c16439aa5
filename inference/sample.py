"""`yagg sample`: GIFs for text prompts from a training workdir, one checkpoint, or an exported model.

    yagg sample --workdir runs/demo "a red circle moving left" --out red-left.gif --num 4 --scale 8
    yagg sample --model exported/ "a red circle moving left" --negative "a blue square" --out red.gif

Clips come from the inference core (inference/generator.py), the same one `yagg eval`, training's periodic samples and
the server use: `yagg sample PROMPT --seed S` reproduces, byte for byte, what any of them drew for PROMPT with seed S
and the same settings from the same parameters.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EPILOG = """\
Output names: with one prompt and --num 1 the GIF is OUT itself; otherwise OUT-PPP-NN.gif beside it, PPP the prompt's
index and NN the sample's (both from 0), e.g. out-000-00.gif, out-000-01.gif, out-001-00.gif. Sample n of every prompt
starts from the noise of seed SEED + n. The command prints each file with its prompt and seed."""


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """`yagg sample`'s settings; None means the model config's `sampling` section decides."""

    num_steps: int | None = None
    guidance_scale: float | None = None
    method: str | None = None
    eta: float | None = None
    seed: int = 0  # sample n of each prompt uses seed + n
    num: int = 1  # samples per prompt
    scale: int = 1  # nearest-neighbour upscaling factor of the written GIFs
    negative: str | None = None  # one negative prompt for every prompt
    raw_params: bool = False  # the trained parameters instead of their EMA
    text_encoder: str | None = None  # overrides the dataset's text encoder


def output_paths(out: str | Path, num_prompts: int, num: int) -> list[list[str]]:
    """Where `yagg sample` writes (a local path or gs://): OUT itself for one prompt and one sample, else
    OUT-PPP-NN.gif beside it (prompt index PPP, sample index NN, both from 0); paths[p][n]."""
    from contracts import storage
    from inference.generator import GenerateError

    try:
        out = storage.check(os.fspath(out), "--out")
    except storage.PathError as e:
        raise GenerateError(str(e)) from e
    if not out.lower().endswith(".gif"):
        raise GenerateError(f"--out {out}: the output must be a .gif file name")
    if num_prompts == 1 and num == 1:
        return [[out]]
    stem = out[: -len(".gif")]
    return [[f"{stem}-{p:03d}-{n:02d}.gif" for n in range(num)] for p in range(num_prompts)]


def sample_to_gifs(
    prompts: Sequence[str], out: str | Path, options: SampleOptions, *, source: str, kind: str | None = None
) -> list[dict]:
    """Writes options.num GIFs per prompt (names: `output_paths`) from `source`, of `kind` "workdir", "checkpoint" or
    "model" (`Generator.load`); returns one record per GIF ({"file", "prompt", "seed", "step"}). GenerateError for
    anything the user can fix."""
    from contracts import media
    from inference.generator import GenerateError, Generator

    if not prompts:
        raise GenerateError("give at least one prompt")
    if options.num < 1 or options.scale < 1:
        raise GenerateError(f"--num and --scale must be at least 1, got {options.num} and {options.scale}")
    paths = [path for row in output_paths(out, len(prompts), options.num) for path in row]
    generator = Generator.load(source, kind=kind, raw_params=options.raw_params, text_encoder=options.text_encoder)
    rows = [p for p in prompts for _ in range(options.num)]
    seeds = [options.seed + n for _ in prompts for n in range(options.num)]
    clips = generator.generate(
        rows,
        seeds,
        steps=options.num_steps,
        guidance=options.guidance_scale,
        method=options.method,
        eta=options.eta,
        negative_prompts=[options.negative] * len(rows),
    )
    written: list[dict[str, Any]] = []
    for pixels, prompt, seed, path in zip(clips.pixels, rows, seeds, paths, strict=True):
        media.write_gif(path, media.upscale(pixels, options.scale), clips.fps)
        written.append({"file": str(path), "prompt": prompt, "seed": seed, "step": clips.step})
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yagg sample",
        description="Generate GIFs for text prompts from a training run's checkpoint (its EMA parameters by default) "
        "or from an exported model (`yagg export`).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help='e.g. "a red circle moving left"')
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a training run's folder: its newest finished checkpoint is used")
    source.add_argument("--checkpoint", help="one checkpoint folder, WORKDIR/checkpoints/STEP")
    source.add_argument("--model", help="an exported model folder (yagg export)")
    parser.add_argument(
        "--out",
        required=True,
        help="output .gif (see below for several prompts or --num > 1); every path: local or gs://",
    )
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's sampling.num_steps)")
    parser.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale, 1 = none (default: sampling.guidance_scale)"
    )
    parser.add_argument(
        "--negative",
        metavar="PROMPT",
        help="a negative prompt: guidance pushes every sample away from it instead of away from 'no text'",
    )
    parser.add_argument("--seed", type=int, default=0, help="noise seed of the first sample of each prompt (0)")
    parser.add_argument("--method", choices=("ddim", "ddpm"), help="sampler (default: the model's sampling.method)")
    parser.add_argument("--eta", type=float, help="DDIM noise, 0 deterministic to 1 ancestral (default: sampling.eta)")
    parser.add_argument("--num", type=int, default=1, help="samples per prompt (1)")
    parser.add_argument("--scale", type=int, default=1, help="nearest-neighbour upscaling factor for viewing (1)")
    parser.add_argument("--raw-params", action="store_true", help="the trained parameters instead of their EMA")
    parser.add_argument(
        "--text-encoder",
        help="the CLIP that embedded the training data (default: the one the dataset or the export names; needed "
        "only when that one is not on this machine)",
    )
    return parser


def main(argv: Sequence[str]) -> int:
    """`yagg sample ARGS`; returns the exit status (2 for a usage error, with a message saying what to change)."""
    args = build_parser().parse_args(list(argv))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from inference.generator import GenerateError

    options = SampleOptions(
        num_steps=args.steps,
        guidance_scale=args.guidance,
        method=args.method,
        eta=args.eta,
        seed=args.seed,
        num=args.num,
        scale=args.scale,
        negative=args.negative,
        raw_params=args.raw_params,
        text_encoder=args.text_encoder,
    )
    try:
        kind = "model" if args.model else "checkpoint" if args.checkpoint else "workdir"
        source = args.model or args.checkpoint or args.workdir
        written = sample_to_gifs(args.prompts, args.out, options, source=source, kind=kind)
    except GenerateError as e:
        print(f"yagg sample: error: {e}", file=sys.stderr)
        return 2
    for record in written:
        print(f"{record['file']}\tstep {record['step']}\tseed {record['seed']}\t{record['prompt']}")
    return 0
