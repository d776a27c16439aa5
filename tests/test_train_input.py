"""The Grain input pipeline (train/input.py): shapes, order, per-process rows, resumable state, dataset checks.

Records are written directly with contracts.records.encode so each one's content says which record it is
(text_pooled[0] = its index); the end-to-end tests in test_train_loop.py use the real preprocessing job.
"""

import dataclasses
import json

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from test_dataset_info import make_dataset_info

from contracts import records
from contracts.dataset import Shard, Split, TextEncoderInfo, read_dataset_info, shard_paths
from train import input as input_lib

NUM, FRAMES, SIZE, POOLED, LENGTH, TOKEN = 10, 3, 8, 4, 5, 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("records")
    rng = np.random.default_rng(0)
    shards = []
    for shard in range(2):
        name = f"train-{shard:05d}-of-00002.array_record"
        writer = ArrayRecordWriter(str(out / name), "group_size:1")
        indices = range(shard, NUM, 2)
        for i in indices:
            example = {
                "frames": rng.integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8),
                "frame_times_ms": np.arange(FRAMES, dtype=np.float32) * 100,
                "text_pooled": np.full(POOLED, i, np.float32),
                "text_tokens": np.full((LENGTH, TOKEN), i, np.float32),
                "text_mask": np.arange(LENGTH) < 3,
                "caption": f"clip {i}",
                "key": f"k{i}",
                "source": f"s{i}.gif",
            }
            writer.write(records.encode(example))
        writer.close()
        shards.append(Shard(file=name, examples=len(indices), bytes=0))
    info = dataclasses.replace(
        make_dataset_info(),
        frames=FRAMES,
        size=SIZE,
        fps=None,
        text_encoder=TextEncoderInfo(name="tiny", pooled_dim=POOLED, token_dim=TOKEN, max_length=LENGTH),
        splits={"train": Split(NUM, tuple(shards)), "val": Split(0, ())},
    )
    (out / "dataset_info.json").write_text(info.to_json())
    return out


def _stream(data_dir, rows, global_batch=4, seed=0):
    paths = shard_paths(str(data_dir), read_dataset_info(str(data_dir)))
    return iter(
        input_lib.make_train_dataset(
            paths, global_batch=global_batch, rows=np.asarray(rows), seed=seed, num_threads=2, prefetch=2
        )
    )


def _ids(batch):
    return batch["text_pooled"][:, 0].astype(int).tolist()


def test_batches_have_exact_shapes_and_dtypes(data_dir):
    batch = next(_stream(data_dir, rows=range(4)))
    assert sorted(batch) == sorted(input_lib.BATCH_FIELDS)
    assert batch["frames"].shape == (4, FRAMES, SIZE, SIZE, 3) and batch["frames"].dtype == np.uint8
    assert batch["text_pooled"].shape == (4, POOLED) and batch["text_pooled"].dtype == np.float32
    assert batch["text_tokens"].shape == (4, LENGTH, TOKEN) and batch["text_tokens"].dtype == np.float16
    assert batch["text_mask"].shape == (4, LENGTH) and batch["text_mask"].dtype == np.bool_


def test_every_epoch_is_a_new_permutation_of_all_records(data_dir):
    it = _stream(data_dir, rows=range(5), global_batch=5)
    epochs = [_ids(next(it)) + _ids(next(it)) for _ in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(NUM))
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] != list(range(NUM))  # shuffled


def test_processes_split_each_global_batch_into_their_rows(data_dir):
    whole = _stream(data_dir, rows=range(4))
    first, second = _stream(data_dir, rows=[0, 1]), _stream(data_dir, rows=[2, 3])
    for _ in range(5):  # crosses an epoch boundary (10 records, 4 per batch)
        assert _ids(next(first)) + _ids(next(second)) == _ids(next(whole))


def test_the_seed_changes_the_order(data_dir):
    a = [_ids(b) for b, _ in zip(_stream(data_dir, range(4), seed=0), range(3), strict=False)]
    b = [_ids(b) for b, _ in zip(_stream(data_dir, range(4), seed=1), range(3), strict=False)]
    assert a != b


def test_restored_iterator_state_continues_with_the_same_batches(data_dir):
    it = _stream(data_dir, rows=range(4))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [_ids(next(it)) for _ in range(4)]
    resumed = _stream(data_dir, rows=range(4))
    resumed.set_state(json.loads(json.dumps(state)))  # what the checkpoint stores is JSON
    assert [_ids(next(resumed)) for _ in range(4)] == expected


def test_the_train_steps_batch_spec_is_what_the_stream_yields(data_dir):
    info = read_dataset_info(str(data_dir))
    batch = next(_stream(data_dir, rows=range(4)))
    spec = input_lib.batch_spec(info.features, 4)
    assert sorted(spec) == sorted(batch)
    for name, value in batch.items():
        assert (spec[name].shape, spec[name].dtype) == (value.shape, value.dtype), name
