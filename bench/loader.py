"""`loader_vs_train_consumption` and `loader_grain_vs_raw_arrayrecord`: does the input pipeline keep up with training?

    python -m bench.loader [--quick]

Data: moving-shapes clips (`pipeline.shapes.make_shapes`) written to ArrayRecord shards by the real preprocessing
job (`pipeline.run.preprocess`, the demo config's data settings: 8 frames of 16 x 16, 2 shards, the tiny random
CLIP), in a temporary folder. All three rates are measured in this one process, in alternating rounds, each the
best of its rounds (the machine is shared).

* Grain: `train.input.make_train_dataset` exactly as train/loop.py builds it from configs/demo.py (global batch 32,
  this process's rows of each batch from `train.mesh.global_batch_rows`, `data.loader_threads` read threads,
  `data.prefetch_batches` batches ahead). Its iterator is created once and its first batch taken before any
  timing (start-up is not steady state); each round then times the next batches:
  global batches/s x batch size = examples/s.
* Train step: the demo step as `yagg train` runs it, `train.loop._compile_step` over the state train/loop.py
  builds (`bench.train_mfu.build_train_step`, which every train-step figure in bench/ uses), on this machine's
  devices, compiled before timing and run once to warm up; each round times steps on one fixed batch, each waited
  for: batch size / step seconds = examples/s consumed.
* Raw: the same records read straight from array_record's `ArrayRecordDataSource` in batches (`__getitems__` with
  one global batch of shuffled indices, one epoch's permutation after another, as Grain reads them), each record
  decoded with `contracts.records.decode` and the batch fields stacked, as Grain's pipeline does: what reading and
  decoding cost without Grain's machinery (its dataset graph, threads and prefetch buffer).

`loader_vs_train_consumption` = Grain examples/s ÷ train step examples/s; goal >= 20 (the input pipeline must
never be what training waits for, with room for bigger models and more devices per host).

`loader_grain_vs_raw_arrayrecord` = Grain examples/s ÷ raw examples/s. Informational: it shows what Grain's
machinery costs (or gains, with its read-ahead thread) over a bare loop; no goal, because a figure below 1 is the
price of what the trainer needs from Grain (checkpointable iterator state, per-epoch reshuffling, reading only this
process's rows) and matters only through the first metric.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource

from bench.common import Metric, parse_args, write_metrics
from bench.train_mfu import build_train_step
from configs import demo
from contracts import records
from contracts.dataset import read_dataset_info, shard_paths
from model.tiny_clip import make_tiny_clip
from parallel import mesh as mesh_lib
from pipeline.run import Settings, preprocess
from pipeline.shapes import make_shapes
from train import input as input_lib

# (moving-shapes clips, loader batches per round, train steps per round, rounds)
FULL = (512, 300, 5, 3)
QUICK = (192, 100, 2, 2)


def _write_shards(root: Path, num_clips: int, data: object) -> tuple[list[str], dict]:
    """Shards written by the preprocessing job; returns (train shard paths, dataset_info)."""
    manifest = make_shapes(root / "shapes", num_clips, seed=0)
    output = root / "data"
    preprocess(
        Settings(
            manifests=(str(manifest),),
            output=str(output),
            text_encoder=str(make_tiny_clip(root / "tiny-clip")),
            frames=data.frames,
            size=data.size,
            fps=data.fps,
            num_shards=data.num_shards,
        )
    )
    info = read_dataset_info(str(output))
    return shard_paths(str(output), info), info


def _raw_batches(paths: list[str], global_batch: int, seed: int):
    """Batches read with array_record's own data source: `global_batch` shuffled indices per read, decoded."""
    source = ArrayRecordDataSource(paths)
    rng = np.random.default_rng(seed)
    order = np.empty(0, np.int64)
    while True:
        while len(order) < global_batch:
            order = np.concatenate([order, rng.permutation(len(source))])
        indices, order = order[:global_batch], order[global_batch:]
        examples = [records.decode(record) for record in source.__getitems__(indices.tolist())]
        yield {name: np.stack([e[name] for e in examples]) for name in input_lib.BATCH_FIELDS}


def _seconds(fn, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        fn()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    num_clips, batches, steps, rounds = QUICK if args.quick else FULL
    config = demo.get_config()
    global_batch = int(config.batch_size)
    tmp = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        paths, info = _write_shards(tmp, num_clips, config.data)
        step = build_train_step(config)
        rows = mesh_lib.global_batch_rows(step.mesh, global_batch)
        grain_iter = iter(
            input_lib.make_train_dataset(
                paths,
                global_batch=global_batch,
                rows=rows,
                seed=int(config.seed),
                num_threads=int(config.data.loader_threads),
                prefetch=int(config.data.prefetch_batches),
            )
        )
        raw_iter = _raw_batches(paths, global_batch, int(config.seed))
        first = next(grain_iter)  # start-up: not steady state
        assert first["frames"].shape == (len(rows), config.data.frames, config.data.size, config.data.size, 3)
        next(raw_iter)
        step.run()  # warm-up: the first run allocates and pages everything in

        grain_s, raw_s, step_s = [], [], []
        for _ in range(rounds):
            grain_s.append(_seconds(lambda: next(grain_iter), batches))
            step_s.append(_seconds(step.run, steps))
            raw_s.append(_seconds(lambda: next(raw_iter), batches))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    grain_rate = batches * global_batch / min(grain_s)
    raw_rate = batches * global_batch / min(raw_s)
    train_rate = steps * global_batch / min(step_s)
    command = "python -m bench.loader" + (" --quick" if args.quick else "")
    train_split = info.splits["train"]
    common = {
        "grain_examples_per_s": round(grain_rate, 1),
        "global_batch": global_batch,
        "rows_per_process": len(rows),
        "loader_threads": int(config.data.loader_threads),
        "prefetch_batches": int(config.data.prefetch_batches),
        "train_examples": train_split.examples,
        "shards": len(paths),
        # ArrayRecord compresses its chunks: a demo record holds 16 KB of arrays, mostly zero-padded text tokens.
        "shard_bytes_per_record": round(sum(s.bytes for s in train_split.shards) / train_split.examples),
        "batches_per_round": batches,
        "rounds": rounds,
        "grain_seconds": [round(s, 3) for s in grain_s],
    }
    metrics = [
        Metric(
            name="loader_vs_train_consumption",
            value=grain_rate / train_rate,
            goal=">= 20",
            command=command,
            details=common
            | {
                "train_examples_per_s": round(train_rate, 2),
                "train_step_s": round(min(step_s) / steps, 4),
                "train_steps_per_round": steps,
                "train_seconds": [round(s, 3) for s in step_s],
                "train_compile_s": round(step.compile_seconds, 1),
                "devices": [str(d) for d in step.mesh.devices.flat],
            },
        ),
        Metric(
            name="loader_grain_vs_raw_arrayrecord",
            value=grain_rate / raw_rate,
            goal=None,
            command=command,
            details=common | {"raw_examples_per_s": round(raw_rate, 1), "raw_seconds": [round(s, 3) for s in raw_s]},
        ),
    ]
    write_metrics(metrics, args.json)


if __name__ == "__main__":
    main()
