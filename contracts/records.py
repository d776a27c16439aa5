"""The training record: one versioned schema, written by the preprocessing job and read by the trainer.

A record is one (GIF, caption) example. Both sides import this module, so the layout lives in one place. The byte
layout is chosen for cheap reads on training hosts: no pickle, no image codec, no parsing beyond a small JSON header;
every array is a zero-copy `np.frombuffer` view into the record bytes.

    offset 0   b"YAGG"                       magic
    offset 4   uint16 little-endian          SCHEMA_VERSION
    offset 6   uint32 little-endian          header length H
    offset 10  H bytes of UTF-8 JSON         {"arrays": {name: [dtype, shape, offset, nbytes]}, "strings": {...}}
    then       the raw little-endian array buffers, each starting at a multiple of 8 bytes

The JSON is written with sorted keys and no whitespace, so the same example always encodes to the same bytes (the job
promises byte-identical shards across runs).
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

# Bump whenever a field is added, removed, renamed or changes dtype/meaning; readers refuse other versions.
SCHEMA_VERSION = 1

_MAGIC = b"YAGG"
_PREFIX = struct.Struct("<4sHI")  # magic, version, header length
_ALIGN = 8

# Array fields and the dtype each is stored as. text_tokens is stored as float16: it is the largest text field
# ([77, 512] for CLIP ViT-B/32) and the U-Net's cross-attention runs in bfloat16 anyway.
ARRAY_DTYPES: dict[str, np.dtype] = {
    "frames": np.dtype(np.uint8),  # [F, S, S, 3] RGB
    "frame_times_ms": np.dtype(np.float32),  # [F] when each chosen frame is shown in the source GIF
    "text_pooled": np.dtype(np.float32),  # [P] CLIP's pooled (projected) text embedding
    "text_tokens": np.dtype(np.float16),  # [L, D] CLIP's last hidden states, zero-padded to max_length
    "text_mask": np.dtype(np.bool_),  # [L] True where text_tokens holds a real token
}
# key: a hash of (source, caption), the example's identity; source: the GIF's URL or path as written in the manifest.
STRING_FIELDS = ("caption", "key", "source")


class RecordError(ValueError):
    """The bytes are not a record this code can read."""


class RecordVersionError(RecordError):
    """The record was written with another SCHEMA_VERSION."""


def features(num_frames: int, size: int, pooled_dim: int, max_length: int, token_dim: int) -> dict[str, dict[str, Any]]:
    """Shape and dtype of every field, as written to dataset_info.json (strings have shape [] and dtype "str")."""
    shapes = {
        "frames": [num_frames, size, size, 3],
        "frame_times_ms": [num_frames],
        "text_pooled": [pooled_dim],
        "text_tokens": [max_length, token_dim],
        "text_mask": [max_length],
    }
    described = {name: {"shape": shapes[name], "dtype": ARRAY_DTYPES[name].name} for name in ARRAY_DTYPES}
    described.update({name: {"shape": [], "dtype": "str"} for name in STRING_FIELDS})
    return described


def _check_shapes(arrays: dict[str, np.ndarray]) -> None:
    frames = arrays["frames"]
    if frames.ndim != 4 or frames.shape[1] != frames.shape[2] or frames.shape[3] != 3:
        raise ValueError(f"frames must be [F, S, S, 3], got {list(frames.shape)}")
    expected_ndim = {"frame_times_ms": 1, "text_pooled": 1, "text_tokens": 2, "text_mask": 1}
    for name, ndim in expected_ndim.items():
        if arrays[name].ndim != ndim:
            raise ValueError(f"{name} must have {ndim} dimension(s), got shape {list(arrays[name].shape)}")
    if arrays["frame_times_ms"].shape[0] != frames.shape[0]:
        raise ValueError(f"frame_times_ms has {arrays['frame_times_ms'].shape[0]} entries for {frames.shape[0]} frames")
    if arrays["text_mask"].shape[0] != arrays["text_tokens"].shape[0]:
        raise ValueError("text_mask and text_tokens must have the same length")


def encode(example: dict[str, Any]) -> bytes:
    """Serialises one example (the fields of ARRAY_DTYPES and STRING_FIELDS) to record bytes.

    Floating-point fields are cast to their stored dtype; frames must already be uint8 (a silent cast from float
    would wrap or truncate pixel values).
    """
    missing = sorted((set(ARRAY_DTYPES) | set(STRING_FIELDS)) - set(example))
    if missing:
        raise ValueError(f"example is missing field(s) {missing}")
    frames = np.asarray(example["frames"])
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    arrays = {
        name: np.ascontiguousarray(example[name], dtype=dtype.newbyteorder("<")) for name, dtype in ARRAY_DTYPES.items()
    }
    _check_shapes(arrays)

    layout: dict[str, list] = {}
    offset = 0
    for name in sorted(arrays):
        offset = -(-offset // _ALIGN) * _ALIGN
        layout[name] = [ARRAY_DTYPES[name].name, list(arrays[name].shape), offset, arrays[name].nbytes]
        offset += arrays[name].nbytes
    strings = {name: str(example[name]) for name in STRING_FIELDS}
    header = json.dumps({"arrays": layout, "strings": strings}, sort_keys=True, separators=(",", ":")).encode()
    start = -(-(_PREFIX.size + len(header)) // _ALIGN) * _ALIGN  # buffers begin on an aligned offset

    out = bytearray(start + offset)
    out[: _PREFIX.size] = _PREFIX.pack(_MAGIC, SCHEMA_VERSION, len(header))
    out[_PREFIX.size : _PREFIX.size + len(header)] = header
    for name, (_, _, array_offset, nbytes) in layout.items():
        out[start + array_offset : start + array_offset + nbytes] = arrays[name].tobytes()
    return bytes(out)


def decode(data: bytes) -> dict[str, Any]:
    """Parses record bytes into numpy arrays (read-only views into `data`) and strings."""
    if len(data) < _PREFIX.size:
        raise RecordError(f"a record is at least {_PREFIX.size} bytes, got {len(data)}")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != _MAGIC:
        raise RecordError(f"not a yagg record (starts with {bytes(data[:4])!r}, expected {_MAGIC!r})")
    if version != SCHEMA_VERSION:
        raise RecordVersionError(
            f"record has schema version {version} but this code reads version {SCHEMA_VERSION}: "
            "re-run `yagg preprocess` with this version of yagg to rewrite the dataset"
        )
    header = json.loads(bytes(data[_PREFIX.size : _PREFIX.size + header_len]))
    start = -(-(_PREFIX.size + header_len) // _ALIGN) * _ALIGN
    example: dict[str, Any] = dict(header["strings"])
    for name, (dtype, shape, offset, nbytes) in header["arrays"].items():
        dt = np.dtype(dtype).newbyteorder("<")
        example[name] = np.frombuffer(data, dtype=dt, count=nbytes // dt.itemsize, offset=start + offset).reshape(shape)
    return example
