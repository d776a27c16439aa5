"""The dataset description contract (contracts/dataset.py): `DatasetInfo` to and from JSON, its reader, its checks."""

import json

import ml_collections
import pytest

from contracts import records
from contracts.dataset import (
    Accounting,
    DataError,
    DataFacts,
    DatasetInfo,
    Shard,
    Split,
    TextEncoderInfo,
    frame_rate,
    read_dataset_info,
    shard_paths,
)


def make_dataset_info(shard_names=("train-00000-of-00001.array_record",), fps=8.0) -> DatasetInfo:
    """A valid description of a small dataset whose train split is `shard_names` (one example each)."""
    return DatasetInfo(
        schema_version=records.SCHEMA_VERSION,
        frames=4,
        size=16,
        fps=fps,
        keep_stills=False,
        text_encoder=TextEncoderInfo(name="runs/tiny-clip", max_length=77, pooled_dim=64, token_dim=64),
        val_fraction=0.1,
        writer_options="group_size:1",
        manifests=("shapes/manifest.tsv",),
        splits={
            "train": Split(len(shard_names), tuple(Shard(name, 1, 100) for name in shard_names)),
            "val": Split(0, ()),
        },
        dead_letter_files=("dead_letter-00000-of-00001.jsonl",),
        accounting=Accounting(
            lines_read=len(shard_names) + 2,
            examples_written=len(shard_names),
            dead_lettered=1,
            duplicates_removed=1,
            dead_lettered_by_reason={"fetch failed": 1},
            dead_lettered_by_stage={"fetch": 1},
        ),
    )


def test_json_round_trip_keeps_every_field_and_adds_the_derived_ones():
    info = make_dataset_info()
    text = info.to_json()
    assert DatasetInfo.from_json(text) == info
    value = json.loads(text)
    assert value["frame_sampling"] == "fixed fps"
    assert value["features"]["text_tokens"] == {"shape": [77, 64], "dtype": "float16"}
    assert list(value) == sorted(value), "keys are sorted, so the same dataset always writes the same bytes"
    assert DatasetInfo.from_json(make_dataset_info(fps=None).to_json()).frame_sampling == "time-uniform"


def test_another_schema_version_or_a_foreign_file_is_refused_with_the_reason():
    value = json.loads(make_dataset_info().to_json())
    value["schema_version"] = records.SCHEMA_VERSION + 1
    with pytest.raises(DataError, match="re-run `yagg preprocess`"):
        DatasetInfo.from_json(json.dumps(value))
    with pytest.raises(DataError, match="not a yagg dataset description"):
        DatasetInfo.from_json(json.dumps({"schema_version": records.SCHEMA_VERSION, "frames": 4}))
    with pytest.raises(DataError, match="not a yagg dataset description"):
        DatasetInfo.from_json("[1, 2")


def test_check_fits_names_every_field_that_disagrees():
    data = ml_collections.ConfigDict(
        {"path": "d", "frames": 8, "size": 16, "text_embed_dim": 512, "text_token_dim": 64, "text_max_length": 77}
    )
    with pytest.raises(DataError) as error:
        make_dataset_info().check_fits(data)
    assert "data.frames=8 but the dataset has 4" in str(error.value)
    assert "data.text_embed_dim=512" in str(error.value)
    assert "data.size" not in str(error.value)


def test_reader_finds_shards_and_reports_missing_ones(tmp_path):
    info = make_dataset_info(shard_names=("train-00000-of-00002.array_record", "train-00001-of-00002.array_record"))
    (tmp_path / "dataset_info.json").write_text(info.to_json())
    assert read_dataset_info(str(tmp_path)) == info
    with pytest.raises(DataError, match="2 shard file"):
        shard_paths(str(tmp_path), info)


def test_frame_rate_of_a_fixed_fps_dataset_and_the_facts_sampling_needs(tmp_path):
    info = make_dataset_info(fps=12.5)
    assert frame_rate(str(tmp_path), info) == 12.5
    facts = DataFacts.of_dataset(str(tmp_path), info)
    assert DataFacts.from_dict(facts.to_dict()) == facts
    assert (facts.frames, facts.size, facts.fps, facts.text_encoder.token_dim) == (4, 16, 12.5, 64)
