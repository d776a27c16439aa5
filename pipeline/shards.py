"""The job's output folder: deterministic shard files, dead-letter files, dataset_info.json and the final commit.

Layout of OUTPUT (a local folder or `gs://...`, through contracts/storage.py):

    train-NNNNN-of-MMMMM.array_record   ArrayRecord files (writer option group_size:1, for random access)
    val-NNNNN-of-MMMMM.array_record
    dead_letter-NNNNN-of-MMMMM.jsonl    one JSON object per manifest line that produced no example
    dataset_info.json                   schema, shapes, counts, accounting; written LAST

Determinism: a record's split is a hash of its source, its shard a hash of its key, and each shard is sorted by key,
so the same input gives byte-identical files whatever the runner, the worker count or the order of arrival.

Commit protocol: every file is first written to `OUTPUT/.staging-<run id>/`. Only when all of them exist does one
final step (`commit`) remove the previous run's files (dataset_info.json first), move the new files in and write
dataset_info.json. A folder without dataset_info.json is therefore incomplete: a crash before the commit leaves the
previous dataset untouched (plus a stale staging folder, removed by the next `--overwrite` run); a crash during the
commit leaves no dataset_info.json, and readers must refuse such a folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from array_record.python.array_record_module import ArrayRecordWriter

from contracts import storage
from contracts.dataset import INFO_FILE, DatasetInfo
from pipeline.manifest import DeadLetter

# group_size:1 makes every record its own chunk, which random access (grain's ArrayRecordDataSource) requires.
WRITER_OPTIONS = "group_size:1"
DEAD_LETTER = "dead_letter"
DEAD_LETTERS_PER_FILE = 100_000
STAGING_PREFIX = ".staging-"
# Every name the job writes; with --overwrite exactly these are removed, nothing else in the folder.
_OUTPUT_NAME = re.compile(
    rf"^((train|val)-\d{{5}}-of-\d{{5}}\.array_record|{DEAD_LETTER}-\d{{5}}-of-\d{{5}}\.jsonl|{re.escape(INFO_FILE)}"
    rf"|{re.escape(STAGING_PREFIX)}.*)$"
)


class OutputExistsError(ValueError):
    """The output folder holds a previous dataset and --overwrite was not given."""


@dataclass(frozen=True)
class ShardFile:
    """One written file: which group ("train", "val" or "dead_letter"), its index and size."""

    group: str
    index: int
    count: int  # shards in the group
    name: str
    records: int
    bytes: int


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def split_of(source_name: str, val_fraction: float) -> str:
    """ "val" for a stable `val_fraction` of sources, else "train".

    By source, not by (source, caption): a GIF with several captions lands in one split, so validation clips are
    never seen in training.
    """
    return "val" if _hash(f"split/{source_name}") < val_fraction * 2.0**64 else "train"


def shard_of(key: str, num_shards: int) -> int:
    return _hash(f"shard/{key}") % num_shards


def shard_name(group: str, index: int, count: int) -> str:
    suffix = "jsonl" if group == DEAD_LETTER else "array_record"
    return f"{group}-{index:05d}-of-{count:05d}.{suffix}"


def num_shards(records: int, total_bytes: int, fixed: int | None, target_mb: float | None) -> int:
    """How many shards a split of `records` records gets: `fixed`, or enough for `target_mb` MiB each.

    Never more shards than records (no empty files), and none for an empty split.
    """
    if records == 0:
        return 0
    assert (fixed is None) != (target_mb is None), "exactly one of num_shards and target_shard_mb"
    wanted = fixed if fixed is not None else math.ceil(total_bytes / (target_mb * 2**20))
    return max(1, min(wanted, records))


def dead_letter_json(dead: DeadLetter) -> bytes:
    return json.dumps(asdict(dead), sort_keys=True, ensure_ascii=False).encode() + b"\n"


def dead_letter_key(dead: DeadLetter) -> str:
    """Dead letters are sorted by where they came from."""
    return f"{dead.manifest}\t{dead.line:012d}"


def write_shard(staging: str, group: str, index: int, count: int, records: Iterable[tuple[str, bytes]]) -> ShardFile:
    """Writes one shard's (sort key, payload) pairs, sorted, to `staging` and returns what was written.

    ArrayRecord's writer only writes local files: the shard is written to a local temporary file, then copied to the
    staging folder (local or gs://).
    """
    ordered = sorted(records)  # by key, then bytes: a total order, so equal keys cannot reorder between runs
    name = shard_name(group, index, count)
    with tempfile.TemporaryDirectory() as local_dir:
        local = os.path.join(local_dir, name)
        if group == DEAD_LETTER:
            with open(local, "wb") as f:
                f.writelines(payload for _, payload in ordered)
        else:
            writer = ArrayRecordWriter(local, WRITER_OPTIONS)
            for _, payload in ordered:
                writer.write(payload)
            writer.close()
        size = os.path.getsize(local)
        storage.upload(local, storage.join(staging, name))
    return ShardFile(group, index, count, name, len(ordered), size)


def staging_dir(output: str, run_id: str) -> str:
    return storage.join(output, STAGING_PREFIX + run_id)


def check_output(output: str, overwrite: bool) -> None:
    """Refuses an output folder that already holds files unless `overwrite`. Called before the job starts."""
    if not storage.is_url(output) and os.path.exists(output) and not os.path.isdir(output):
        raise OutputExistsError(f"output {output} is a file; --output must be a folder")
    # Listed, not tested with exists(): on an object store a "folder" is only a prefix and never "exists".
    existing = sorted(_names_in(output))
    if existing and not overwrite:
        shown = ", ".join(existing[:5]) + (", ..." if len(existing) > 5 else "")
        raise OutputExistsError(
            f"output folder {output} is not empty ({shown}); pass --overwrite to replace the dataset in it, "
            "or choose another --output"
        )


def _names_in(folder: str) -> set[str]:
    """Names of the entries directly inside `folder` (files, and first path components below it)."""
    return storage.list_names(folder)


def commit(output: str, staging: str, files: Sequence[ShardFile], info: DatasetInfo) -> None:
    """Replaces the dataset in `output` with the staged `files`, then writes dataset_info.json (see module doc).

    Safe to run again after it failed or was retried midway (a runner may retry the step): files already moved are
    left alone, and a same-named old file is simply overwritten by its new version.
    """
    keep = {f.name for f in files} | {staging.rstrip("/").rsplit("/", 1)[-1]}
    old = sorted(name for name in _names_in(output) - keep if _OUTPUT_NAME.match(name))
    # dataset_info.json goes first: from here until the new one is written, the folder reads as incomplete.
    old.sort(key=lambda name: name != INFO_FILE)
    for name in old:
        storage.remove(storage.join(output, name))  # a stale staging "folder" with everything in it
    for name in (f.name for f in files):
        if storage.exists(storage.join(staging, name)):
            storage.move(storage.join(staging, name), storage.join(output, name))
    storage.write_text(storage.join(output, INFO_FILE), info.to_json())
    storage.remove(staging)
