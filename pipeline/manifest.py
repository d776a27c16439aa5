"""Manifest lines -> work items: reading TGIF-layout manifests, parsing, resolving sources, de-duplicating.

A manifest has one `<url-or-path>\\t<caption>` per line (TGIF's `tgif-v1.0.tsv` layout; extra columns are ignored).
Every line becomes either an `Item` (one (source, caption) pair to process) or a `DeadLetter` that says why not, so
the job can account for every line it read. Items and dead letters carry the manifest file and line number they came
from, for traceability.

Relative paths resolve against the manifest's folder, so a dataset folder with its manifest can be moved or copied to
`gs://` as a whole. The example key is a hash of the source *as written in the manifest* and the caption: it does not
change when the folder moves, so neither does the train/val split.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from contracts import storage

_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Line:
    """One raw manifest line (without its line break), with where it came from (1-based line number)."""

    manifest: str
    number: int
    data: bytes


@dataclass(frozen=True)
class DeadLetter:
    """A line that produced no example, and why: `stage` is where it failed, `reason` a short category that is
    counted in dataset_info.json, `detail` the specific message."""

    source: str
    caption: str
    stage: str
    reason: str
    detail: str
    manifest: str
    line: int


@dataclass(frozen=True)
class Item:
    """One (source, caption) pair. `source` is resolved (what is fetched); `name` is the source as written."""

    source: str
    name: str
    caption: str
    manifest: str
    line: int

    @property
    def key(self) -> str:
        """A stable hash of (source as written, caption): the example's identity, shard and sort order."""
        return hashlib.sha256(f"{self.name}\t{self.caption}".encode()).hexdigest()[:32]

    def dead(self, stage: str, reason: str, detail: str = "") -> DeadLetter:
        return DeadLetter(self.source, self.caption, stage, reason, detail or reason, self.manifest, self.line)


def expand_manifests(patterns: Sequence[str]) -> list[str]:
    """The manifest files that `patterns` (paths or globs, local or gs://; contracts/storage.py) match, sorted.

    Local paths are made absolute, so relative sources resolve the same way on every worker.
    """
    found: set[str] = set()
    for pattern in patterns:
        matched = storage.glob(storage.check(pattern, "--manifest"))
        if not matched:
            raise ValueError(f"--manifest {pattern!r} matches no file")
        found.update(matched)
    return sorted(found)


def read_lines(manifest: str) -> Iterator[Line]:
    """Yields every line of one manifest as bytes (decoding happens per line, so one bad byte costs one line).

    Only `\\n` ends a line (a trailing `\\r` is dropped): a stray carriage return inside a caption does not split it.
    Compressed manifests (`.gz`, `.bz2`) are read transparently.
    """
    number = 0
    pending = b""
    with storage.open_read(manifest, decompress=True) as f:
        while chunk := f.read(_READ_CHUNK):
            *complete, pending = (pending + chunk).split(b"\n")
            for data in complete:
                number += 1
                yield Line(manifest, number, data.removesuffix(b"\r"))
    if pending:
        yield Line(manifest, number + 1, pending.removesuffix(b"\r"))


def parse_line(line: Line) -> Item | DeadLetter:
    """Turns one manifest line into an Item, or into a DeadLetter at stage "manifest"."""
    try:
        text = line.data.decode("utf-8")
    except UnicodeDecodeError as e:
        source, _, caption = line.data.decode("utf-8", errors="replace").partition("\t")
        return DeadLetter(source, caption, "manifest", "non-UTF-8 text", str(e), line.manifest, line.number)

    def dead(reason: str, source: str = "", caption: str = "") -> DeadLetter:
        return DeadLetter(source, caption, "manifest", reason, reason, line.manifest, line.number)

    if not text.strip():
        return dead("blank line")
    if "\t" not in text:
        return dead("malformed line (no tab)", source=text.strip())
    name, caption = (column.strip() for column in text.split("\t")[:2])
    if not name:
        return dead("blank source", caption=caption)
    if not caption:
        return dead("blank caption", source=name)
    return Item(resolve_source(name, line.manifest), name, caption, line.manifest, line.number)


def resolve_source(name: str, manifest: str) -> str:
    """URLs and absolute paths are taken as they are; relative paths resolve against the manifest's folder."""
    if _has_scheme(name):
        return name
    if os.path.isabs(name):
        return os.path.normpath(name)
    if _has_scheme(manifest):  # string handling: no request to the store here
        return f"{manifest.rpartition('/')[0]}/{posixpath.normpath(name)}"
    return os.path.normpath(os.path.join(os.path.dirname(manifest), name))


def dedup(items: Iterable[Item]) -> tuple[list[Item], list[Item]]:
    """Splits items of one source into (unique, duplicates) by caption.

    The first occurrence (by manifest, then line) of each caption is kept, so the outcome does not depend on the
    order in which a runner delivers the items. A GIF with several different captions keeps every caption.
    """
    unique: dict[str, Item] = {}
    duplicates: list[Item] = []
    for item in sorted(items, key=lambda i: (i.manifest, i.line)):
        if item.caption in unique:
            duplicates.append(item)
        else:
            unique[item.caption] = item
    return list(unique.values()), duplicates


def _has_scheme(path: str) -> bool:
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme.isalnum()
