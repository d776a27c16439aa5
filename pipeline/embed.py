"""Batched CLIP text embedding inside the Beam job: one text conditioner per worker process.

`EmbedCaptions` takes batches of pending examples (a batch of GIFs' worth, from pipeline/job.py's FetchAndDecode),
checks each caption's token length (a caption longer than the encoder's context becomes a dead letter "caption too
long" instead of being silently truncated), and encodes the batch with contracts/conditioning.py, the definition of a
caption's condition arrays that every sampler shares. The conditioner lives in a `shared.Shared` handle, so all the
DoFn instances (harness threads) of one worker process share one copy of the weights.

A caption's bucket depends on the caption alone, never on the rest of its batch, so its numbers are the same however
the runner batched it and shards stay byte-identical across runs and runner modes. The encoder pads each call's rows
to a power of two, so the jitted text tower compiles for a handful of shapes per worker.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from contracts.conditioning import load_conditioner  # JAX: imported where text is embedded, not by decoders
from pipeline.batch import Batch
from pipeline.manifest import Item


@dataclass(frozen=True)
class Pending:
    """An example whose frames are ready and whose caption is not embedded yet."""

    item: Item
    frames: np.ndarray  # uint8 [F, S, S, 3]
    frame_times_ms: np.ndarray  # float32 [F]


class EmbedCaptions(beam.DoFn):
    """list[Pending] -> one list of example dicts (the fields of contracts/records.py), in order; too-long captions ->
    tagged dead letters."""

    DEAD = "dead"

    def __init__(self, text_encoder: str) -> None:
        self._name = text_encoder
        self._shared = shared.Shared()
        self._encoder = None
        self._embedded = Metrics.counter("yagg", "captions_embedded")
        self._batches = Metrics.counter("yagg", "embedding_batches")

    def setup(self) -> None:
        self._encoder = self._shared.acquire(lambda: load_conditioner(self._name))

    def process(self, batch: Sequence[Pending]) -> Iterator[Any]:
        fits, token_ids = [], []
        for pending, ids in zip(batch, self._encoder.token_ids([p.item.caption for p in batch]), strict=True):
            if len(ids) > self._encoder.max_length:
                detail = f"{len(ids)} tokens; the text encoder takes at most {self._encoder.max_length}"
                yield beam.pvalue.TaggedOutput(self.DEAD, pending.item.dead("embed", "caption too long", detail))
            else:
                fits.append(pending)
                token_ids.append(ids)
        if not fits:
            return
        out = self._encoder.encode_token_ids(token_ids)
        self._batches.inc()
        self._embedded.inc(len(fits))
        yield Batch(
            {
                "frames": pending.frames,
                "frame_times_ms": pending.frame_times_ms,
                **{name: values[i] for name, values in out.items()},
                "caption": pending.item.caption,
                "key": pending.item.key,
                "source": pending.item.name,
            }
            for i, pending in enumerate(fits)
        )
