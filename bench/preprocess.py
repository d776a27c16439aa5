"""`preprocess_speedup_vs_floor`: GIFs/s of the preprocessing job on all cores ÷ GIFs/s of a bare decoding loop.

    python -m bench.preprocess [--quick]

The job is `pipeline.run.preprocess`, what `yagg preprocess` runs, with no Beam options: the product's own local mode
on every core of this machine. It reads a manifest, decodes the GIFs, picks and resizes frames, embeds the captions
with the tiny random CLIP (`model.tiny_clip`), encodes records and writes ArrayRecord shards, at the demo config's
data settings (configs/demo.py: 8 frames of 16 x 16, 2 shards).

The floor is the least work any preprocessing must do, in one process with no framework: for each GIF (bytes
already in memory) `pipeline.gif.decode`, `pipeline.frames.select_frames` and `pipeline.frames.resize_center_crop`,
the functions the job's decoding children run, with the same frame count, size and frame sampling. No embedding,
no encoding, no writing.

The GIFs: moving-shapes clips (`pipeline.shapes.make_shapes`) plus every animated GIF of
../shared/corpus/pillow-gifs (the multi-frame ones: stills are dead letters in the job, so they are left out of both
sides).

Why the job's rate is a difference. A job run has a fixed cost whatever its size (starting Beam's runner, loading
the text encoder in the launcher and in the worker, tracing and compiling it, starting the decoding children, the
stages' start-up), several seconds that a real dataset amortises. So the job runs twice per round on manifests of
two sizes, and its rate is the extra GIFs of the big one over its extra seconds: the steady-state throughput a large
dataset sees. The floor is timed over exactly those extra GIFs. For the fixed costs to cancel, both runs embed
their captions in full batches of `pipeline.job.EMBED_BATCH` plus the same remainder, so the text encoder compiles
for the same shapes in both (an extra shape would add a second or more to one side only). Library imports (Beam,
JAX, transformers) happen before any timing: a user pays them once per command, not per GIF. An untimed job run
comes first (the launcher compiles the text encoder once per process; only the first run would pay it). Rounds
interleave floor, small job and big job; each figure is the best over rounds.

In `details`, first `floor_on_all_cores_speedup`: the same bare loop in one forked process per core at once, ÷ the
loop alone (best of the rounds, measured before anything starts JAX or Beam). It is the most any job could reach on
the machine: where cores share a host, copies of the bare loop slow each other down. Then the fixed cost (the small
run's time minus its GIFs at the steady rate), the big run's end-to-end rate, the CPU-seconds per GIF of the job (its
process and its children, from `getrusage`) and of the floor, and the load average. CPU time says what the job costs
whatever share of the cores it got: `cores * floor CPU / job CPU` is the ratio the job would reach if its CPU time
spread perfectly over otherwise idle cores, a cross-check for runs on a busy machine, where the wall-clock ratio
mostly measures what the other processes left.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import apache_beam  # noqa: F401  (imported before timing: see the module doc)
import numpy as np

import model.clip  # noqa: F401
from bench.common import REPO, Metric, parse_args, write_metrics
from configs import demo
from model.tiny_clip import make_tiny_clip
from pipeline import frames, gif, job
from pipeline.run import Settings, preprocess
from pipeline.shapes import make_shapes

CORPUS = REPO.parent / "shared" / "corpus" / "pillow-gifs"
# (full caption batches in the big run, rounds). Both runs are whole batches of job.EMBED_BATCH captions plus the
# same remainder, so both compile the text encoder for the same shapes (see the module doc).
FULL = (9, 3)
QUICK = (3, 1)
REMAINDER = 100


def _animated_corpus_gifs() -> list[Path]:
    """The pillow-gifs files with more than one frame (a still is a dead letter, not a clip)."""
    animated = []
    for path in sorted(CORPUS.glob("*.gif")):
        try:
            if len(gif.decode(path.read_bytes()).frames) > 1:
                animated.append(path)
        except gif.GifError:  # decompression bombs, a zero-size canvas: dead letters too
            continue
    return animated


def _manifest(path: Path, gifs: list[tuple[Path, str]]) -> Path:
    path.write_text("".join(f"{p}\t{caption}\n" for p, caption in gifs), encoding="utf-8")
    return path


def _floor_seconds(datas: list[bytes], num_frames: int, size: int, fps: float | None) -> float:
    start = time.perf_counter()
    for data in datas:
        decoded = gif.decode(data)
        indices, _ = frames.select_frames(np.asarray(decoded.durations_ms), num_frames, fps)
        frames.resize_center_crop(decoded.frames[np.asarray(indices)], size)
    return time.perf_counter() - start


_FORKED_FLOOR: tuple = ()  # what the forked floor processes run: set before they are forked, inherited, not pickled


def _floor_span(_: int) -> tuple[float, float]:
    """In a forked process: (start, end) on the shared clock of one floor loop over _FORKED_FLOOR's GIFs."""
    start = time.time()
    _floor_seconds(*_FORKED_FLOOR)
    return start, time.time()


def _floor_on_all_cores(datas: list[bytes], num_frames: int, size: int, fps: float | None, cores: int) -> float:
    """GIFs/s of `cores` floor loops at once, one process each: the most any job could reach on this machine.

    Forked before this process has started JAX or Beam (the children touch neither, only numpy and Pillow).
    """
    global _FORKED_FLOOR
    _FORKED_FLOOR = (datas, num_frames, size, fps)
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        pool.map(abs, range(cores))  # every process started before the timed loops
        spans = pool.map(_floor_span, range(cores), chunksize=1)
    return cores * len(datas) / (max(end for _, end in spans) - min(start for start, _ in spans))


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the job stops its decoding children at its end)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of fn()."""
    cpu, start = _cpu_seconds(), time.perf_counter()
    fn()
    return time.perf_counter() - start, _cpu_seconds() - cpu


def _run_job(manifest: Path, output: Path, clip: Path, data: dict) -> None:
    """One run of the job, with the product's default local runner."""
    info = preprocess(
        Settings(
            manifests=(str(manifest),),
            output=str(output),
            text_encoder=str(clip),
            frames=data["frames"],
            size=data["size"],
            fps=data["fps"],
            num_shards=data["num_shards"],
            overwrite=True,
        )
    )
    expected = len(manifest.read_text(encoding="utf-8").splitlines())
    written = info.accounting.examples_written
    assert written == expected, f"the job wrote {written} of {expected} examples"


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    batches, rounds = QUICK if args.quick else FULL
    config = demo.get_config().data
    data = {"frames": config.frames, "size": config.size, "fps": config.fps, "num_shards": config.num_shards}
    corpus = [(p, f"an animated test image called {p.stem.replace('_', ' ')}") for p in _animated_corpus_gifs()]
    num_small = job.EMBED_BATCH + REMAINDER
    num_big = batches * job.EMBED_BATCH + REMAINDER  # the corpus GIFs and enough shapes GIFs
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    try:
        shapes_manifest = make_shapes(tmp / "shapes", num_big - len(corpus), seed=0)
        shapes = [
            (shapes_manifest.parent / path, caption)
            for path, caption in (line.split("\t") for line in shapes_manifest.read_text().splitlines())
        ]
        small = _manifest(tmp / "small.tsv", shapes[:num_small])
        big = _manifest(tmp / "big.tsv", shapes + corpus)
        extra = [p.read_bytes() for p, _ in shapes[num_small:] + corpus]  # what the big run does beyond the small one
        floor_args = (extra, data["frames"], data["size"], data["fps"])
        # Before anything starts JAX: the ceiling, the bare loop on every core at once, against the bare loop alone.
        ceiling = []
        for _ in range(rounds):
            ceiling.append((_floor_on_all_cores(*floor_args, job._cores()), len(extra) / _floor_seconds(*floor_args)))
        clip = make_tiny_clip(tmp / "tiny-clip")

        # One untimed run first: the launcher traces and compiles the text encoder in this process once, and later
        # runs reuse it, so without it the first small run alone would pay that (and the difference would overstate
        # the job's rate many times over).
        _run_job(small, tmp / "out-warmup", clip, data)
        floor, small_runs, big_runs = [], [], []
        for _ in range(rounds):
            floor.append(_timed(lambda: _floor_seconds(*floor_args)))
            small_runs.append(_timed(lambda: _run_job(small, tmp / "out-small", clip, data)))
            big_runs.append(_timed(lambda: _run_job(big, tmp / "out-big", clip, data)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def best(runs: list[tuple[float, float]]) -> tuple[float, float]:
        return min(wall for wall, _ in runs), min(cpu for _, cpu in runs)

    (floor_s, floor_cpu), (small_s, small_cpu), (big_s, big_cpu) = best(floor), best(small_runs), best(big_runs)
    floor_rate = len(extra) / floor_s
    job_rate = len(extra) / (big_s - small_s)
    job_cpu_per_gif = (big_cpu - small_cpu) / len(extra)
    cores = job._cores()
    details = {
        # The bare loop on every core at once ÷ the bare loop alone: what even a job with no cost of its own reaches
        # here (cores that share a host slow each other down).
        "floor_on_all_cores_speedup": round(max(all_cores / one for all_cores, one in ceiling), 2),
        "job_gifs_per_s": round(job_rate, 1),
        "floor_gifs_per_s": round(floor_rate, 1),
        "job_fixed_cost_s": round(small_s - num_small / job_rate, 2),
        "job_end_to_end_gifs_per_s": round(num_big / big_s, 1),
        "job_cpu_ms_per_gif": round(job_cpu_per_gif * 1e3, 2),
        "floor_cpu_ms_per_gif": round(floor_cpu / len(extra) * 1e3, 2),
        "cpu_time_ratio_on_idle_cores": round(cores * (floor_cpu / len(extra)) / job_cpu_per_gif, 2),
        "job_seconds": {"small": [round(w, 2) for w, _ in small_runs], "big": [round(w, 2) for w, _ in big_runs]},
        "floor_seconds": [round(w, 3) for w, _ in floor],
        "gifs": {"small": num_small, "big": num_big, "timed": len(extra), "corpus": len(corpus)},
        "data": data,
        "text_encoder": "tiny random CLIP (model/tiny_clip.py)",
        "cores": cores,
        "decoding_processes": cores,
        "local_runner": "pipeline.run's default (no Beam options)",
        "rounds": rounds,
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
    }
    metric = Metric(
        name="preprocess_speedup_vs_floor",
        value=job_rate / floor_rate,
        goal=">= 1.5",
        command="python -m bench.preprocess" + (" --quick" if args.quick else ""),
        details=details,
    )
    write_metrics([metric], args.json)


if __name__ == "__main__":
    main()
