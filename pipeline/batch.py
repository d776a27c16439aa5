"""`Batch`: many of the job's items travelling as one Beam element, with a coder that sizes it cheaply.

From its batching on, the preprocessing job (pipeline/job.py) passes lists of a few hundred pending examples,
examples or records between its stages, so Beam's cost per element is paid per batch. Beam's Python SDK also
estimates the byte size of a sample of every stage's outputs, for its metrics, by encoding them; it samples every one
of the first elements of each output, so with the default pickling coder it pickled nearly every batch whole (every
frame and embedding array) only to measure it: about 0.25 s of the job thread's CPU per 4,096 demo GIFs on the 2-core
development machine.
`BatchCoder` encodes by pickling, as before, and estimates a batch's size from its first item.
"""

from __future__ import annotations

import pickle
from typing import Any

import apache_beam as beam


class Batch(list):
    """A list of the job's items (pending examples, examples, or records) that is one element of a PCollection."""


class BatchCoder(beam.coders.Coder):
    """Pickles a Batch; its size estimate is the first item's pickled size times the number of items."""

    def encode(self, value: Batch) -> bytes:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def decode(self, encoded: bytes) -> Batch:
        return pickle.loads(encoded)

    def is_deterministic(self) -> bool:
        return False  # a pickle may differ between equal values: never a grouping key

    def estimate_size(self, value: Batch) -> int:
        return len(value) * len(pickle.dumps(value[0], protocol=pickle.HIGHEST_PROTOCOL)) if value else 0

    def to_type_hint(self) -> Any:
        return Batch


beam.coders.registry.register_coder(Batch, BatchCoder)
