"""`yagg preprocess` / `python -m pipeline.run`: the Beam job from captioned GIF manifests to ArrayRecord shards.

    yagg preprocess --manifest 'data/*.tsv' --output runs/data --text-encoder openai/clip-vit-base-patch32
    yagg preprocess --config configs/demo.py --manifest runs/demo/shapes/manifest.tsv --output runs/demo/data

Flags this module does not know are Beam pipeline options (`--runner`, `--project`, `--temp_location`, ...); a flag
that is neither is refused.

The local default: Beam's DirectRunner (its FnApiRunner) in its in-process mode (`--direct_running_mode=in_memory`,
one bundle thread), not Beam's default Prism runner, which downloads a binary at startup and so fails offline. The
cores are used by the CPU-heavy part, decoding, frame choice and resizing, which runs in a pool of child processes,
one per core (pipeline/timelimit.py, pipeline/job.py), while the bundle thread embeds captions (on XLA's threads),
encodes and writes records. Beam's parallel modes cost more than they bring here: `multi_threading` passes every
element through an in-process gRPC data channel (about twice the job process's CPU time per GIF on the moving-shapes
set, with the same decoding children) and `multi_processing` also loads JAX and the encoder in every worker.
Pass `--direct_running_mode=multi_threading` or `multi_processing` to choose them anyway (`--direct_num_workers`
then defaults to the number of cores); all modes write the same bytes.

`main` parses flags and calls `preprocess`, which tests and other code call directly. The graph is in pipeline/job.py,
the output folder's layout and commit protocol in pipeline/shards.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid
from collections.abc import Sequence
from typing import Any

from pipeline.gif import STREAM_BYTES_PER_SCREEN_PIXEL, DecodeLimits

# Defaults of the flags a config's data section can also set (fps: None, time-uniform, is handled apart).
DEFAULTS = {"frames": 16, "size": 64, "val_fraction": 0.05, "keep_stills": False}
DEFAULT_TARGET_SHARD_MB = 256.0
DEFAULT_MAX_DECODE_MB = DecodeLimits().max_decoded_bytes / 2**20
# Runners that execute in this machine's processes, where local paths are visible to every worker.
_LOCAL_RUNNERS = {"directrunner", "direct", "fnapirunner", "bundlebaseddirectrunner", "prismrunner", "prism"}
_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}


class UsageError(ValueError):
    """An argument the job cannot use (a bad value, a missing file, a non-empty output): nothing was run."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yagg preprocess",
        description=(
            "Captioned GIF manifests (TGIF layout: a GIF URL or path, a tab, a caption, per line) -> ArrayRecord "
            "shards, dataset_info.json and dead letters, with an Apache Beam job. Flags not listed here are passed "
            "to Beam as pipeline options (e.g. --runner=DataflowRunner --project=P --region=R "
            "--temp_location=gs://B/tmp --setup_file=./setup.py). Without --runner: DirectRunner, one worker thread "
            "per core, each decoding GIFs in a child process of its own."
        ),
        allow_abbrev=False,  # an abbreviated flag must not swallow a Beam option's name
    )
    parser.add_argument(
        "--manifest",
        action="append",
        required=True,
        help="manifest file or glob, local or gs://...; repeat for several. Relative GIF paths resolve against "
        "the manifest's folder",
    )
    parser.add_argument("--output", help="output folder, local or gs://... (default: the config's data.path)")
    parser.add_argument(
        "--text-encoder",
        help="CLIP for the text embeddings: a Hugging Face hub name, a local folder, or a gs://... folder "
        "(default: the config's data.text_encoder)",
    )
    parser.add_argument("--frames", type=int, help=f"frames per clip (default {DEFAULTS['frames']})")
    parser.add_argument("--size", type=int, help=f"side of the square frames in pixels (default {DEFAULTS['size']})")
    parser.add_argument(
        "--fps",
        type=_fps,
        help="sample frames at this rate from a centred window; clips shorter than frames/fps are dead-lettered. "
        "'none' (the default unless the config sets data.fps): spread the frames uniformly over each clip's duration",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        help=f"fraction of GIFs (by a stable hash of the source) that go to val (default {DEFAULTS['val_fraction']})",
    )
    shards = parser.add_mutually_exclusive_group()
    shards.add_argument("--num-shards", type=int, help="shards per split (default: the config's data.num_shards)")
    shards.add_argument(
        "--target-shard-mb",
        type=float,
        help=f"instead of --num-shards: as many shards as make about this many MiB each (default "
        f"{DEFAULT_TARGET_SHARD_MB:g} when neither the flag nor the config sets a shard count)",
    )
    parser.add_argument(
        "--keep-stills",
        action=argparse.BooleanOptionalAction,
        help="keep single-frame GIFs as clips of one repeated frame (default: dead-letter them as 'still image')",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the dataset in a non-empty --output (only the job's own files are removed)",
    )
    parser.add_argument(
        "--config",
        help="a configs/*.py file: its data section supplies defaults for the flags above (explicit flags win)",
    )
    parser.add_argument("--max-gif-mb", type=float, default=32.0, help="GIFs larger than this are dead-lettered (32)")
    parser.add_argument(
        "--max-decode-mb",
        type=float,
        default=DEFAULT_MAX_DECODE_MB,
        help="MiB of memory one GIF's decode may hold: its logical screen's working buffers "
        f"({STREAM_BYTES_PER_SCREEN_PIXEL} bytes per pixel) plus its clip's frames. A GIF that would need more is "
        "dead-lettered as 'too large' instead of risking an out-of-memory kill of a worker "
        f"({DEFAULT_MAX_DECODE_MB:g}: every screen up to 4096 x 4096 at the default clip size)",
    )
    parser.add_argument(
        "--element-timeout",
        type=float,
        default=60.0,
        help="seconds one GIF may take to decode, choose and resize frames before it is dead-lettered as "
        "'timeout' (60)",
    )
    parser.add_argument("--fetch-threads", type=int, default=16, help="concurrent downloads per worker thread (16)")
    return parser


def _fps(text: str) -> float | str:
    """A frame rate, or "none" for time-uniform sampling (kept as a string: None means "flag not given")."""
    return "none" if text.lower() == "none" else float(text)


def preprocess(
    manifest: str | Sequence[str],
    output: str,
    text_encoder: str,
    *,
    frames: int = DEFAULTS["frames"],
    size: int = DEFAULTS["size"],
    fps: float | None = None,
    val_fraction: float = DEFAULTS["val_fraction"],
    num_shards: int | None = None,
    target_shard_mb: float | None = None,
    keep_stills: bool = DEFAULTS["keep_stills"],
    overwrite: bool = False,
    max_gif_mb: float = 32.0,
    max_decode_mb: float = DEFAULT_MAX_DECODE_MB,
    element_timeout_s: float = 60.0,
    fetch_threads: int = 16,
    pipeline_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Runs the job and returns the dataset_info.json it wrote.

    `pipeline_args` are Beam pipeline options; without `--runner` the local DirectRunner is used (module doc).
    Raises UsageError, before any work starts, for arguments it cannot use (a bad value, a manifest that matches
    nothing, an unknown text encoder, a non-empty output without `overwrite`).
    """
    import apache_beam as beam

    from pipeline import job, shards

    try:
        settings, options = _plan(
            manifest=manifest,
            output=output,
            text_encoder=text_encoder,
            frames=frames,
            size=size,
            fps=fps,
            val_fraction=val_fraction,
            num_shards=num_shards,
            target_shard_mb=target_shard_mb,
            keep_stills=keep_stills,
            overwrite=overwrite,
            max_gif_mb=max_gif_mb,
            max_decode_mb=max_decode_mb,
            element_timeout_s=element_timeout_s,
            fetch_threads=fetch_threads,
            pipeline_args=pipeline_args,
        )
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        raise UsageError(str(e)) from e
    pipeline = beam.Pipeline(options=options)
    job.build(pipeline, settings)
    result = pipeline.run()
    state = result.wait_until_finish()
    if state != "DONE":
        raise RuntimeError(f"the preprocessing job ended in state {state}; {output} was left unchanged")
    return shards.read_dataset_info(output)


def _plan(
    *,
    manifest: str | Sequence[str],
    output: str,
    text_encoder: str,
    frames: int,
    size: int,
    fps: float | None,
    val_fraction: float,
    num_shards: int | None,
    target_shard_mb: float | None,
    keep_stills: bool,
    overwrite: bool,
    max_gif_mb: float,
    max_decode_mb: float,
    element_timeout_s: float,
    fetch_threads: int,
    pipeline_args: Sequence[str],
) -> tuple[Any, Any]:
    """Checks every argument and resolves them into (JobSettings, PipelineOptions)."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    from pipeline import job, shards
    from pipeline.clip_frames import ClipSpec
    from pipeline.embed import load_text_encoder
    from pipeline.manifest import expand_manifests
    from pipeline.sources import FetchPolicy

    if target_shard_mb is not None and num_shards is not None:
        raise ValueError("give --num-shards or --target-shard-mb, not both")
    if target_shard_mb is None and num_shards is None:
        target_shard_mb = DEFAULT_TARGET_SHARD_MB
    _check_values(frames, size, fps, val_fraction, num_shards, target_shard_mb, max_gif_mb, element_timeout_s)
    if not max_decode_mb > 0:
        raise ValueError(f"--max-decode-mb must be positive, got {max_decode_mb}")
    if fetch_threads < 1:
        raise ValueError(f"--fetch-threads must be at least 1, got {fetch_threads}")
    options = PipelineOptions(_with_default_runner(_checked_beam_args(pipeline_args)))
    runner = options.view_as(StandardOptions).runner or ""
    manifests = tuple(expand_manifests([manifest] if isinstance(manifest, str) else manifest))
    if not _workers_on_this_machine(runner, options):
        _check_remote_paths(runner, manifests, output, text_encoder)
    shards.check_output(output, overwrite)
    # Loading the encoder here fails fast on a wrong name (before any worker starts) and gives its dimensions.
    encoder = load_text_encoder(text_encoder)
    settings = job.JobSettings(
        manifests=manifests,
        output=output,
        run_id=uuid.uuid4().hex[:12],
        text_encoder=text_encoder,
        text_info={
            "name": text_encoder,  # as given: for a gs:// folder, encoder.name is its local copy
            "max_length": encoder.max_length,
            "pooled_dim": encoder.pooled_dim,
            "token_dim": encoder.token_dim,
        },
        clip=ClipSpec(
            num_frames=frames,
            size=size,
            fps=fps,
            keep_stills=keep_stills,
            limits=DecodeLimits(max_decoded_bytes=int(max_decode_mb * 2**20)),
        ),
        val_fraction=val_fraction,
        num_shards=num_shards,
        target_shard_mb=target_shard_mb,
        fetch=FetchPolicy(max_bytes=int(max_gif_mb * 2**20)),
        element_timeout_s=element_timeout_s,
        fetch_threads=fetch_threads,
    )
    return settings, options


def _check_values(
    frames: int,
    size: int,
    fps: float | None,
    val_fraction: float,
    num_shards: int | None,
    target_shard_mb: float | None,
    max_gif_mb: float,
    element_timeout_s: float,
) -> None:
    problems = []
    if frames < 1:
        problems.append(f"--frames must be at least 1, got {frames}")
    if size < 1:
        problems.append(f"--size must be at least 1, got {size}")
    if fps is not None and not fps > 0:
        problems.append(f"--fps must be positive (leave it out for time-uniform sampling), got {fps}")
    if not 0 <= val_fraction < 1:
        problems.append(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if num_shards is not None and num_shards < 1:
        problems.append(f"--num-shards must be at least 1, got {num_shards}")
    if target_shard_mb is not None and not target_shard_mb > 0:
        problems.append(f"--target-shard-mb must be positive, got {target_shard_mb}")
    if not max_gif_mb > 0:
        problems.append(f"--max-gif-mb must be positive, got {max_gif_mb}")
    if not element_timeout_s > 0:
        problems.append(f"--element-timeout must be positive, got {element_timeout_s}")
    if problems:
        raise ValueError("; ".join(problems))


def _checked_beam_args(args: Sequence[str]) -> list[str]:
    """Refuses arguments that are not Beam pipeline options (Beam itself would only log and ignore them)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    args = list(args)
    strays = [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or not _takes_value(args[i - 1]))]
    options = PipelineOptions(args)
    unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options()))
    if strays or unknown:
        named = [f"--{name}" for name in unknown] + strays
        raise ValueError(
            f"unrecognised argument(s) {' '.join(named)}: neither a `yagg preprocess` flag nor a Beam pipeline option "
            "(see `yagg preprocess --help`)"
        )
    return args


def _takes_value(arg: str) -> bool:
    return arg.startswith("-") and "=" not in arg


def _with_default_runner(args: list[str]) -> list[str]:
    """Adds the local DirectRunner in its in-process mode (see the module doc) unless a runner is given; with a
    user's choice of Beam's threads or processes mode, one worker per core unless the user says how many."""
    if any(a == "--runner" or a.startswith("--runner=") for a in args):
        return args
    mode = _flag_value(args, "--direct_running_mode") or "in_memory"
    # The log levels apply where workers are processes (--direct_running_mode=multi_processing): they log at WARNING
    # except this package's progress lines, which Beam's INFO chatter would bury.
    return [
        "--runner=DirectRunner",
        f"--direct_running_mode={mode}",
        f"--direct_num_workers={1 if mode == 'in_memory' else os.cpu_count() or 1}",
        "--default_sdk_harness_log_level=WARNING",
        '--sdk_harness_log_level_overrides={"pipeline": "INFO"}',
        *args,
    ]


def _flag_value(args: list[str], flag: str) -> str | None:
    """The last value given for `flag` (as `--flag=value` or `--flag value`), or None."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
        elif arg == flag and i + 1 < len(args):
            value = args[i + 1]
    return value


def _workers_on_this_machine(runner: str, options: Any) -> bool:
    """Whether every worker runs on this machine and so sees its files: a local runner, or Beam's portable runner
    with its job service in this process or on this machine and an environment whose workers it finds or starts
    here (LOOPBACK; PROCESS; EXTERNAL, a worker pool, at a loopback address)."""
    from apache_beam.options.pipeline_options import PortableOptions

    if runner.lower() in _LOCAL_RUNNERS:
        return True
    portable = options.view_as(PortableOptions)
    endpoint = portable.job_endpoint or ""
    if runner.lower() != "portablerunner" or not (endpoint == "embed" or _host(endpoint) in _LOOPBACK_HOSTS):
        return False
    kind = (portable.environment_type or "").upper()
    return kind in ("LOOPBACK", "PROCESS") or (
        kind == "EXTERNAL" and _host(portable.environment_config or "") in _LOOPBACK_HOSTS
    )


def _host(address: str) -> str:
    """The host of HOST:PORT (an IPv6 host in brackets loses them)."""
    return address.rpartition(":")[0].strip("[]")


def _check_remote_paths(runner: str, manifests: Sequence[str], output: str, text_encoder: str) -> None:
    """On a remote runner the workers cannot see this machine's files."""
    local = [path for path in (*manifests, output) if "://" not in path]
    if local:
        raise ValueError(
            f"{runner} workers cannot read local paths ({', '.join(local)}): put manifests (and the GIFs they name) "
            "and --output on a shared filesystem such as gs://"
        )
    if os.path.isdir(os.path.expanduser(text_encoder)):
        raise ValueError(
            f"{runner} workers cannot read the local folder --text-encoder {text_encoder}: copy it to gs:// "
            "(`gcloud storage cp -r FOLDER gs://BUCKET/clip`) and pass that folder, or pass a Hugging Face hub name"
        )


def format_summary(info: dict[str, Any], output: str) -> str:
    """The end-of-run report: where every manifest line went, and what was written."""
    acc = info["accounting"]
    lines = [
        f"yagg preprocess: {acc['lines_read']} manifest lines read from {len(info['manifests'])} manifest(s)",
        f"  examples written   {acc['examples_written']:>9}"
        + "".join(
            f"  ({split}: {info['splits'][split]['examples']} in {len(info['splits'][split]['shards'])} shard(s))"
            for split in info["splits"]
        ),
        f"  dead-lettered      {acc['dead_lettered']:>9}",
    ]
    lines += [
        f"    {n:>9}  {reason}" for reason, n in sorted(acc["dead_lettered_by_reason"].items(), key=lambda x: -x[1])
    ]
    lines.append(f"  duplicates removed {acc['duplicates_removed']:>9}")
    lines.append(
        f"output: {output} (dataset_info.json; dead letters: {', '.join(info['dead_letter_files']) or 'none'})"
    )
    return "\n".join(lines)


def _settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """Flag values, falling back to the config's data section, then to DEFAULTS."""
    data: Any = {}
    if args.config:
        from yagg.config import ConfigError, load_config

        try:
            data = load_config(args.config).get("data", {})
        except ConfigError as e:
            raise UsageError(str(e)) from e

    def pick(flag: Any, field: str, default: Any = None) -> Any:
        if flag is not None:
            return flag
        value = data.get(field)
        return default if value is None else value

    shard_flags = args.num_shards is not None or args.target_shard_mb is not None
    settings = {
        "output": pick(args.output, "path"),
        "text_encoder": pick(args.text_encoder, "text_encoder"),
        **{name: pick(getattr(args, name), name, default) for name, default in DEFAULTS.items()},
        "fps": None if args.fps == "none" else pick(args.fps, "fps"),
        # The config's shard count applies only when no flag chose how to shard.
        "num_shards": args.num_shards if shard_flags else data.get("num_shards"),
        "target_shard_mb": args.target_shard_mb,
    }
    for name, flag in (("output", "--output"), ("text_encoder", "--text-encoder")):
        if not settings[name]:
            raise UsageError(f"{flag} is required (or a --config whose data section sets it)")
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the command line, runs the job, prints the summary. Returns the exit status."""
    parser = build_parser()
    args, beam_args = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    try:
        settings = _settings_from(args)  # raises UsageError
        info = preprocess(
            args.manifest,
            overwrite=args.overwrite,
            max_gif_mb=args.max_gif_mb,
            max_decode_mb=args.max_decode_mb,
            element_timeout_s=args.element_timeout,
            fetch_threads=args.fetch_threads,
            pipeline_args=beam_args,
            **settings,
        )
    except UsageError as e:
        print(f"yagg preprocess: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(info, settings["output"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
