"""The sets of clips FVD compares (`ClipSet` of eval/fvd.py): a folder of GIFs, a manifest, or a preprocessed dataset.

    open_clip_set(PATH, frames=16, max_clips=None, split="val")

  * a folder with `dataset_info.json`: a dataset written by `yagg preprocess`; the clips of one split (records with
    the same source GIF count once: a GIF with several captions is one clip), as the records hold them;
  * any other folder: every `*.gif` under it (recursively, in path order);
  * a file: a manifest in TGIF's layout (`<url-or-path>\\t<caption>`; pipeline/manifest.py reads it, relative paths
    resolve against its folder, each source counts once).

GIFs go through preprocessing's own decoder and frame choice (pipeline/clip_frames.py::chosen_frames: `frames` frames
by time over the clip's duration, stills refused) at their own resolution; eval/fvd.py resizes them. A GIF that
yields no clip is skipped and counted by reason. `max_clips` keeps the first clips in order (GIF sources after
de-duplication, records in shard order); skipped ones are not replaced, so a set may have fewer.

This module holds yagg's only imports of the record schema and the dataset description for FVD.
"""

from __future__ import annotations

import collections
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grain
import numpy as np

from contracts import records, storage
from contracts.dataset import INFO_FILE, SPLITS, DataError, local_shards, read_dataset_info
from eval.fvd import FvdError
from pipeline.clip_frames import ClipError, ClipSpec, chosen_frames


class _Unreadable(Exception):
    """A GIF's bytes could not be read; `reason` is a short category for the skipped counts."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class GifSet:
    """GIFs at `locations`, each read by `read(location) -> bytes`; clips of `frames` frames chosen by time."""

    def __init__(
        self,
        description: str,
        locations: Sequence[str],
        read: Callable[[str], bytes],
        *,
        frames: int,
        max_clips: int | None,
        skipped: dict[str, int] | None = None,
    ) -> None:
        self.description = description
        self._locations = list(locations)[:max_clips]
        self._read = read
        self._spec = ClipSpec(num_frames=frames, size=0, fps=None)  # size: unused by chosen_frames
        self._skipped = collections.Counter(skipped or {})
        self._initial = dict(self._skipped)
        self.expected = len(self._locations)

    def fingerprint(self) -> str:
        """The GIFs' bytes in order (not their names: the same GIFs in a folder or a manifest share features)."""
        digest = hashlib.sha256(b"gifs\n")
        for location in self._locations:
            try:
                content = hashlib.sha256(self._read(location)).hexdigest()
            except _Unreadable as e:  # it yields no clip, so it adds nothing but its reason
                content = f"unreadable: {e.reason}"
            digest.update(f"{content}\n".encode())
        return digest.hexdigest()

    def clips(self) -> Iterator[np.ndarray]:
        self._skipped = collections.Counter(self._initial)
        for location in self._locations:
            try:
                frames, _ = chosen_frames(self._read(location), self._spec)
            except ClipError as e:
                self._skipped[f"{e.stage}: {e.reason}"] += 1
                continue
            except _Unreadable as e:
                self._skipped[f"read: {e.reason}"] += 1
                continue
            yield frames

    def skipped(self) -> dict[str, int]:
        return dict(self._skipped)


class DatasetSet:
    """The clips of ArrayRecord shards written by `yagg preprocess`, one per source GIF, in shard order."""

    def __init__(self, description: str, shards: Sequence[str], *, max_clips: int | None) -> None:
        self.description = description
        self._source = grain.sources.ArrayRecordDataSource(list(shards))
        self._max_clips = max_clips
        self._chosen: list[int] | None = None  # record indices, one per source GIF
        self._fingerprint = ""
        self.expected = len(self._source) if max_clips is None else min(len(self._source), max_clips)

    def _scan(self) -> list[int]:
        """One pass over the records: the first record of each source, up to max_clips, hashing what is used."""
        if self._chosen is None:
            seen: set[str] = set()
            chosen: list[int] = []
            digest = hashlib.sha256(b"records\n")
            for i in range(len(self._source)):
                if self._max_clips is not None and len(chosen) >= self._max_clips:
                    break
                data = self._source[i]
                source = records.decode(data)["source"]
                if source in seen:
                    continue
                seen.add(source)
                chosen.append(i)
                digest.update(hashlib.sha256(data).digest())
            self._chosen, self._fingerprint = chosen, digest.hexdigest()
            self.expected = len(chosen)
        return self._chosen

    def fingerprint(self) -> str:
        self._scan()
        return self._fingerprint

    def clips(self) -> Iterator[np.ndarray]:
        for i in self._scan():
            yield np.asarray(records.decode(self._source[i])["frames"])

    def skipped(self) -> dict[str, int]:
        return {}


def dataset_set(shards: Sequence[str], description: str, max_clips: int | None) -> DatasetSet:
    """The clips of given shards (the eval job passes the validation split's)."""
    if not shards:
        raise FvdError(f"{description}: no shards")
    return DatasetSet(description, shards, max_clips=max_clips)


def open_clip_set(path: str | Path, *, frames: int, max_clips: int | None, split: str = "val"):
    """The ClipSet at `path`, local or gs:// (module doc); FvdError when it is none of the three, or empty."""
    try:
        path = storage.check(os.fspath(path), "a clip set")
    except storage.PathError as e:
        raise FvdError(str(e)) from e
    if storage.is_file(storage.join(path, INFO_FILE)):
        if split not in SPLITS:
            raise FvdError(f"unknown split {split!r}; choose from {SPLITS}")
        try:
            shards = local_shards(path, read_dataset_info(path), split)
        except DataError as e:
            raise FvdError(str(e)) from e
        if not shards:
            raise FvdError(f"the dataset {path} has no {split} shards; choose another --split")
        return dataset_set(shards, f"dataset {path} ({split} split)", max_clips)
    if storage.path(path).is_dir():
        files = [f for f in storage.iter_files(path) if f.lower().endswith(".gif")]
        if not files:
            raise FvdError(f"{path} holds no .gif file (nor dataset_info.json, so it is not a dataset either)")
        description = f"GIF folder {path} ({len(files)} files)"
        return GifSet(description, files, _read_file, frames=frames, max_clips=max_clips)
    if storage.is_file(path):
        return _manifest_set(path, frames=frames, max_clips=max_clips)
    raise FvdError(f"{path} does not exist: pass a folder of GIFs, a manifest file or a `yagg preprocess` folder")


def _read_file(location: str) -> bytes:
    try:
        return storage.read_bytes(location)
    except OSError as e:
        raise _Unreadable(e.strerror or type(e).__name__) from e


def _manifest_set(path: str, *, frames: int, max_clips: int | None) -> GifSet:
    # The manifest reader and the fetcher bring Apache Beam (their filesystems); only manifests need them.
    from pipeline import manifest as manifest_lib
    from pipeline.sources import FetchError, fetch

    def read(location: str) -> bytes:
        try:
            return fetch(location)
        except FetchError as e:
            raise _Unreadable(e.reason) from e

    locations: dict[str, None] = {}  # resolved sources in first-seen order, each once
    skipped: collections.Counter[str] = collections.Counter()
    for line in manifest_lib.read_lines(path if storage.is_url(path) else os.path.abspath(path)):
        parsed = manifest_lib.parse_line(line)
        if isinstance(parsed, manifest_lib.DeadLetter):
            skipped[f"manifest: {parsed.reason}"] += 1
        else:
            locations.setdefault(parsed.source)
    if not locations:
        raise FvdError(f"the manifest {path} names no GIF ({sum(skipped.values())} unusable lines)")
    description = f"manifest {path} ({len(locations)} GIFs)"
    return GifSet(description, list(locations), read, frames=frames, max_clips=max_clips, skipped=dict(skipped))
