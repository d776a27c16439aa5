"""Batched CLIP text embedding inside the Beam job: the encoder is loaded once per worker process.

`EmbedCaptions` takes batches of pending examples (from `beam.BatchElements`), checks each caption's token length
(a caption longer than the encoder's context becomes a dead letter "caption too long" instead of being silently
truncated), and runs the encoder once per batch. The encoder lives in a `shared.Shared` handle, so all the DoFn
instances (harness threads) of one worker process share one copy of the weights.

The encoder pads each batch to one of a few bucket sizes itself (model/clip.py), so however BatchElements sizes the
batches, the jitted text tower compiles only a handful of times per worker.

Text encoders are named as `TextEncoder.from_pretrained` takes them (a Hugging Face hub name, or a local folder in
the Hugging Face layout), or as a folder on any Beam filesystem (`gs://bucket/clip/`): that folder is copied to a
local cache once per worker, so Dataflow workers need no access to the hub.
"""

from __future__ import annotations

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

from pipeline.manifest import Item


@dataclass(frozen=True)
class Pending:
    """An example whose frames are ready and whose caption is not embedded yet."""

    item: Item
    frames: np.ndarray  # uint8 [F, S, S, 3]
    frame_times_ms: np.ndarray  # float32 [F]


def load_text_encoder(name: str) -> Any:
    """`model.clip.TextEncoder.from_pretrained(name)`, fetching a `scheme://` folder to a local cache first."""
    from model.clip import TextEncoder  # JAX is imported only where text is embedded, never on the image path.

    return TextEncoder.from_pretrained(_local_copy(name) if "://" in name else name)


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
    """list[Pending] -> example dicts (the fields of pipeline/records.py); too-long captions -> tagged dead letters."""

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
        lengths = self._encoder.token_lengths([p.item.caption for p in batch])
        fits = []
        for pending, length in zip(batch, lengths, strict=True):
            if length > self._encoder.max_length:
                detail = f"{length} tokens; the text encoder takes at most {self._encoder.max_length}"
                yield beam.pvalue.TaggedOutput(self.DEAD, pending.item.dead("embed", "caption too long", detail))
            else:
                fits.append(pending)
        if not fits:
            return
        out = self._encoder.encode([p.item.caption for p in fits])
        self._batches.inc()
        self._embedded.inc(len(fits))
        for i, pending in enumerate(fits):
            yield {
                "frames": pending.frames,
                "frame_times_ms": pending.frame_times_ms,
                "text_pooled": out["pooled"][i],
                "text_tokens": out["tokens"][i],
                "text_mask": out["mask"][i],
                "caption": pending.item.caption,
                "key": pending.item.key,
                "source": pending.item.name,
            }
