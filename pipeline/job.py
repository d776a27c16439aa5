"""The Beam graph of the preprocessing job: manifests -> examples -> shards, dead letters and dataset_info.json.

    manifest files --read--> lines --parse--> items ------------------------------> (dead letters: bad lines)
    items --group by source--> one group per GIF --dedup--> unique captions ------> (duplicates: counted)
    groups --> fetch (threads) + decode/select/resize (time-limited children) -----> (dead letters)
    pending examples --batch 256--> CLIP text embedding ---------------------------> (dead letters: long captions)
    examples --encode--> records --split, shard by key hash, sort--> staged shard files
    staged files + counts --commit--> OUTPUT (dataset_info.json last)

Grouping by source before fetching means each GIF is fetched and decoded once, however many captions it has, and
identical manifest lines meet in one place to be de-duplicated. Every manifest line ends as exactly one of: an
example written, a dead letter, a duplicate; the final step asserts that the three add up to the lines read.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from pipeline import records, shards
from pipeline.clip_frames import ClipError, ClipSpec
from pipeline.embed import EmbedCaptions, Pending
from pipeline.manifest import DeadLetter, Item, Line, dedup, parse_line, read_lines
from pipeline.sources import FetchError, FetchPolicy, fetch
from pipeline.timelimit import ChildDied, TimeLimitedPool, TimeLimitExceeded

log = logging.getLogger(__name__)

# The text encoder runs once per batch of this many captions (fewer only at the end of a bundle): a full batch
# amortises the per-call overhead, and one batch size (not BatchElements' adaptive 64-256) means the jitted text
# tower compiles for one shape per caption-length bucket, plus the last batch's, instead of one per power of two.
EMBED_BATCH = 256
_DEAD = EmbedCaptions.DEAD  # the tag of every dead-letter output in the graph
_DUPLICATE = "duplicate"


@dataclass(frozen=True)
class JobSettings:
    """Everything the graph needs, resolved from flags and config by pipeline/run.py."""

    manifests: tuple[str, ...]
    output: str
    run_id: str  # names the staging folder
    text_encoder: str
    text_info: dict[str, Any]  # name, max_length, pooled_dim, token_dim (for dataset_info.json)
    clip: ClipSpec
    val_fraction: float
    num_shards: int | None  # shards per split; or
    target_shard_mb: float | None  # enough shards for this many MiB each
    fetch: FetchPolicy = FetchPolicy()
    element_timeout_s: float = 60.0  # wall-clock limit for decoding one GIF
    fetch_threads: int = 16  # GIFs fetched or decoded at once per DoFn instance (downloads wait on the network)


class _Progress:
    """Per-process counts, logged every `every_s` seconds by whichever thread updates them then."""

    def __init__(self, every_s: float = 30.0) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._every_s = every_s
        self._start = self._last = time.monotonic()

    def add(self, **counts: int) -> None:
        with self._lock:
            self._counts.update(counts)
            now = time.monotonic()
            if now - self._last < self._every_s:
                return
            self._last = now
            snapshot, elapsed = dict(self._counts), now - self._start
        rate = snapshot.get("gifs", 0) / elapsed
        log.info(
            "preprocess worker %d: %d GIFs processed (%.1f/s), %d examples, %d dead letters",
            os.getpid(),
            snapshot.get("gifs", 0),
            rate,
            snapshot.get("examples", 0),
            snapshot.get("dead", 0),
        )


_PROGRESS = _Progress()


@dataclass(frozen=True)
class _Failure:
    stage: str
    reason: str
    detail: str


_DECODE_TARGET = "pipeline.clip_frames:clip_frames"
# GIFs a FetchAndDecode instance keeps in flight (queued, fetching, decoding, or decoded and not yet passed on).
# The bundle thread embeds, encodes and stores a whole batch of EMBED_BATCH examples at a time; with this many in
# flight the decoding children still have work queued while it does (with 16 they idled through most of each
# batch: about a third fewer GIFs/s on the 2-core machine). Only the `threads` being fetched or decoded hold a GIF's
# bytes; the rest wait unfetched or hold their small decoded clip.
DECODE_AHEAD = EMBED_BATCH


def _cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports it, e.g. inside a container)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _SharedDecoders:
    """One pool of decoding children per worker process, one child per core, shared by every FetchAndDecode instance
    (one per harness thread) and stopped when the last of them is torn down.

    Per process, not per DoFn: a worker with many harness threads (Dataflow) still decodes on as many cores as it
    has, and a runner with one bundle thread (the local default) still decodes on all of them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: dict[float, tuple[TimeLimitedPool, int]] = {}  # timeout -> (pool, users)

    def acquire(self, timeout_s: float) -> TimeLimitedPool:
        with self._lock:
            pool, users = self._pools.get(timeout_s) or (TimeLimitedPool(_DECODE_TARGET, timeout_s, _cores()), 0)
            self._pools[timeout_s] = (pool, users + 1)
            return pool

    def release(self, timeout_s: float) -> None:
        with self._lock:
            pool, users = self._pools[timeout_s]
            if users > 1:
                self._pools[timeout_s] = (pool, users - 1)
                return
            del self._pools[timeout_s]
        pool.close()


_DECODERS = _SharedDecoders()


class FetchAndDecode(beam.DoFn):
    """(source, unique items) -> Pending examples (one per caption) or tagged dead letters.

    Each GIF is fetched on a thread (downloads wait on the network, not the CPU), then decoded, its frames chosen and
    resized in one of the worker's decoding children with a wall-clock limit (pipeline/timelimit.py), so neither a
    pathological file nor a crash in native code can hang or kill the worker. Up to DECODE_AHEAD GIFs are in flight
    (`threads` of them fetching or decoding): `process` hands a GIF over and returns the examples of the GIFs that are
    finished, so the children decode while this thread runs the rest of the fused stage (embedding, encoding);
    `finish_bundle` waits for the rest. Examples come out in input order.
    """

    def __init__(self, clip: ClipSpec, policy: FetchPolicy, timeout_s: float, threads: int) -> None:
        self._clip = clip
        self._policy = policy
        self._timeout_s = timeout_s
        self._threads = threads
        self._gifs = Metrics.counter("yagg", "gifs_decoded")

    def setup(self) -> None:
        self._decoder = _DECODERS.acquire(self._timeout_s)
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="fetch")
        self._in_flight: deque[tuple[list[Item], Future]] = deque()

    def teardown(self) -> None:
        self._pool.shutdown(cancel_futures=True)
        _DECODERS.release(self._timeout_s)

    def process(self, group: tuple[str, list[Item]]) -> Iterator[Any]:
        source, items = group
        self._in_flight.append((items, self._pool.submit(self._clip_of, source)))
        yield from self._finished(keep=DECODE_AHEAD)

    def finish_bundle(self) -> Iterator[Any]:
        for output in self._finished(keep=0):
            # Outside `process` Beam needs explicit windows; the job runs in the global window throughout.
            if isinstance(output, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(output.tag, GlobalWindows.windowed_value(output.value))
            else:
                yield GlobalWindows.windowed_value(output)

    def _finished(self, keep: int) -> Iterator[Any]:
        """Outputs of the oldest GIFs in flight: those already done, then (waiting) enough to leave `keep` in flight."""
        while self._in_flight and (len(self._in_flight) > keep or self._in_flight[0][1].done()):
            items, future = self._in_flight.popleft()
            yield from self._outputs(items, future.result())

    def _outputs(self, items: list[Item], outcome: tuple[np.ndarray, np.ndarray] | _Failure) -> Iterator[Any]:
        if isinstance(outcome, _Failure):
            _PROGRESS.add(gifs=1, dead=len(items))
            for item in items:
                yield beam.pvalue.TaggedOutput(_DEAD, item.dead(outcome.stage, outcome.reason, outcome.detail))
            return
        frames, times_ms = outcome
        self._gifs.inc()
        _PROGRESS.add(gifs=1, examples=len(items))
        for item in items:
            yield Pending(item, frames, times_ms)

    def _clip_of(self, source: str) -> tuple[np.ndarray, np.ndarray] | _Failure:
        """(frames, frame_times_ms) of the clip at `source`, or why there is none (runs on a fetch thread)."""
        try:
            data = fetch(source, self._policy)
        except FetchError as e:
            return _Failure("fetch", e.reason, e.detail)
        except Exception as e:  # a failure fetch() does not foresee must cost one GIF, not the whole job
            return _Failure("fetch", f"unexpected {type(e).__name__}", str(e))
        try:
            return self._decoder(data, self._clip)
        except ClipError as e:
            return _Failure(e.stage, e.reason, e.detail)
        except TimeLimitExceeded as e:
            return _Failure("decode", "timeout", str(e))
        except ChildDied as e:
            return _Failure("decode", "decoder crashed", str(e))
        except Exception as e:  # a bug in decoding must cost one GIF, not the whole job
            return _Failure("decode", f"unexpected {type(e).__name__}", str(e))


def _split_duplicates(group: tuple[str, Iterable[Item]]) -> Iterator[Any]:
    source, items = group
    unique, duplicates = dedup(items)
    for item in duplicates:
        Metrics.counter("yagg", "duplicates_removed").inc()
        yield beam.pvalue.TaggedOutput(_DUPLICATE, item)
    yield source, unique


def _parse(line: Line) -> Iterator[Any]:
    Metrics.counter("yagg", "lines_read").inc()
    parsed = parse_line(line)
    if isinstance(parsed, DeadLetter):
        yield beam.pvalue.TaggedOutput(_DEAD, parsed)
    else:
        yield parsed


def _count_dead(dead: DeadLetter) -> DeadLetter:
    Metrics.counter("yagg", f"dead_letter/{dead.stage}/{dead.reason}").inc()
    return dead


def _to_record(example: dict[str, Any], val_fraction: float) -> tuple[str, str, bytes]:
    Metrics.counter("yagg", "examples_written").inc()
    return shards.split_of(example["source"], val_fraction), example["key"], records.encode(example)


def _sum_pairs(pairs: Iterable[tuple[int, int]]) -> tuple[int, int]:
    count = size = 0
    for c, s in pairs:
        count += c
        size += s
    return count, size


def _assign_shard(
    entry: tuple[str, str, bytes], totals: dict[str, tuple[int, int]], settings: JobSettings
) -> tuple[tuple[str, int, int], tuple[str, bytes]]:
    group, key, payload = entry
    count, size = totals[group]
    if group == shards.DEAD_LETTER:
        n = -(-count // shards.DEAD_LETTERS_PER_FILE)
    else:
        n = shards.num_shards(count, size, settings.num_shards, settings.target_shard_mb)
    return (group, shards.shard_of(key, n), n), (key, payload)


def _write(shard: tuple[tuple[str, int, int], Iterable[tuple[str, bytes]]], staging: str) -> shards.ShardFile:
    (group, index, count), entries = shard
    return shards.write_shard(staging, group, index, count, entries)


def _finalize(
    _: None,
    settings: JobSettings,
    files: list[shards.ShardFile],
    lines_read: int,
    duplicates: int,
    dead_counts: list[tuple[tuple[str, str], int]],
) -> dict[str, Any]:
    files = sorted(files, key=lambda f: (f.group, f.index))
    by_reason: Counter[str] = Counter()
    by_stage: Counter[str] = Counter()
    for (stage, reason), n in dead_counts:
        by_reason[reason] += n
        by_stage[stage] += n
    written = sum(f.records for f in files if f.group in shards.SPLITS)
    dead = sum(by_reason.values())
    assert lines_read == written + dead + duplicates, (
        f"accounting: {lines_read} lines read != {written} written + {dead} dead-lettered + {duplicates} duplicates"
    )
    clip, text = settings.clip, settings.text_info
    info = {
        "schema_version": records.SCHEMA_VERSION,
        "features": records.features(
            clip.num_frames, clip.size, text["pooled_dim"], text["max_length"], text["token_dim"]
        ),
        "frames": clip.num_frames,
        "size": clip.size,
        "fps": clip.fps,
        "frame_sampling": "time-uniform" if clip.fps is None else "fixed fps",
        "keep_stills": clip.keep_stills,
        "text_encoder": text,
        "val_fraction": settings.val_fraction,
        "writer_options": shards.WRITER_OPTIONS,
        "manifests": list(settings.manifests),
        "splits": {
            split: {
                "examples": sum(f.records for f in files if f.group == split),
                "shards": [
                    {"file": f.name, "examples": f.records, "bytes": f.bytes} for f in files if f.group == split
                ],
            }
            for split in shards.SPLITS
        },
        "dead_letter_files": [f.name for f in files if f.group == shards.DEAD_LETTER],
        "accounting": {
            "lines_read": lines_read,
            "examples_written": written,
            "dead_lettered": dead,
            "duplicates_removed": duplicates,
            "dead_lettered_by_reason": dict(sorted(by_reason.items())),
            "dead_lettered_by_stage": dict(sorted(by_stage.items())),
        },
    }
    shards.commit(settings.output, shards.staging_dir(settings.output, settings.run_id), files, info)
    return info


def build(p: beam.Pipeline, settings: JobSettings) -> None:
    """Adds the whole job to `p`; running `p` writes the dataset to `settings.output`."""
    lines = (
        p
        | "Manifests" >> beam.Create(list(settings.manifests))
        | "ReadLines" >> beam.FlatMap(read_lines)
        # Spread the lines of one big manifest over the workers before anything costly happens to them.
        | "SpreadLines" >> beam.Reshuffle()
    )
    parsed = lines | "Parse" >> beam.FlatMap(_parse).with_outputs(_DEAD, main="items")
    grouped = (
        parsed.items
        | "BySource" >> beam.Map(lambda item: (item.source, item))
        | "GroupBySource" >> beam.GroupByKey()
        | "Dedup" >> beam.FlatMap(_split_duplicates).with_outputs(_DUPLICATE, main="groups")
    )
    decoded = grouped.groups | "FetchAndDecode" >> beam.ParDo(
        FetchAndDecode(settings.clip, settings.fetch, settings.element_timeout_s, settings.fetch_threads)
    ).with_outputs(_DEAD, main="pending")
    embedded = (
        decoded.pending
        | "BatchCaptions" >> beam.BatchElements(min_batch_size=EMBED_BATCH, max_batch_size=EMBED_BATCH)
        | "Embed" >> beam.ParDo(EmbedCaptions(settings.text_encoder)).with_outputs(_DEAD, main="examples")
    )
    dead = (
        (parsed[_DEAD], decoded[_DEAD], embedded[_DEAD])
        | "AllDeadLetters" >> beam.Flatten()
        | "CountDead" >> beam.Map(_count_dead)
    )

    # Records and dead-letter lines take the same path (sizes -> shard counts -> shard assignment -> one group per
    # file -> written), as two collections: a Flatten of them anywhere before the writing makes the local runner
    # store every record once more (0.2 ms per demo record on the 2-core machine, in series after all decoding).
    entries = {
        "records": embedded.examples | "Encode" >> beam.Map(_to_record, settings.val_fraction),
        "dead": dead
        | "DeadLetterJson"
        >> beam.Map(lambda d: (shards.DEAD_LETTER, shards.dead_letter_key(d), shards.dead_letter_json(d))),
    }
    totals = (
        [group | f"Sizes/{name}" >> beam.Map(lambda e: (e[0], (1, len(e[2])))) for name, group in entries.items()]
        | "AllSizes" >> beam.Flatten()
        | "SumSizes" >> beam.CombinePerKey(_sum_pairs)
    )
    staging = shards.staging_dir(settings.output, settings.run_id)
    files = [
        group
        | f"AssignShard/{name}" >> beam.Map(_assign_shard, totals=beam.pvalue.AsDict(totals), settings=settings)
        | f"GroupByShard/{name}" >> beam.GroupByKey()
        | f"WriteShards/{name}" >> beam.Map(_write, staging)
        for name, group in entries.items()
    ] | "AllFiles" >> beam.Flatten()

    lines_read = lines | "CountLines" >> beam.combiners.Count.Globally()
    duplicates = grouped[_DUPLICATE] | "CountDuplicates" >> beam.combiners.Count.Globally()
    dead_counts = dead | "DeadReasons" >> beam.Map(lambda d: (d.stage, d.reason)) | beam.combiners.Count.PerElement()
    _ = (
        p
        | "Once" >> beam.Create([None])
        | "Commit"
        >> beam.Map(
            _finalize,
            settings=settings,
            files=beam.pvalue.AsList(files),
            lines_read=beam.pvalue.AsSingleton(lines_read),
            duplicates=beam.pvalue.AsSingleton(duplicates),
            dead_counts=beam.pvalue.AsList(dead_counts),
        )
    )
