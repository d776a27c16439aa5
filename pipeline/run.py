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

Every setting is declared once, as a field of `Settings` with its default, its flag and its help; the command line
parser is built from those fields. `main` parses flags and calls `preprocess`, which tests and other code call
directly. The graph is in pipeline/job.py, the output folder's layout and commit protocol in pipeline/shards.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import uuid
from collections.abc import Sequence
from typing import Any

from contracts.dataset import DatasetInfo
from pipeline.gif import STREAM_BYTES_PER_SCREEN_PIXEL, DecodeLimits

DEFAULT_TARGET_SHARD_MB = 256.0
DEFAULT_MAX_DECODE_MB = DecodeLimits().max_decoded_bytes / 2**20
# Runners that execute in this machine's processes, where local paths are visible to every worker.
_LOCAL_RUNNERS = {"directrunner", "direct", "fnapirunner", "bundlebaseddirectrunner", "prismrunner", "prism"}
_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}


class UsageError(ValueError):
    """An argument the job cannot use (a bad value, a missing file, a non-empty output): nothing was run."""


def _setting(default: Any, help: str, *, config: str | None = None, **flag: Any) -> Any:
    """A Settings field: its default, its --help text, the config `data` field that can also set it, and any
    argparse keywords its flag needs."""
    return dataclasses.field(default=default, metadata={"help": help, "config": config, "flag": flag})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything `yagg preprocess` can be told. Flags win over the config's data section, which wins over these
    defaults."""

    manifests: tuple[str, ...] = _setting(
        (),
        "manifest file or glob, local or gs://...; repeat for several. Relative GIF paths resolve against the "
        "manifest's folder",
        name="--manifest",
        metavar="PATH",
        action="append",
        required=True,
    )
    output: str = _setting("", "output folder, local or gs://... (default: the config's data.path)", config="path")
    text_encoder: str = _setting(
        "",
        "CLIP for the text embeddings: a Hugging Face hub name, a local folder, or a gs://... folder (default: the "
        "config's data.text_encoder)",
        config="text_encoder",
    )
    frames: int = _setting(16, "frames per clip (default 16)", config="frames", type=int)
    size: int = _setting(64, "side of the square frames in pixels (default 64)", config="size", type=int)
    fps: float | None = _setting(
        None,
        "sample frames at this rate from a centred window; clips shorter than frames/fps are dead-lettered. 'none' "
        "(the default unless the config sets data.fps): spread the frames uniformly over each clip's duration",
        config="fps",
        type=lambda text: "none" if text.lower() == "none" else float(text),
    )
    val_fraction: float = _setting(
        0.05,
        "fraction of GIFs (by a stable hash of the source) that go to val (default 0.05)",
        config="val_fraction",
        type=float,
    )
    num_shards: int | None = _setting(
        None, "shards per split (default: the config's data.num_shards)", config="num_shards", type=int
    )
    target_shard_mb: float | None = _setting(
        None,
        f"instead of --num-shards: as many shards as make about this many MiB each (default "
        f"{DEFAULT_TARGET_SHARD_MB:g} when neither the flag nor the config sets a shard count)",
        type=float,
    )
    keep_stills: bool = _setting(
        False,
        "keep single-frame GIFs as clips of one repeated frame (default: dead-letter them as 'still image')",
        config="keep_stills",
        action=argparse.BooleanOptionalAction,
    )
    overwrite: bool = _setting(
        False, "replace the dataset in a non-empty --output (only the job's own files are removed)", action="store_true"
    )
    max_gif_mb: float = _setting(32.0, "GIFs larger than this are dead-lettered (32)", type=float)
    max_decode_mb: float = _setting(
        DEFAULT_MAX_DECODE_MB,
        "MiB of memory one GIF's decode may hold: its logical screen's working buffers "
        f"({STREAM_BYTES_PER_SCREEN_PIXEL} bytes per pixel) plus its clip's frames. A GIF that would need more is "
        "dead-lettered as 'too large' instead of risking an out-of-memory kill of a worker "
        f"({DEFAULT_MAX_DECODE_MB:g}: every screen up to 4096 x 4096 at the default clip size)",
        type=float,
    )
    element_timeout_s: float = _setting(
        60.0,
        "seconds one GIF may take to decode, choose and resize frames before it is dead-lettered as 'timeout' (60)",
        name="--element-timeout",
        metavar="SECONDS",
        type=float,
    )
    fetch_threads: int = _setting(16, "concurrent downloads per worker (16)", type=int)

    def problems(self) -> list[str]:
        """What is wrong with these values, one message per setting (empty when all are usable)."""
        checks = [
            (bool(self.manifests), "give at least one --manifest"),
            (bool(self.output), "--output is required (or a --config whose data section sets data.path)"),
            (bool(self.text_encoder), "--text-encoder is required (or a --config whose data section sets it)"),
            (self.frames >= 1, f"--frames must be at least 1, got {self.frames}"),
            (self.size >= 1, f"--size must be at least 1, got {self.size}"),
            (self.fps is None or self.fps > 0, f"--fps must be positive (or 'none' for time-uniform), got {self.fps}"),
            (0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1), got {self.val_fraction}"),
            (
                self.num_shards is None or self.num_shards >= 1,
                f"--num-shards must be at least 1, got {self.num_shards}",
            ),
            (
                self.target_shard_mb is None or self.target_shard_mb > 0,
                f"--target-shard-mb must be positive, got {self.target_shard_mb}",
            ),
            (
                self.num_shards is None or self.target_shard_mb is None,
                "give --num-shards or --target-shard-mb, not both",
            ),
            (self.max_gif_mb > 0, f"--max-gif-mb must be positive, got {self.max_gif_mb}"),
            (self.max_decode_mb > 0, f"--max-decode-mb must be positive, got {self.max_decode_mb}"),
            (self.element_timeout_s > 0, f"--element-timeout must be positive, got {self.element_timeout_s}"),
            (self.fetch_threads >= 1, f"--fetch-threads must be at least 1, got {self.fetch_threads}"),
        ]
        return [message for ok, message in checks if not ok]


def _flag_name(field: dataclasses.Field) -> str:
    return field.metadata["flag"].get("name", "--" + field.name.replace("_", "-"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yagg preprocess",
        description=(
            "Captioned GIF manifests (TGIF layout: a GIF URL or path, a tab, a caption, per line) -> ArrayRecord "
            "shards, dataset_info.json and dead letters, with an Apache Beam job. Flags not listed here are passed "
            "to Beam as pipeline options (e.g. --runner=DataflowRunner --project=P --region=R "
            "--temp_location=gs://B/tmp --setup_file=./setup.py). Without --runner: Beam's DirectRunner in one "
            "process, its bundle thread embedding captions and writing records while a pool of child processes, "
            "one per core, decodes the GIFs."
        ),
        allow_abbrev=False,  # an abbreviated flag must not swallow a Beam option's name
    )
    shard_flags = parser.add_mutually_exclusive_group()
    for field in dataclasses.fields(Settings):
        kwargs = {k: v for k, v in field.metadata["flag"].items() if k != "name"}
        group = shard_flags if field.name in ("num_shards", "target_shard_mb") else parser
        # Flags default to None ("not given"), so the config's data section can fill in what was not given.
        group.add_argument(
            _flag_name(field), dest=field.name, help=field.metadata["help"], **{"default": None, **kwargs}
        )
    parser.add_argument(
        "--config",
        help="a configs/*.py file: its data section supplies defaults for the flags above (explicit flags win)",
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flag values, falling back to the config's data section, then to the Settings defaults."""
    data: Any = {}
    if args.config:
        from yagg.config import ConfigError, load_config

        try:
            data = load_config(args.config).get("data", {})
        except ConfigError as e:
            raise UsageError(str(e)) from e
    # The config's shard count applies only when no flag chose how to shard.
    shard_flag_given = args.num_shards is not None or args.target_shard_mb is not None
    given: dict[str, Any] = {}
    for field in dataclasses.fields(Settings):
        value = getattr(args, field.name)
        name = field.metadata["config"]
        if value is None and name and data.get(name) is not None and not (name == "num_shards" and shard_flag_given):
            value = data.get(name)
        if value is not None:
            given[field.name] = value
    given["manifests"] = tuple(given.get("manifests", ()))
    if given.get("fps") == "none":
        given["fps"] = None
    return Settings(**given)


def preprocess(settings: Settings, pipeline_args: Sequence[str] = ()) -> DatasetInfo:
    """Runs the job and returns the description of the dataset it wrote.

    `pipeline_args` are Beam pipeline options; without `--runner` the local DirectRunner is used (module doc).
    Raises UsageError, before any work starts, for settings it cannot use (a bad value, a manifest that matches
    nothing, an unknown text encoder, a non-empty output without `overwrite`).
    """
    import apache_beam as beam

    from contracts.dataset import read_dataset_info
    from pipeline import job

    try:
        job_settings, options = _plan(settings, pipeline_args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        raise UsageError(str(e)) from e
    pipeline = beam.Pipeline(options=options)
    job.build(pipeline, job_settings)
    result = pipeline.run()
    state = result.wait_until_finish()
    if state != "DONE":
        raise RuntimeError(f"the preprocessing job ended in state {state}; {settings.output} was left unchanged")
    return read_dataset_info(settings.output)


def _plan(settings: Settings, pipeline_args: Sequence[str]) -> tuple[Any, Any]:
    """Checks every setting and resolves them into (JobSettings, PipelineOptions)."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    from contracts import storage
    from contracts.conditioning import load_conditioner
    from pipeline import job, shards
    from pipeline.clip_frames import ClipSpec
    from pipeline.manifest import expand_manifests
    from pipeline.sources import FetchPolicy

    problems = settings.problems()
    if problems:
        raise ValueError("; ".join(problems))
    storage.check(settings.output, "--output")  # a PathError (a ValueError) for s3://, gs:/typo, ...
    storage.check(settings.text_encoder, "--text-encoder")
    options = PipelineOptions(_with_default_runner(_checked_beam_args(pipeline_args)))
    runner = options.view_as(StandardOptions).runner or ""
    manifests = tuple(expand_manifests(list(settings.manifests)))
    if not _workers_on_this_machine(runner, options):
        _check_remote_paths(runner, manifests, settings.output, settings.text_encoder)
    shards.check_output(settings.output, settings.overwrite)
    # Loading the encoder here fails fast on a wrong name (before any worker starts) and gives its dimensions.
    conditioner = load_conditioner(settings.text_encoder)
    no_shard_count = settings.num_shards is None and settings.target_shard_mb is None
    job_settings = job.JobSettings(
        manifests=manifests,
        output=settings.output,
        run_id=uuid.uuid4().hex[:12],
        text_encoder=conditioner.info,
        clip=ClipSpec(
            num_frames=settings.frames,
            size=settings.size,
            fps=settings.fps,
            keep_stills=settings.keep_stills,
            limits=DecodeLimits(max_decoded_bytes=int(settings.max_decode_mb * 2**20)),
        ),
        val_fraction=settings.val_fraction,
        num_shards=settings.num_shards,
        target_shard_mb=DEFAULT_TARGET_SHARD_MB if no_shard_count else settings.target_shard_mb,
        fetch=FetchPolicy(max_bytes=int(settings.max_gif_mb * 2**20)),
        element_timeout_s=settings.element_timeout_s,
        fetch_threads=settings.fetch_threads,
    )
    return job_settings, options


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


def format_summary(info: DatasetInfo, output: str) -> str:
    """The end-of-run report: where every manifest line went, and what was written."""
    acc = info.accounting
    lines = [
        f"yagg preprocess: {acc.lines_read} manifest lines read from {len(info.manifests)} manifest(s)",
        f"  examples written   {acc.examples_written:>9}"
        + "".join(
            f"  ({name}: {split.examples} in {len(split.shards)} shard(s))" for name, split in info.splits.items()
        ),
        f"  dead-lettered      {acc.dead_lettered:>9}",
    ]
    lines += [f"    {n:>9}  {reason}" for reason, n in sorted(acc.dead_lettered_by_reason.items(), key=lambda x: -x[1])]
    lines.append(f"  duplicates removed {acc.duplicates_removed:>9}")
    lines.append(f"output: {output} (dataset_info.json; dead letters: {', '.join(info.dead_letter_files) or 'none'})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the command line, runs the job, prints the summary. Returns the exit status."""
    parser = build_parser()
    args, beam_args = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    try:
        settings = settings_from_args(args)  # raises UsageError
        info = preprocess(settings, pipeline_args=beam_args)
    except UsageError as e:
        print(f"yagg preprocess: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(info, settings.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
