"""Batched CLIP text embedding inside the Beam job: the encoder is loaded once per worker process.

`EmbedCaptions` takes batches of pending examples (a batch of GIFs' worth, from pipeline/job.py's FetchAndDecode),
checks each caption's token length (a caption longer than the encoder's context becomes a dead letter "caption too
long" instead of being silently truncated), and runs the encoder once per batch. The encoder lives in a
`shared.Shared` handle, so all the DoFn instances (harness threads) of one worker process share one copy of the
weights.

Each caption is encoded at the length of its own bucket (16, 32, 64 tokens, or the encoder's maximum), not at
the maximum (77 for CLIP). The text tower is causal and masks padded keys, so a caption's states do not depend on
the padding after it; a caption of up to 16 tokens (most of TGIF's; the moving-shapes captions have 7) then costs
about a fifth. A batch is split by bucket; the bucket depends on the caption alone, never on the
rest of its batch, so a caption's numbers are the same however the runner batched it and shards stay byte-identical
across runs and runner modes. Stored token states at padded positions are zero. The encoder pads each call's rows to
a power of two (model/clip.py), so the jitted text tower compiles for a handful of shapes per worker; the rows of a
bucket go in power-of-two chunks, so that padding costs at most 7 rows per bucket and batch instead of up to half
the computation.

Text encoders are named as `TextEncoder.from_pretrained` takes them (a Hugging Face hub name, or a local folder in
the Hugging Face layout), or as a folder on any Beam filesystem (`gs://bucket/clip/`): that folder is copied to a
local cache once per worker, so Dataflow workers need no access to the hub.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from model.clip import MAX_BATCH, MIN_BUCKET, TextEncoder  # JAX: imported where text is embedded, not by decoders
from pipeline.batch import Batch
from pipeline.manifest import Item

# The shortest length a caption is encoded at (see the module doc). Short captions share one bucket, so the text
# tower compiles for fewer shapes; at 16 tokens most real captions (TGIF's: 8-20 tokens) fit the first bucket or two.
MIN_TOKENS = 16


@dataclass(frozen=True)
class Pending:
    """An example whose frames are ready and whose caption is not embedded yet."""

    item: Item
    frames: np.ndarray  # uint8 [F, S, S, 3]
    frame_times_ms: np.ndarray  # float32 [F]


class CaptionEncoder(TextEncoder):
    """CLIP's text tower (`model.clip.TextEncoder`) as the job uses it: captions are tokenised once, then each is
    encoded at its own length bucket (see the module doc)."""

    def tokenize(self, captions: list[str]) -> list[list[int]]:
        """Each caption's token ids, with the start and end tokens, before any truncation."""
        return self._token_ids(captions)

    def encode_tokenized(self, token_ids: list[list[int]]) -> dict[str, np.ndarray]:
        """What `encode` returns for these captions (pooled, tokens, mask), with zeros at padded token positions.
        Every caption must be at most max_length tokens long."""
        lengths = np.array([len(ids) for ids in token_ids], np.int64)
        assert not len(lengths) or lengths.max() <= self.max_length, "check caption lengths before encoding"
        mask = (np.arange(self.max_length) < lengths[:, None]).astype(np.int32)
        pooled = np.zeros((len(lengths), self.pooled_dim), np.float32)
        tokens = np.zeros((len(lengths), self.max_length, self.token_dim), np.float32)
        buckets = np.array([min(self.max_length, max(MIN_TOKENS, 1 << (int(n) - 1).bit_length())) for n in lengths])
        for width in np.unique(buckets):
            same_width = np.flatnonzero(buckets == width)
            start = 0
            for size in _row_chunks(len(same_width)):
                rows = same_width[start : start + size]
                start += size
                ids = np.full((len(rows), width), self._pad_id, np.int32)
                for row, index in enumerate(rows):
                    ids[row, : lengths[index]] = token_ids[index]
                out = self.encode_ids(ids, mask[rows, :width])
                pooled[rows] = out["pooled"]
                tokens[rows, :width] = out["tokens"] * mask[rows, :width, None]
        return {"pooled": pooled, "tokens": tokens, "mask": mask}


def _row_chunks(rows: int) -> list[int]:
    """`rows` split into powers of two (largest first, at most MAX_BATCH), plus a last chunk of fewer than
    MIN_BUCKET: the encoder pads each call's rows up to a power of two, so e.g. 182 rows as one call would compute
    256, and as 128 + 32 + 16 + 6 compute 184."""
    chunks = []
    while rows >= MIN_BUCKET:
        chunks.append(min(MAX_BATCH, 1 << (rows.bit_length() - 1)))
        rows -= chunks[-1]
    return chunks + [rows] if rows else chunks


@functools.cache
def load_text_encoder(name: str) -> CaptionEncoder:
    """`CaptionEncoder.from_pretrained(name)`, fetching a `scheme://` folder to a local cache first.

    Loaded once per process and name: with the local runner the launcher's check and the worker share one copy, and
    the text tower compiles once per shape for all the jobs one process runs (tests, benchmarks), not once per job.
    """
    return CaptionEncoder.from_pretrained(_local_copy(name) if "://" in name else name)


def _local_copy(folder: str) -> str:
    """Copies the files directly in `folder` (a Beam filesystem path) to a local cache folder; returns its path."""
    folder = folder.rstrip("/")
    local = os.path.join(tempfile.gettempdir(), "yagg-text-encoders", hashlib.sha256(folder.encode()).hexdigest()[:16])
    if os.path.isfile(os.path.join(local, ".complete")):
        return local
    matches = FileSystems.match([folder + "/*"])[0].metadata_list
    if not matches:
        raise ValueError(f"--text-encoder {folder!r}: no files found in that folder")
    os.makedirs(local, exist_ok=True)
    for metadata in matches:
        # Write to a temporary name and rename, so a concurrent or interrupted copy never leaves a half file.
        target = os.path.join(local, metadata.path.rsplit("/", 1)[-1])
        with (
            FileSystems.open(metadata.path, compression_type=CompressionTypes.UNCOMPRESSED) as src,
            tempfile.NamedTemporaryFile(dir=local, delete=False) as dst,
        ):
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        os.replace(dst.name, target)
    open(os.path.join(local, ".complete"), "w").close()
    return local


class EmbedCaptions(beam.DoFn):
    """list[Pending] -> one list of example dicts (the fields of pipeline/records.py), in order; too-long captions ->
    tagged dead letters."""

    DEAD = "dead"

    def __init__(self, text_encoder: str) -> None:
        self._name = text_encoder
        self._shared = shared.Shared()
        self._encoder = None
        self._embedded = Metrics.counter("yagg", "captions_embedded")
        self._batches = Metrics.counter("yagg", "embedding_batches")

    def setup(self) -> None:
        self._encoder = self._shared.acquire(lambda: load_text_encoder(self._name))

    def process(self, batch: Sequence[Pending]) -> Iterator[Any]:
        fits, token_ids = [], []
        for pending, ids in zip(batch, self._encoder.tokenize([p.item.caption for p in batch]), strict=True):
            if len(ids) > self._encoder.max_length:
                detail = f"{len(ids)} tokens; the text encoder takes at most {self._encoder.max_length}"
                yield beam.pvalue.TaggedOutput(self.DEAD, pending.item.dead("embed", "caption too long", detail))
            else:
                fits.append(pending)
                token_ids.append(ids)
        if not fits:
            return
        out = self._encoder.encode_tokenized(token_ids)
        self._batches.inc()
        self._embedded.inc(len(fits))
        yield Batch(
            {
                "frames": pending.frames,
                "frame_times_ms": pending.frame_times_ms,
                "text_pooled": out["pooled"][i],
                "text_tokens": out["tokens"][i],
                "text_mask": out["mask"][i],
                "caption": pending.item.caption,
                "key": pending.item.key,
                "source": pending.item.name,
            }
            for i, pending in enumerate(fits)
        )
