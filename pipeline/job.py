"""The Beam graph of the preprocessing job: manifests -> examples -> shards, dead letters and dataset_info.json.

    manifest files --read--> lines --parse--> items ------------------------------> (dead letters: bad lines)
    items --group by source--> one group per GIF --dedup--> unique captions ------> (duplicates: counted)
    groups --batch--> fetch (threads) + decode/select/resize (time-limited child) -> (dead letters)
    pending examples --batch 64-256--> CLIP text embedding ------------------------> (dead letters: long captions)
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
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from pipeline import records, shards
from pipeline.clip_frames import ClipError, ClipSpec
from pipeline.embed import EmbedCaptions, Pending
from pipeline.manifest import DeadLetter, Item, Line, dedup, parse_line, read_lines
from pipeline.sources import FetchError, FetchPolicy, fetch
from pipeline.timelimit import ChildDied, TimeLimitedFunction, TimeLimitExceeded

log = logging.getLogger(__name__)

# The text encoder runs once per batch; 64-256 captions amortise its per-call overhead without holding many
# examples' frames in memory at once.
EMBED_BATCH = (64, 256)
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
    fetch_threads: int = 16  # concurrent downloads per DoFn instance


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


class FetchAndDecode(beam.DoFn):
    """Batches of (source, unique items) -> Pending examples (one per caption) or tagged dead letters.

    The batch's sources are fetched concurrently on threads (downloads wait on the network, not the CPU); each GIF
    is then decoded, its frames chosen and resized in a child process with a wall-clock limit (pipeline/timelimit.py),
    so neither a pathological file nor a crash in native code can hang or kill the worker.
    """

    def __init__(self, clip: ClipSpec, policy: FetchPolicy, timeout_s: float, threads: int) -> None:
        self._clip = clip
        self._policy = policy
        self._timeout_s = timeout_s
        self._threads = threads
        self._gifs = Metrics.counter("yagg", "gifs_decoded")

    def setup(self) -> None:
        self._decoder = TimeLimitedFunction("pipeline.clip_frames:clip_frames", self._timeout_s)
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="fetch")

    def teardown(self) -> None:
        self._decoder.close()
        self._pool.shutdown(cancel_futures=True)

    def _fetch(self, source: str) -> bytes | FetchError:
        try:
            return fetch(source, self._policy)
        except FetchError as e:
            return e
        except Exception as e:  # a failure fetch() does not foresee must cost one GIF, not the whole job
            return FetchError(f"unexpected {type(e).__name__}", str(e))

    def process(self, groups: Sequence[tuple[str, list[Item]]]) -> Iterator[Any]:
        fetched = self._pool.map(self._fetch, [source for source, _ in groups])
        for (_, items), data in zip(groups, fetched, strict=True):
            if isinstance(data, FetchError):
                outcome: tuple[np.ndarray, np.ndarray] | _Failure = _Failure("fetch", data.reason, data.detail)
            else:
                outcome = self._decode(data)
            if isinstance(outcome, _Failure):
                _PROGRESS.add(gifs=1, dead=len(items))
                for item in items:
                    yield beam.pvalue.TaggedOutput(_DEAD, item.dead(outcome.stage, outcome.reason, outcome.detail))
                continue
            frames, times_ms = outcome
            self._gifs.inc()
            _PROGRESS.add(gifs=1, examples=len(items))
            for item in items:
                yield Pending(item, frames, times_ms)

    def _decode(self, data: bytes) -> tuple[np.ndarray, np.ndarray] | _Failure:
        """(frames, frame_times_ms) of the clip, or why there is none."""
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
    decoded = (
        grouped.groups
        | "BatchSources"
        >> beam.BatchElements(min_batch_size=settings.fetch_threads, max_batch_size=settings.fetch_threads)
        | "FetchAndDecode"
        >> beam.ParDo(
            FetchAndDecode(settings.clip, settings.fetch, settings.element_timeout_s, settings.fetch_threads)
        ).with_outputs(_DEAD, main="pending")
    )
    embedded = (
        decoded.pending
        | "BatchCaptions" >> beam.BatchElements(min_batch_size=EMBED_BATCH[0], max_batch_size=EMBED_BATCH[1])
        | "Embed" >> beam.ParDo(EmbedCaptions(settings.text_encoder)).with_outputs(_DEAD, main="examples")
    )
    dead = (
        (parsed[_DEAD], decoded[_DEAD], embedded[_DEAD])
        | "AllDeadLetters" >> beam.Flatten()
        | "CountDead" >> beam.Map(_count_dead)
    )

    entries = (
        embedded.examples | "Encode" >> beam.Map(_to_record, settings.val_fraction),
        dead
        | "DeadLetterJson"
        >> beam.Map(lambda d: (shards.DEAD_LETTER, shards.dead_letter_key(d), shards.dead_letter_json(d))),
    ) | "AllEntries" >> beam.Flatten()
    totals = (
        entries | "Sizes" >> beam.Map(lambda e: (e[0], (1, len(e[2])))) | "SumSizes" >> beam.CombinePerKey(_sum_pairs)
    )
    staging = shards.staging_dir(settings.output, settings.run_id)
    files = (
        entries
        | "AssignShard" >> beam.Map(_assign_shard, totals=beam.pvalue.AsDict(totals), settings=settings)
        | "GroupByShard" >> beam.GroupByKey()
        | "WriteShards" >> beam.Map(_write, staging)
    )

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
