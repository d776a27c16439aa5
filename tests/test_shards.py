"""The output folder (pipeline/shards.py): split and shard rules, shard files, refusing and replacing old output."""

import json

import pytest
from array_record.python.array_record_module import ArrayRecordReader
from test_dataset_info import make_dataset_info

from contracts.dataset import DataError, read_dataset_info
from pipeline import shards
from pipeline.manifest import DeadLetter


def test_split_is_stable_and_close_to_the_fraction():
    names = [f"gifs/{i:05d}.gif" for i in range(20000)]
    val = [n for n in names if shards.split_of(n, 0.1) == "val"]
    assert 0.09 < len(val) / len(names) < 0.11
    assert val == [n for n in names if shards.split_of(n, 0.1) == "val"]
    # Growing the fraction only moves sources from train to val, never back.
    assert set(val) <= {n for n in names if shards.split_of(n, 0.2) == "val"}
    assert all(shards.split_of(n, 0.0) == "train" for n in names[:1000])


@pytest.mark.parametrize(
    ("records", "size", "fixed", "target_mb", "expected"),
    [
        (0, 0, 4, None, 0),  # an empty split gets no files
        (100, 10**6, 4, None, 4),
        (3, 10**6, 4, None, 3),  # never more shards than records
        (100, 5 * 2**20, None, 2.0, 3),
        (100, 10, None, 2.0, 1),
    ],
)
def test_num_shards(records, size, fixed, target_mb, expected):
    assert shards.num_shards(records, size, fixed, target_mb) == expected


def test_shards_are_sorted_by_key_deterministic_and_random_access(tmp_path):
    entries = [(f"k{i:03d}", f"record {i}".encode()) for i in (5, 1, 9, 3)]
    a = shards.write_shard(str(tmp_path / "a"), "train", 1, 3, entries)
    b = shards.write_shard(str(tmp_path / "b"), "train", 1, 3, entries[::-1])
    assert a == b and a.name == "train-00001-of-00003.array_record" and a.records == 4
    data_a = (tmp_path / "a" / a.name).read_bytes()
    assert data_a == (tmp_path / "b" / b.name).read_bytes() and len(data_a) == a.bytes
    reader = ArrayRecordReader(str(tmp_path / "a" / a.name))
    assert "group_size:1," in reader.writer_options_string()
    assert reader.read_all() == [b"record 1", b"record 3", b"record 5", b"record 9"]


def test_dead_letters_are_json_lines_in_manifest_order(tmp_path):
    dead = [DeadLetter("s.gif", "a cät", "fetch", "file not found", "no such file", "/m.tsv", n) for n in (12, 3)]
    entries = [(shards.dead_letter_key(d), shards.dead_letter_json(d)) for d in dead]
    written = shards.write_shard(str(tmp_path), shards.DEAD_LETTER, 0, 1, entries)
    assert written.name == "dead_letter-00000-of-00001.jsonl"
    rows = [json.loads(line) for line in (tmp_path / written.name).read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in rows] == [3, 12]
    assert rows[0] == {
        "source": "s.gif",
        "caption": "a cät",
        "stage": "fetch",
        "reason": "file not found",
        "detail": "no such file",
        "manifest": "/m.tsv",
        "line": 3,
    }


def test_check_output_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    shards.check_output(str(tmp_path / "new"), overwrite=False)
    shards.check_output(str(tmp_path), overwrite=False)  # exists but empty
    (tmp_path / "train-00000-of-00001.array_record").write_bytes(b"old")
    with pytest.raises(shards.OutputExistsError, match="not empty.*--overwrite"):
        shards.check_output(str(tmp_path), overwrite=False)
    shards.check_output(str(tmp_path), overwrite=True)
    with pytest.raises(shards.OutputExistsError, match="is a file"):
        shards.check_output(str(tmp_path / "train-00000-of-00001.array_record"), overwrite=True)


def test_commit_replaces_every_old_dataset_file_and_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old = [
        "train-00000-of-00003.array_record",
        "train-00002-of-00003.array_record",
        "train-00001-of-00002.array_record",  # same name as a new shard: must end up with the new content
        "val-00000-of-00001.array_record",
        "dead_letter-00000-of-00001.jsonl",
        "dataset_info.json",
    ]
    for name in old:
        (out / name).write_bytes(b"old")
    (out / ".staging-crashedrun").mkdir()  # left behind by a run that died before its commit
    (out / ".staging-crashedrun" / "train-00000-of-00009.array_record").write_bytes(b"stale")
    (out / "NOTES.md").write_text("mine")
    staging = shards.staging_dir(str(out), "run2")
    new = [shards.write_shard(staging, "train", i, 2, [(f"k{i}", f"new {i}".encode())]) for i in range(2)]

    info = make_dataset_info(shard_names=[f.name for f in new])
    shards.commit(str(out), staging, new, info)

    assert sorted(p.name for p in out.iterdir()) == [
        "NOTES.md",
        "dataset_info.json",
        "train-00000-of-00002.array_record",
        "train-00001-of-00002.array_record",
    ]
    assert read_dataset_info(str(out)) == info
    new_bytes = (out / "train-00001-of-00002.array_record").read_bytes()
    assert ArrayRecordReader(str(out / "train-00001-of-00002.array_record")).read_all() == [b"new 1"]

    # A runner may retry the commit step after it finished: nothing is lost or changed.
    shards.commit(str(out), staging, new, info)
    assert len(list(out.iterdir())) == 4
    assert (out / "train-00001-of-00002.array_record").read_bytes() == new_bytes


def test_reading_a_folder_without_dataset_info_fails_clearly(tmp_path):
    with pytest.raises(DataError, match="dataset_info.json does not exist"):
        read_dataset_info(str(tmp_path))
