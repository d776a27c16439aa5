"""`preprocess_vs_all_core_floor`: GIFs/s of the preprocessing job on all cores ÷ GIFs/s of the bare decode + frame
choice + resize loop run once per core at the same time; `long_gif_clip_vs_pillow_walk`: Pillow's bare frame walk ÷
that loop, on long GIFs.

    python -m bench.preprocess [--quick]

The job is `pipeline.run.preprocess`, what `yagg preprocess` runs, with no Beam options: the product's own local mode
on every core of this machine. It reads a manifest, decodes the GIFs, picks and resizes frames, embeds the captions
with the tiny random CLIP (`model.tiny_clip`), encodes records and writes ArrayRecord shards, at tgif64's data
settings (configs/tgif64.py: 16 frames of 64 x 64, spread over each clip's duration), 2 shards.

The floor is the least work any preprocessing must do: `pipeline.clip_frames.clip_frames` on each GIF (bytes already
in memory): parse, frame choice by time, the streaming decode, resize; what the job's decoding children run, with no
framework, no embedding, encoding or writing. It runs in one forked process per core at once, each over every timed
GIF, and its rate is cores x GIFs ÷ the span from the first start to the last end: where cores share a host, copies
of the loop slow each other down, and this floor includes that.

The GIFs have real sizes and lengths: moving-shapes clips made long and large (`make_shapes` with canvases of 200-640
px and 100-800 frames drawn; frames that render identically merge, so about 100-380 remain), a few written and the
rest copies of them under other names (each copy is read and decoded on its own, as distinct GIFs are; writing them is
the slow part, about 2 s each), plus every animated GIF of Pillow's corpus (../shared/corpus/pillow-gifs) and of
Debian's wand-doc (real animations, where `.ci/run` has unpacked them into .cache/debian/).

Why the job's rate is a difference. A job run has a fixed cost whatever its size (starting Beam's runner, loading
the text encoder in the launcher and in the worker, tracing and compiling it, starting the decoding children), several
seconds that a real dataset amortises. So the job runs on manifests of two sizes, and its rate is the extra GIFs of
the big one over its extra seconds: the steady-state throughput a large dataset sees. The floor is timed over exactly
those extra GIFs. The text tower compiles once per input shape and process (`pipeline.embed.load_text_encoder` keeps
one encoder per process), about a second each: every caption is in the same length bucket and the runs are one and
two full batches (`job.EMBED_BATCH`) of GIFs with one caption each, so both sizes need the one shape that the untimed
first runs compile. Library imports happen before any timing. Each round runs the small job, the floor and the big
job, one after the other, and makes a ratio of its own. The development machine is shared, and another process's
load, which comes and goes, turns a round's ratio into noise (a job run and the floor get different shares of the
cores): so each round also measures the CPU time that processes other than the benchmark's used during it (from
/proc/stat), a round counts as quiet when that is under QUIET of the machine, rounds run until 3 are quiet (at most
8), and the figure is the median over the quiet rounds (over all rounds, and said so, when none was quiet).

CPU time says what the job costs whatever share of the cores it got, which matters on a machine that others load:
`cpu_time_ratio_on_idle_cores`, the floor's CPU seconds per GIF ÷ the job's (its process and its decoding children,
from `getrusage`), is the ratio the job would reach if its CPU time spread perfectly over otherwise idle cores.

Peak memory, measured in the untimed big run so that polling cannot slow the timed ones: the job's process (in the
local runner's in-process mode it is also the worker) and each decoding child, as the kernel's high-water mark of
their resident size (/proc's VmHWM), polled while they run; then once more with the big manifest on Beam's portable
runner against a worker pool (`--environment_type=EXTERNAL`), where the SDK worker is a process of its own, as on
Dataflow: the worker process and each of its decoding children.

`long_gif_clip_vs_pillow_walk`: the seconds of Pillow's bare walk over every frame (`ImageSequence.Iterator` with
`convert("RGB")`, and no frame choice or resize) ÷ the seconds of `clip_frames` (decode, frame choice and resize), over
the GIFs of 100 frames or more, each timed best of REPEATS, alternating, in this process before JAX or Beam start.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import apache_beam  # noqa: F401  (imported before timing: see the module doc)
import numpy as np
from PIL import Image, ImageSequence

import model.clip  # noqa: F401
from bench.common import REPO, Metric, parse_args, write_metrics
from configs import tgif64
from model.tiny_clip import make_tiny_clip
from pipeline import gif, job
from pipeline.clip_frames import ClipSpec, clip_frames
from pipeline.run import Settings, preprocess
from pipeline.shapes import make_shapes

CORPUS = REPO.parent / "shared" / "corpus" / "pillow-gifs"
DEBIAN_GIFS = REPO / ".cache" / "debian" / "wand-doc" / "usr" / "share" / "doc" / "wand-doc" / "html" / "_images"
CANVAS_RANGE, FRAMES_RANGE = (200, 640), (100, 800)
LONG = 100  # frames from which a GIF counts as long (`long_gif_clip_vs_pillow_walk`)
# (distinct long shapes GIFs, quiet rounds wanted, most rounds run, repeats per GIF against Pillow)
FULL = (16, 3, 8, 3)
QUICK = (6, 1, 2, 1)
QUIET = 0.1  # a round is quiet when other processes used less than this share of the machine's CPU during it
# The small run is one batch of job.EMBED_BATCH GIFs, the big one two (see the module doc).
REAL_CAPTION = "a real animation"  # as short as the shapes captions: every caption is in the first length bucket


def _real_animations() -> list[Path]:
    """The animated GIFs of Pillow's corpus and Debian's wand-doc (a still is a dead letter, not a clip)."""
    animated = []
    for path in sorted(CORPUS.glob("*.gif")) + sorted(DEBIAN_GIFS.glob("*.gif")):
        try:
            if len(gif.parse(path.read_bytes())) > 1:
                animated.append(path)
        except gif.GifError:  # decompression bombs, a zero-size canvas: dead letters too
            continue
    return animated


def _long_shapes(folder: Path, distinct: int, count: int) -> list[tuple[Path, str]]:
    """`count` long, large moving-shapes GIFs: `distinct` ones, then copies of them under other names in turn."""
    manifest = make_shapes(folder, distinct, seed=0, canvas_range=CANVAS_RANGE, frames_range=FRAMES_RANGE)
    originals = [line.split("\t") for line in manifest.read_text(encoding="utf-8").splitlines()]
    gifs = []
    for i in range(count):
        name, caption = originals[i % distinct]
        path = folder / name
        if i >= distinct:
            path = path.with_name(f"{path.stem}-copy{i // distinct}.gif")
            shutil.copyfile(folder / name, path)
        gifs.append((path, caption))
    return gifs


def _manifest(path: Path, gifs: list[tuple[Path, str]]) -> Path:
    path.write_text("".join(f"{p}\t{caption}\n" for p, caption in gifs), encoding="utf-8")
    return path


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _pillow_walk(data: bytes) -> None:
    for frame in ImageSequence.Iterator(Image.open(io.BytesIO(data))):
        frame.convert("RGB")


def _against_pillow(datas: list[bytes], spec: ClipSpec, repeats: int) -> dict:
    """Per long GIF: (frames, width x height, Pillow's walk seconds, clip_frames seconds), best of `repeats` each."""
    rows = []
    for data in datas:
        animation = gif.parse(data)
        pillow, ours = [], []
        for _ in range(repeats):  # alternating, so that a disturbance hits both
            pillow.append(_seconds(_pillow_walk, data))
            ours.append(_seconds(clip_frames, data, spec))
        rows.append((len(animation), f"{animation.width}x{animation.height}", min(pillow), min(ours)))
    return {
        "ratio": sum(r[2] for r in rows) / sum(r[3] for r in rows),
        "per_gif": [
            {"frames": n, "size": size, "pillow_walk_ms": round(p * 1e3, 1), "clip_frames_ms": round(o * 1e3, 1)}
            for n, size, p, o in rows
        ],
    }


_FORKED_FLOOR: tuple = ()  # what the forked floor processes run: set before they are forked, inherited, not pickled


def _floor_span(_: int) -> tuple[float, float, float]:
    """In a forked process: (start, end) on the shared clock of one floor loop over _FORKED_FLOOR's GIFs, and the
    CPU seconds it took."""
    datas, spec = _FORKED_FLOOR
    start, cpu = time.time(), time.process_time()
    for data in datas:
        clip_frames(data, spec)
    return start, time.time(), time.process_time() - cpu


def _floor(pool, cores: int, count: int) -> tuple[float, float]:
    """(GIFs/s of `cores` floor loops at once, one process each; CPU seconds per GIF)."""
    spans = pool.map(_floor_span, range(cores), chunksize=1)
    rate = cores * count / (max(end for _, end, _ in spans) - min(start for start, _, _ in spans))
    return rate, sum(cpu for _, _, cpu in spans) / (cores * count)


def _machine_busy_s() -> float:
    """CPU seconds all processes of the machine have used since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as stat:
        user, nice, system, _, _, irq, softirq, steal = (int(v) for v in stat.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _round(small: tuple[float, float], floor: tuple[float, float], big: tuple[float, float], count: int, others: float):
    """One round's figures from its (wall s, CPU s) of the small and big job runs and (GIFs/s, CPU s per GIF) of the
    floor, with `count` GIFs more in the big run than the small one; `others` is the share of the machine's CPU that
    other processes used meanwhile."""
    (small_s, small_cpu), (floor_rate, floor_cpu), (big_s, big_cpu) = small, floor, big
    job_rate, job_cpu = count / (big_s - small_s), (big_cpu - small_cpu) / count
    return {
        "ratio": round(job_rate / floor_rate, 3),
        "job_gifs_per_s": round(job_rate, 2),
        "floor_gifs_per_s": round(floor_rate, 2),
        # The floor's CPU per GIF ÷ the job's: what the job would reach on otherwise idle cores (module doc).
        "cpu_time_ratio_on_idle_cores": round(floor_cpu / job_cpu, 3),
        "job_cpu_ms_per_gif": round(job_cpu * 1e3, 1),
        "floor_cpu_ms_per_gif": round(floor_cpu * 1e3, 1),
        "small_s": round(small_s, 2),
        "big_s": round(big_s, 2),
        "others_cpu_share": round(others, 3),
        "quiet": others < QUIET,
    }


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the job stops its decoding children at its end)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of fn()."""
    cpu, start = _cpu_seconds(), time.perf_counter()
    fn()
    return time.perf_counter() - start, _cpu_seconds() - cpu


def _run_job(manifest: Path, output: Path, clip: Path, data: dict, pipeline_args: tuple[str, ...] = ()) -> None:
    """One run of the job, with the product's default local runner unless `pipeline_args` name another."""
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
        ),
        pipeline_args=pipeline_args,
    )
    expected = len(manifest.read_text(encoding="utf-8").splitlines())
    written = info.accounting.examples_written
    assert written == expected, f"the job wrote {written} of {expected} examples: {info.accounting}"


def _status_kib(pid: int | str, field: str) -> int | None:
    """A field of /proc/PID/status in KiB (VmRSS, VmHWM), or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return None


def _children() -> dict[int, list[tuple[int, str]]]:
    """Every process's children, as (pid, command line), by parent pid."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rpartition(")")[2].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            continue
        children.setdefault(parent, []).append((int(entry), command))
    return children


class _PeakRss:
    """Polls the descendants of `root` every 0.1 s and keeps each one's VmHWM (its peak resident size so far), by
    role: "worker" (a Beam SDK worker process) or "decoder" (a decoding child, pipeline/timelimit.py)."""

    def __init__(self, root: int) -> None:
        self._root = root
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            children, stack = _children(), [self._root]
            while stack:
                for pid, command in children.get(stack.pop(), []):
                    stack.append(pid)
                    role = "decoder" if "pipeline.timelimit" in command else "worker" if "SdkHarness" in command else ""
                    peak = _status_kib(pid, "VmHWM")
                    if role and peak is not None:
                        self.peaks[pid] = (role, max(peak, self.peaks.get(pid, (role, 0))[1]))

    def mib(self, role: str) -> list[float]:
        return sorted(round(kib / 1024, 1) for r, kib in self.peaks.values() if r == role)


def _own_peak_mib(fn) -> float:
    """This process's peak resident size while fn() runs, in MiB (Linux: the high-water mark is reset first)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    fn()
    return round(_status_kib("self", "VmHWM") / 1024, 1)


@contextlib.contextmanager
def _worker_pool():
    """Beam's SDK worker pool on a free loopback port, in a process of its own: yields (pool pid, port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # The pool starts SDK workers as `python ...`: this interpreter's folder goes first on PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={port}"]
    pool = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert pool.poll() is None and time.monotonic() < deadline, "the worker pool did not start"
            with socket.socket() as client:
                if client.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        yield pool.pid, port
    finally:
        pool.send_signal(signal.SIGINT)  # it stops its workers on the way out
        try:
            pool.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pool.kill()
            pool.wait()


def main() -> None:
    global _FORKED_FLOOR
    args = parse_args(__doc__.splitlines()[0])
    distinct, quiet_rounds, max_rounds, repeats = QUICK if args.quick else FULL
    num_small, num_big = job.EMBED_BATCH, 2 * job.EMBED_BATCH
    config = tgif64.get_config().data
    data = {"frames": config.frames, "size": config.size, "fps": config.fps, "num_shards": 2}
    spec = ClipSpec(num_frames=data["frames"], size=data["size"], fps=data["fps"])
    cores = job._cores()
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    try:
        real = [(p, REAL_CAPTION) for p in _real_animations()]
        shapes = _long_shapes(tmp / "shapes", distinct, num_big - len(real))
        small = _manifest(tmp / "small.tsv", shapes[:num_small])
        big = _manifest(tmp / "big.tsv", shapes + real)
        extra = [p.read_bytes() for p, _ in shapes[num_small:] + real]  # what the big run does beyond the small one
        animations = [gif.parse(d) for d in extra]
        long_datas = list({p: p.read_bytes() for p, _ in shapes[:distinct] + real}.values())
        against_pillow = _against_pillow([d for d in long_datas if len(gif.parse(d)) >= LONG], spec, repeats)

        # The floor's processes are forked now, before anything starts JAX's threads, and serve every round.
        _FORKED_FLOOR = (extra, spec)
        with multiprocessing.get_context("fork").Pool(cores) as pool:
            pool.map(abs, range(cores))  # every process started before the timed loops
            clip = make_tiny_clip(tmp / "tiny-clip")
            # Untimed: the text tower compiles for its one shape (see the module doc); the big run measures memory.
            _run_job(small, tmp / "out-small", clip, data)
            with _PeakRss(os.getpid()) as local_peaks:
                job_process_peak_mib = _own_peak_mib(lambda: _run_job(big, tmp / "out-big", clip, data))
            measured = []
            while sum(r["quiet"] for r in measured) < quiet_rounds and len(measured) < max_rounds:
                busy, start = _machine_busy_s(), time.perf_counter()
                small_run = _timed(lambda: _run_job(small, tmp / "out-small", clip, data))
                floor = _floor(pool, cores, len(extra))
                big_run = _timed(lambda: _run_job(big, tmp / "out-big", clip, data))
                ours = small_run[1] + floor[1] * cores * len(extra) + big_run[1]
                others = (_machine_busy_s() - busy - ours) / ((time.perf_counter() - start) * cores)
                measured.append(_round(small_run, floor, big_run, len(extra), others))
        with _worker_pool() as (pool_pid, port), _PeakRss(pool_pid) as portable_peaks:
            portable = ("--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=EXTERNAL")
            _run_job(big, tmp / "out-portable", clip, data, (*portable, f"--environment_config=localhost:{port}"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    counted = [r for r in measured if r["quiet"]] or measured
    median = {key: float(np.median([r[key] for r in counted])) for key in measured[0] if key != "quiet"}
    frame_counts = [len(a) for a in animations]
    sides = [min(a.width, a.height) for a in animations]
    details = {
        "medians": {key: round(value, 2) for key, value in median.items()},
        "rounds_counted": f"the {len(counted)} quiet one(s)" if counted is not measured else "all: none was quiet",
        "rounds": measured,
        "job_fixed_cost_s": round(median["small_s"] - num_small / median["job_gifs_per_s"], 2),
        "job_end_to_end_gifs_per_s": round(num_big / median["big_s"], 2),
        "peak_rss_mib": {
            "local_runner": {"job_process": job_process_peak_mib, "decoding_children": local_peaks.mib("decoder")},
            "portable_runner": {
                "sdk_worker_processes": portable_peaks.mib("worker"),
                "decoding_children": portable_peaks.mib("decoder"),
            },
        },
        "gifs": {
            "small": num_small,
            "big": num_big,
            "timed": len(extra),
            "long_shapes_distinct": distinct,
            "real_animations": len(real),
            "timed_frames": {
                "min": min(frame_counts),
                "median": int(np.median(frame_counts)),
                "max": max(frame_counts),
            },
            "timed_shorter_side_px": {"min": min(sides), "median": int(np.median(sides)), "max": max(sides)},
        },
        "data": data,
        "text_encoder": "tiny random CLIP (model/tiny_clip.py)",
        "cores": cores,
        "decoding_processes": cores,
        "local_runner": "pipeline.run's default (no Beam options)",
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
    }
    metrics = [
        Metric(
            name="preprocess_vs_all_core_floor",
            value=median["ratio"],
            goal=">= 0.8",
            command="python -m bench.preprocess" + (" --quick" if args.quick else ""),
            details=details,
        ),
        Metric(
            name="long_gif_clip_vs_pillow_walk",
            value=against_pillow["ratio"],
            goal=">= 1.0",
            command="python -m bench.preprocess" + (" --quick" if args.quick else ""),
            details={"long_gifs": against_pillow["per_gif"], "clip": data, "repeats": repeats},
        ),
    ]
    write_metrics(metrics, args.json)


if __name__ == "__main__":
    main()
