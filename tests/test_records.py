"""The record schema shared by the preprocessing job and the trainer (contracts/records.py)."""

import struct

import numpy as np
import pytest

from contracts import records


def _example(frames=4, size=8, pooled=6, length=5, dim=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "frames": rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8),
        "frame_times_ms": np.arange(frames, dtype=np.float64) * 40.0,
        "text_pooled": rng.normal(size=pooled).astype(np.float32),
        "text_tokens": rng.normal(size=(length, dim)).astype(np.float32),
        "text_mask": np.array([1] * 3 + [0] * (length - 3), dtype=np.int32),
        "caption": "a red circle moving left — déjà vu",
        "key": "abc123",
        "source": "gifs/00001.gif",
    }


def test_round_trip_keeps_values_and_stored_dtypes():
    example = _example()
    decoded = records.decode(records.encode(example))
    np.testing.assert_array_equal(decoded["frames"], example["frames"])
    np.testing.assert_array_equal(decoded["frame_times_ms"], example["frame_times_ms"].astype(np.float32))
    np.testing.assert_array_equal(decoded["text_pooled"], example["text_pooled"])
    # Tokens are stored as float16: equal to the float16 rounding of the input.
    np.testing.assert_array_equal(decoded["text_tokens"], example["text_tokens"].astype(np.float16))
    np.testing.assert_array_equal(decoded["text_mask"], [True, True, True, False, False])
    for name in ("caption", "key", "source"):
        assert decoded[name] == example[name]


def test_decoded_fields_match_the_described_features():
    decoded = records.decode(records.encode(_example(frames=4, size=8, pooled=6, length=5, dim=3)))
    described = records.features(num_frames=4, size=8, pooled_dim=6, max_length=5, token_dim=3)
    assert set(described) == set(decoded)
    for name, spec in described.items():
        if spec["dtype"] == "str":
            assert isinstance(decoded[name], str)
        else:
            assert decoded[name].dtype == np.dtype(spec["dtype"]), name
            assert list(decoded[name].shape) == spec["shape"], name


def test_decode_is_zero_copy():
    data = records.encode(_example(frames=16, size=64))
    decoded = records.decode(data)
    # A view into the record bytes, not a copy: the trainer pays no per-record copy before batching.
    assert not decoded["frames"].flags.owndata


def test_same_example_encodes_to_same_bytes():
    assert records.encode(_example(seed=3)) == records.encode(_example(seed=3))
    assert records.encode(_example(seed=3)) != records.encode(_example(seed=4))


def test_other_schema_version_is_refused_clearly():
    data = bytearray(records.encode(_example()))
    struct.pack_into("<H", data, 4, records.SCHEMA_VERSION + 1)
    with pytest.raises(
        records.RecordVersionError, match=f"schema version {records.SCHEMA_VERSION + 1}.*yagg preprocess"
    ):
        records.decode(bytes(data))


@pytest.mark.parametrize("data", [b"", b"GIF89a" + bytes(20)])
def test_foreign_bytes_are_refused(data):
    with pytest.raises(records.RecordError):
        records.decode(data)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"frames": np.zeros((2, 4, 4, 3), np.float32)}, "frames must be uint8"),
        ({"frames": np.zeros((2, 4, 5, 3), np.uint8)}, r"frames must be \[F, S, S, 3\]"),
        ({"frame_times_ms": np.zeros(3, np.float32)}, "frame_times_ms has 3 entries for 4 frames"),
        ({"text_mask": np.ones(4, bool)}, "same length"),
        ({"text_pooled": np.zeros((1, 6), np.float32)}, "text_pooled must have 1 dimension"),
    ],
)
def test_malformed_examples_are_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        records.encode({**_example(), **change})


def test_missing_field_is_named():
    example = _example()
    del example["text_pooled"]
    with pytest.raises(ValueError, match="text_pooled"):
        records.encode(example)
