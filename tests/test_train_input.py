"""The Grain input pipeline (train/input.py): shapes, order, per-process rows, resumable state, dataset checks.

Records are written directly with pipeline.records.encode so each one's content says which record it is
(text_pooled[0] = its index); the end-to-end tests in test_train_loop.py use the real preprocessing job.
"""

import json

import ml_collections
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from pipeline import records
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
        shards.append({"file": name, "examples": len(indices), "bytes": 0})
    info = {
        "schema_version": records.SCHEMA_VERSION,
        "frames": FRAMES,
        "size": SIZE,
        "fps": None,
        "text_encoder": {"name": "tiny", "pooled_dim": POOLED, "token_dim": TOKEN, "max_length": LENGTH},
        "splits": {"train": {"examples": NUM, "shards": shards}, "val": {"examples": 0, "shards": []}},
    }
    (out / "dataset_info.json").write_text(json.dumps(info))
    return out


def _stream(data_dir, rows, global_batch=4, seed=0):
    info = input_lib.read_dataset_info(data_dir)
    paths = input_lib.shard_paths(data_dir, info)
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


def _data_config(data_dir, **changes):
    fields = dict(
        path=str(data_dir),
        frames=FRAMES,
        size=SIZE,
        text_embed_dim=POOLED,
        text_token_dim=TOKEN,
        text_max_length=LENGTH,
    )
    fields.update(changes)
    return ml_collections.ConfigDict(fields)


def test_a_config_that_fits_passes(data_dir):
    input_lib.check_config_fits(input_lib.read_dataset_info(data_dir), _data_config(data_dir))


def test_every_mismatch_with_the_dataset_is_named(data_dir):
    info = input_lib.read_dataset_info(data_dir)
    with pytest.raises(input_lib.DataError) as e:
        input_lib.check_config_fits(info, _data_config(data_dir, frames=16, text_token_dim=512))
    assert "data.frames=16 but the dataset has 3" in str(e.value)
    assert "data.text_token_dim=512 but the dataset has 6" in str(e.value)


def test_a_folder_without_dataset_info_is_refused(tmp_path):
    with pytest.raises(input_lib.DataError, match="yagg preprocess"):
        input_lib.read_dataset_info(tmp_path)


def test_a_missing_shard_is_refused(data_dir, tmp_path):
    info = input_lib.read_dataset_info(data_dir)
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(input_lib.DataError, match="missing"):
        input_lib.shard_paths(tmp_path, info)
