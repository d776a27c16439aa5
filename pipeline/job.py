"""The Beam graph of the preprocessing job: manifests -> examples -> shards, dead letters and dataset_info.json.

    manifest files --read--> lines --parse--> items ------------------------------> (dead letters: bad lines)
    items --group by source--> one group per GIF --dedup--> unique captions ------> (duplicates: counted)
    groups --batch of ~256 captions--> fetch (threads) + decode/select/resize -----> (dead letters)
           (time-limited children, many GIFs per exchange)
    a batch of pending examples --> CLIP text embedding ---------------------------> (dead letters: long captions)
    --encode--> a batch of records --split, shard by key hash--> staged shard files (sorted by key)
    staged files + counts --commit--> OUTPUT (dataset_info.json last)

Grouping by source before fetching means each GIF is fetched and decoded once, however many captions it has, and
identical manifest lines meet in one place to be de-duplicated. The grouping is also the job's one shuffle before the
costly work: it spreads the GIFs of one big manifest over the workers. Every manifest line ends as exactly one of: an
example written, a dead letter, a duplicate; the final step asserts that the three add up to the lines read.

From the batching on, one element is a batch of GIFs and then of their records, not one example: Beam's cost per
element (one DoFn call per stage, a coder at every shuffle) is then paid once per few hundred examples. On the 2-core
development machine, with the demo's small clips, the job's own thread had spent about as much CPU per example
(Beam, embedding, encoding) as a child spent decoding its GIF; batching took a third of that off (README,
"Benchmarks").
"""

from __future__ import annotations

import itertools
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

from contracts import records
from contracts.dataset import SPLITS, Accounting, DatasetInfo, Shard, Split, TextEncoderInfo
from pipeline import shards
from pipeline.batch import Batch
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
    text_encoder: TextEncoderInfo  # the CLIP, as named by the user, and its shapes
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
# GIFs per exchange with a decoding child (timelimit.TimeLimitedFunction.map): enough that the round trip is paid once
# per many GIFs, few enough that a batch's GIFs still spread over all the children.
DECODE_CHUNK = 16


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

Group = tuple[str, list[Item]]  # a GIF's source and its unique manifest items


class FetchAndDecode(beam.DoFn):
    """A batch of groups (source, unique items) -> one list of Pending examples, one per caption, in input order; the
    GIFs that yield no clip become tagged dead letters, one per item.

    Each GIF is fetched on a thread (downloads wait on the network, not the CPU), then decoded, its frames chosen and
    resized in one of the worker's decoding children with a wall-clock limit per GIF (pipeline/timelimit.py), so
    neither a pathological file nor a crash in native code can hang or kill the worker. The GIFs go to the children
    DECODE_CHUNK at a time, one chunk per free child. `process` starts a batch and returns the previous one's
    examples, so the children decode a batch while this thread runs the rest of the fused stage (embedding,
    encoding) on the one before; `finish_bundle` returns the last.
    """

    def __init__(self, clip: ClipSpec, policy: FetchPolicy, timeout_s: float, threads: int) -> None:
        self._clip = clip
        self._policy = policy
        self._timeout_s = timeout_s
        self._threads = threads
        self._gifs = Metrics.counter("yagg", "gifs_decoded")

    def setup(self) -> None:
        self._decoder = _DECODERS.acquire(self._timeout_s)
        self._fetchers = ThreadPoolExecutor(self._threads, thread_name_prefix="fetch")
        # One thread per decoding child: each hands a chunk to a free child and waits for its answers.
        self._chunks = ThreadPoolExecutor(_cores(), thread_name_prefix="decode")
        self._in_flight: deque[tuple[list[Group], list[Future]]] = deque()

    def teardown(self) -> None:
        self._fetchers.shutdown(cancel_futures=True)
        self._chunks.shutdown(cancel_futures=True)
        _DECODERS.release(self._timeout_s)

    def process(self, batch: list[Group]) -> Iterator[Any]:
        fetched = [self._fetchers.submit(self._fetch, source) for source, _ in batch]
        chunks = [
            self._chunks.submit(self._decode, fetched[i : i + DECODE_CHUNK]) for i in range(0, len(batch), DECODE_CHUNK)
        ]
        self._in_flight.append((batch, chunks))
        while len(self._in_flight) > 1:
            yield from self._outputs(*self._in_flight.popleft())

    def finish_bundle(self) -> Iterator[Any]:
        while self._in_flight:
            for output in self._outputs(*self._in_flight.popleft()):
                # Outside `process` Beam needs explicit windows; the job runs in the global window throughout.
                if isinstance(output, beam.pvalue.TaggedOutput):
                    yield beam.pvalue.TaggedOutput(output.tag, GlobalWindows.windowed_value(output.value))
                else:
                    yield GlobalWindows.windowed_value(output)

    def _outputs(self, batch: list[Group], chunks: list[Future]) -> Iterator[Any]:
        outcomes = [outcome for chunk in chunks for outcome in chunk.result()]
        pending: list[Pending] = []
        for (_, items), outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, _Failure):
                _PROGRESS.add(gifs=1, dead=len(items))
                for item in items:
                    yield beam.pvalue.TaggedOutput(_DEAD, item.dead(outcome.stage, outcome.reason, outcome.detail))
                continue
            frames, times_ms = outcome
            self._gifs.inc()
            _PROGRESS.add(gifs=1, examples=len(items))
            pending += [Pending(item, frames, times_ms) for item in items]
        if pending:
            yield Batch(pending)

    def _fetch(self, source: str) -> bytes | _Failure:
        """The GIF's bytes, or why there are none (runs on a fetch thread)."""
        try:
            return fetch(source, self._policy)
        except FetchError as e:
            return _Failure("fetch", e.reason, e.detail)
        except Exception as e:  # a failure fetch() does not foresee must cost one GIF, not the whole job
            return _Failure("fetch", f"unexpected {type(e).__name__}", str(e))

    def _decode(self, fetched: list[Future]) -> list[tuple[np.ndarray, np.ndarray] | _Failure]:
        """(frames, frame_times_ms) of each fetched GIF, or why there is none (runs on a decode thread)."""
        datas = [future.result() for future in fetched]
        decoded = iter(self._decoder.map([(data, self._clip) for data in datas if not isinstance(data, _Failure)]))
        return [data if isinstance(data, _Failure) else _decode_outcome(next(decoded)) for data in datas]


def _decode_outcome(outcome: Any) -> tuple[np.ndarray, np.ndarray] | _Failure:
    """A decoding child's answer for one GIF (timelimit.TimeLimitedFunction.map) as a clip or a failure."""
    if isinstance(outcome, ClipError):
        return _Failure(outcome.stage, outcome.reason, outcome.detail)
    if isinstance(outcome, TimeLimitExceeded):
        return _Failure("decode", "timeout", str(outcome))
    if isinstance(outcome, ChildDied):
        return _Failure("decode", "decoder crashed", str(outcome))
    if isinstance(outcome, Exception):  # a bug in decoding must cost one GIF, not the whole job
        return _Failure("decode", f"unexpected {type(outcome).__name__}", str(outcome))
    return outcome


def _split_duplicates(group: tuple[str, Iterable[Item]]) -> Iterator[Any]:
    source, items = group
    unique, duplicates = dedup(items)
    for item in duplicates:
        Metrics.counter("yagg", "duplicates_removed").inc()
        yield beam.pvalue.TaggedOutput(_DUPLICATE, item)
    yield source, unique


def _parse(line: Line) -> Iterator[Any]:
    """A manifest line -> (source, item) keyed for the grouping by GIF, or a tagged dead letter."""
    Metrics.counter("yagg", "lines_read").inc()
    parsed = parse_line(line)
    if isinstance(parsed, DeadLetter):
        yield beam.pvalue.TaggedOutput(_DEAD, parsed)
    else:
        yield parsed.source, parsed


def _count_dead(dead: DeadLetter) -> DeadLetter:
    Metrics.counter("yagg", f"dead_letter/{dead.stage}/{dead.reason}").inc()
    return dead


Entry = tuple[str, str, bytes]  # (group: a split or shards.DEAD_LETTER, sort key, payload)


def _to_records(examples: list[dict[str, Any]], val_fraction: float) -> Batch:
    """A batch of examples -> a Batch of record entries."""
    Metrics.counter("yagg", "examples_written").inc(len(examples))
    return Batch((shards.split_of(e["source"], val_fraction), e["key"], records.encode(e)) for e in examples)


def _sizes(entries: list[Entry]) -> Iterator[tuple[str, tuple[int, int]]]:
    """(group, (entries, bytes)) for each group a batch of entries holds."""
    totals: dict[str, list[int]] = {}
    for group, _, payload in entries:
        count_size = totals.setdefault(group, [0, 0])
        count_size[0] += 1
        count_size[1] += len(payload)
    for group, (count, size) in totals.items():
        yield group, (count, size)


def _sum_pairs(pairs: Iterable[tuple[int, int]]) -> tuple[int, int]:
    count = size = 0
    for c, s in pairs:
        count += c
        size += s
    return count, size


def _assign_shards(
    entries: list[Entry], totals: dict[str, tuple[int, int]], settings: JobSettings
) -> Iterator[tuple[tuple[str, int, int], list[tuple[str, bytes]]]]:
    """A batch of entries -> ((group, shard, shards in the group), the batch's (key, payload) pairs of that shard)."""
    counts = {group: _shard_count(group, *totals[group], settings) for group in {group for group, _, _ in entries}}
    by_shard: dict[tuple[str, int, int], list[tuple[str, bytes]]] = {}
    for group, key, payload in entries:
        n = counts[group]
        by_shard.setdefault((group, shards.shard_of(key, n), n), []).append((key, payload))
    yield from by_shard.items()


def _shard_count(group: str, records: int, size: int, settings: JobSettings) -> int:
    if group == shards.DEAD_LETTER:
        return -(-records // shards.DEAD_LETTERS_PER_FILE)
    return shards.num_shards(records, size, settings.num_shards, settings.target_shard_mb)


def _write(shard: tuple[tuple[str, int, int], Iterable[list[tuple[str, bytes]]]], staging: str) -> shards.ShardFile:
    (group, index, count), parts = shard
    return shards.write_shard(staging, group, index, count, itertools.chain.from_iterable(parts))


def _finalize(
    _: None,
    settings: JobSettings,
    files: list[shards.ShardFile],
    lines_read: int,
    duplicates: int,
    dead_counts: list[tuple[tuple[str, str], int]],
) -> DatasetInfo:
    files = sorted(files, key=lambda f: (f.group, f.index))
    by_reason: Counter[str] = Counter()
    by_stage: Counter[str] = Counter()
    for (stage, reason), n in dead_counts:
        by_reason[reason] += n
        by_stage[stage] += n
    written = sum(f.records for f in files if f.group in SPLITS)
    dead = sum(by_reason.values())
    assert lines_read == written + dead + duplicates, (
        f"accounting: {lines_read} lines read != {written} written + {dead} dead-lettered + {duplicates} duplicates"
    )
    clip = settings.clip
    info = DatasetInfo(
        schema_version=records.SCHEMA_VERSION,
        frames=clip.num_frames,
        size=clip.size,
        fps=clip.fps,
        keep_stills=clip.keep_stills,
        text_encoder=settings.text_encoder,
        val_fraction=settings.val_fraction,
        writer_options=shards.WRITER_OPTIONS,
        manifests=tuple(settings.manifests),
        splits={
            split: Split(
                examples=sum(f.records for f in files if f.group == split),
                shards=tuple(Shard(file=f.name, examples=f.records, bytes=f.bytes) for f in files if f.group == split),
            )
            for split in SPLITS
        },
        dead_letter_files=tuple(f.name for f in files if f.group == shards.DEAD_LETTER),
        accounting=Accounting(
            lines_read=lines_read,
            examples_written=written,
            dead_lettered=dead,
            duplicates_removed=duplicates,
            dead_lettered_by_reason=dict(sorted(by_reason.items())),
            dead_lettered_by_stage=dict(sorted(by_stage.items())),
        ),
    )
    shards.commit(settings.output, shards.staging_dir(settings.output, settings.run_id), files, info)
    return info


def build(p: beam.Pipeline, settings: JobSettings) -> None:
    """Adds the whole job to `p`; running `p` writes the dataset to `settings.output`."""
    lines = p | "Manifests" >> beam.Create(list(settings.manifests)) | "ReadLines" >> beam.FlatMap(read_lines)
    parsed = lines | "Parse" >> beam.FlatMap(_parse).with_outputs(_DEAD, main="items")
    grouped = (
        parsed.items
        # The one shuffle before the costly work: it also spreads a big manifest's GIFs over the workers.
        | "GroupBySource" >> beam.GroupByKey()
        | "Dedup" >> beam.FlatMap(_split_duplicates).with_outputs(_DUPLICATE, main="groups")
    )
    decoded = (
        grouped.groups
        | "BatchGifs"
        >> beam.BatchElements(
            min_batch_size=EMBED_BATCH, max_batch_size=EMBED_BATCH, element_size_fn=lambda group: len(group[1])
        )
        | "FetchAndDecode"
        >> beam.ParDo(FetchAndDecode(settings.clip, settings.fetch, settings.element_timeout_s, settings.fetch_threads))
        .with_output_types(Batch)
        .with_outputs(_DEAD, main="pending")
    )
    embedded = decoded.pending | "Embed" >> beam.ParDo(EmbedCaptions(settings.text_encoder.name)).with_output_types(
        Batch
    ).with_outputs(_DEAD, main="examples")
    dead = (
        (parsed[_DEAD], decoded[_DEAD], embedded[_DEAD])
        | "AllDeadLetters" >> beam.Flatten()
        | "CountDead" >> beam.Map(_count_dead)
    )

    # Records and dead-letter lines take the same path (sizes -> shard counts -> shard assignment -> one group per
    # file -> written), as two collections of entry lists: records a batch per element, dead letters one each (they
    # are few). A Flatten of them anywhere before the writing makes the local runner store every record once more.
    entries = {
        "records": embedded.examples
        | "Encode" >> beam.Map(_to_records, settings.val_fraction).with_output_types(Batch),
        "dead": dead
        | "DeadLetterJson"
        >> beam.Map(lambda d: [(shards.DEAD_LETTER, shards.dead_letter_key(d), shards.dead_letter_json(d))]),
    }
    totals = (
        [group | f"Sizes/{name}" >> beam.FlatMap(_sizes) for name, group in entries.items()]
        | "AllSizes" >> beam.Flatten()
        | "SumSizes" >> beam.CombinePerKey(_sum_pairs)
    )
    staging = shards.staging_dir(settings.output, settings.run_id)
    files = [
        group
        | f"AssignShard/{name}" >> beam.FlatMap(_assign_shards, totals=beam.pvalue.AsDict(totals), settings=settings)
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
