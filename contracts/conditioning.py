"""Caption conditioning: captions -> the text condition arrays of a record, the one definition that the
preprocessing job's writer and every sampler (training's samples, `yagg sample`, eval, the server) use.

A caption becomes three arrays, in the dtypes the records store (contracts/records.py):

    text_pooled  float32 [P]     CLIP's projected text embedding
    text_tokens  float16 [L, D]  CLIP's last hidden states, zero at padded positions
    text_mask    bool    [L]     True where a real token is

Each caption is encoded at the length of its own bucket (16, 32, 64 tokens, or the encoder's maximum L), not at L:
the text tower is causal and masks padded keys, so a caption's states do not depend on the padding after it, and a
short caption (most are under 16 tokens) costs a fraction. The bucket depends on the caption alone. A caption
longer than L tokens is refused (`CaptionTooLong`), never silently truncated.

`model_condition` is the one place the stored dtypes become the U-Net's inputs (float32 embeddings, bool mask): the
train step, the validation loss and the inference core all call it, so what a sampler feeds the model is exactly
what training fed it. `null_condition` is classifier-free guidance's "no text" (model/diffusion.py).

Text encoders are named as `TextEncoder.from_pretrained` takes them (a Hugging Face hub id, or a local folder in the
Hugging Face layout) or as a folder URL such as `gs://bucket/clip/`, copied to a local cache once per machine
(contracts/storage.py), so workers and training hosts need no access to the hub.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from contracts import records, storage
from contracts.dataset import TextEncoderInfo
from model.clip import MAX_BATCH, MIN_BUCKET, TextEncoder

# The shortest length a caption is encoded at (see the module doc). Short captions share one bucket, so the text
# tower compiles for fewer shapes; at 16 tokens most real captions (TGIF's: 8-20 tokens) fit the first bucket or two.
MIN_TOKENS = 16


class CaptionTooLong(ValueError):
    """A caption has more tokens than the text encoder reads."""


class TextConditioner:
    """A CLIP text tower turning captions into record-ready condition arrays (see the module doc).

    Meant to be made once per process (`load_conditioner`) and shared: tokenising and encoding are thread-safe.
    """

    def __init__(self, encoder: TextEncoder, name: str) -> None:
        self._encoder = encoder
        self.info = TextEncoderInfo(
            name=name,  # as given: for a gs:// folder, encoder.name is its local copy
            max_length=encoder.max_length,
            pooled_dim=encoder.pooled_dim,
            token_dim=encoder.token_dim,
        )

    @property
    def max_length(self) -> int:
        return self.info.max_length

    def token_ids(self, captions: Sequence[str]) -> list[list[int]]:
        """Each caption's token ids, with the start and end tokens, before any truncation."""
        return self._encoder.token_ids(list(captions))

    def bucket_lengths(self) -> list[int]:
        """The lengths captions are encoded at (see the module doc)."""
        lengths, n = [], MIN_TOKENS
        while True:
            lengths.append(min(n, self.max_length))
            if n >= self.max_length:
                return lengths
            n *= 2

    def warm_up(self) -> None:
        """Compiles the text tower for one caption at every bucket length (what a sampler encodes: one prompt at a
        time), so no prompt waits for a compilation later."""
        for length in self.bucket_lengths():
            self.encode_token_ids([[self._encoder.pad_id] * length])

    def encode_token_ids(self, token_ids: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """The condition arrays of captions already tokenised (`token_ids`), each at most max_length tokens long."""
        lengths = np.array([len(ids) for ids in token_ids], np.int64)
        assert not len(lengths) or lengths.max() <= self.max_length, "check caption lengths before encoding"
        mask = np.arange(self.max_length) < lengths[:, None]
        pooled = np.zeros((len(lengths), self.info.pooled_dim), records.ARRAY_DTYPES["text_pooled"])
        tokens = np.zeros((len(lengths), self.max_length, self.info.token_dim), records.ARRAY_DTYPES["text_tokens"])
        buckets = np.array([min(self.max_length, max(MIN_TOKENS, 1 << (int(n) - 1).bit_length())) for n in lengths])
        for width in np.unique(buckets):
            same_width = np.flatnonzero(buckets == width)
            start = 0
            for size in _row_chunks(len(same_width)):
                rows = same_width[start : start + size]
                start += size
                ids = np.full((len(rows), width), self._encoder.pad_id, np.int32)
                for row, index in enumerate(rows):
                    ids[row, : lengths[index]] = token_ids[index]
                out = self._encoder.encode_ids(ids, mask[rows, :width].astype(np.int32))
                pooled[rows] = out["pooled"]
                tokens[rows, :width] = out["tokens"] * mask[rows, :width, None]
        return {
            "text_pooled": pooled,
            "text_tokens": tokens,
            "text_mask": mask.astype(records.ARRAY_DTYPES["text_mask"]),
        }

    def encode(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
        """The condition arrays of `captions`; CaptionTooLong names the first caption the encoder cannot read."""
        token_ids = self.token_ids(captions)
        for caption, ids in zip(captions, token_ids, strict=True):
            if len(ids) > self.max_length:
                raise CaptionTooLong(
                    f"prompt {caption!r} is {len(ids)} tokens long, more than the {self.max_length} that the text "
                    f"encoder {self.info.name!r} reads; shorten it"
                )
        return self.encode_token_ids(token_ids)

    def null(self, count: int) -> dict[str, np.ndarray]:
        """`count` rows of the null condition, in the stored dtypes (see `null_condition`)."""
        return {
            "text_pooled": np.zeros((count, self.info.pooled_dim), records.ARRAY_DTYPES["text_pooled"]),
            "text_tokens": np.zeros((count, self.max_length, self.info.token_dim), records.ARRAY_DTYPES["text_tokens"]),
            "text_mask": np.zeros((count, self.max_length), records.ARRAY_DTYPES["text_mask"]),
        }


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
def load_conditioner(name: str) -> TextConditioner:
    """The conditioner of the CLIP `name` (hub id, local folder, or folder URL copied to a local cache first).

    Loaded once per process and name: with the local runner the launcher's check and the worker share one copy, and
    the text tower compiles once per shape for everything one process encodes. Raises OSError or ValueError (from
    model/clip) for a name that does not load."""
    return TextConditioner(TextEncoder.from_pretrained(storage.local_copy(name)), name)


def model_condition(condition: Mapping[str, Any]) -> dict[str, Any]:
    """Stored condition arrays (numpy or jax, any leading batch shape) -> the U-Net's inputs: float32 embeddings and
    a bool mask. Inside jit this is where the float16 tokens become float32."""
    import jax.numpy as jnp

    return {
        "text_pooled": jnp.asarray(condition["text_pooled"]).astype(jnp.float32),
        "text_tokens": jnp.asarray(condition["text_tokens"]).astype(jnp.float32),
        "text_mask": jnp.asarray(condition["text_mask"]).astype(jnp.bool_),
    }
