"""The sets of clips `yagg fvd` reads (eval/video_sets.py): a folder of GIFs, a manifest, a preprocessed dataset.
No I3D here: what each set yields, what it skips and why, and when two sets share cached features."""

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from test_dataset_info import make_dataset_info

from contracts import records
from contracts.dataset import Shard, Split
from eval.fvd import FvdError
from eval.video_sets import open_clip_set
from pipeline.clip_frames import ClipSpec, chosen_frames
from pipeline.shapes import make_shapes

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "pillow-gifs"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, num=3, seed=0)
    return out


def write_dataset(out: Path, clips: list[np.ndarray], sources: list[str], split: str = "val") -> Path:
    """A dataset folder as `yagg preprocess` leaves it: one ArrayRecord shard of `split` and dataset_info.json."""
    out.mkdir(parents=True, exist_ok=True)
    name = f"{split}-00000-of-00001.array_record"
    writer = ArrayRecordWriter(str(out / name), "group_size:1")
    for i, (frames, source) in enumerate(zip(clips, sources, strict=True)):
        example = {
            "frames": frames,
            "frame_times_ms": np.arange(len(frames), dtype=np.float32) * 100,
            "text_pooled": np.zeros(4, np.float32),
            "text_tokens": np.zeros((2, 4), np.float32),
            "text_mask": np.ones(2, bool),
            "caption": f"caption {i}",
            "key": f"k{i}",
            "source": source,
        }
        writer.write(records.encode(example))
    writer.close()
    other = "train" if split == "val" else "val"
    info = dataclasses.replace(
        make_dataset_info(),
        frames=int(clips[0].shape[0]),
        size=int(clips[0].shape[1]),
        splits={split: Split(len(clips), (Shard(name, len(clips), 0),)), other: Split(0, ())},
    )
    (out / "dataset_info.json").write_text(info.to_json())
    return out


def test_a_gif_folder_yields_clips_chosen_as_preprocessing_chooses_them(shapes):
    clip_set = open_clip_set(shapes / "gifs", frames=10, max_clips=None)
    clips = list(clip_set.clips())
    gifs = sorted((shapes / "gifs").glob("*.gif"))
    assert len(clips) == clip_set.expected == 3 and clip_set.skipped() == {}
    for clip, gif in zip(clips, gifs, strict=True):
        expected, _ = chosen_frames(gif.read_bytes(), ClipSpec(num_frames=10, size=0, fps=None))
        np.testing.assert_array_equal(clip, expected)  # the GIF's own size: FVD resizes its own way


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"the shared corpus is not at {CORPUS}")
def test_gifs_that_yield_no_clip_are_skipped_and_counted(shapes, tmp_path):
    folder = tmp_path / "gifs"
    shutil.copytree(shapes / "gifs", folder)
    shutil.copy(CORPUS / "hopper.gif", folder / "still.gif")
    shutil.copy(CORPUS / "zero_width.gif", folder / "zero.GIF")
    (folder / "notes.txt").write_text("not a gif")
    clip_set = open_clip_set(folder, frames=10, max_clips=None)
    assert len(list(clip_set.clips())) == 3
    assert clip_set.skipped() == {"frames: still image": 1, "decode: zero-size canvas": 1}


def test_a_manifest_counts_each_gif_once_and_its_bad_lines(shapes, tmp_path):
    lines = [f"{shapes}/{line}" for line in (shapes / "manifest.tsv").read_text().splitlines()]  # absolute paths
    manifest = tmp_path / "m.tsv"
    another = lines[0].split("\t")[0] + "\tanother caption"
    manifest.write_text("\n".join([*lines, another, "no tab here", "", f"{tmp_path}/gone.gif\tlost"]) + "\n")
    clip_set = open_clip_set(manifest, frames=10, max_clips=None)
    assert clip_set.expected == 4  # three GIFs, one of them named twice, and a missing file
    assert len(list(clip_set.clips())) == 3
    assert clip_set.skipped() == {
        "manifest: malformed line (no tab)": 1,
        "manifest: blank line": 1,
        "read: file not found": 1,
    }


def test_the_same_gifs_share_a_fingerprint_in_a_folder_or_a_manifest(shapes, tmp_path):
    folder = open_clip_set(shapes / "gifs", frames=10, max_clips=None)
    manifest = open_clip_set(shapes / "manifest.tsv", frames=10, max_clips=None)
    assert folder.fingerprint() == manifest.fingerprint()
    changed = tmp_path / "gifs"
    shutil.copytree(shapes / "gifs", changed)
    first = sorted(changed.glob("*.gif"))[0]
    first.write_bytes(first.read_bytes() + b"\0")  # a byte after the trailer: same frames, other content
    assert open_clip_set(changed, frames=10, max_clips=None).fingerprint() != folder.fingerprint()
    assert open_clip_set(shapes / "gifs", frames=10, max_clips=2).fingerprint() != folder.fingerprint()


def test_a_dataset_yields_one_clip_per_source_gif_up_to_max_clips(tmp_path):
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8) for _ in range(4)]
    data = write_dataset(tmp_path / "data", clips, ["a.gif", "b.gif", "a.gif", "c.gif"])  # a.gif has two captions
    got = list(open_clip_set(data, frames=16, max_clips=None).clips())
    assert [c.tobytes() for c in got] == [clips[i].tobytes() for i in (0, 1, 3)]
    assert len(list(open_clip_set(data, frames=16, max_clips=2).clips())) == 2
    with pytest.raises(FvdError, match="no train shards"):
        open_clip_set(data, frames=16, max_clips=None, split="train")


def test_paths_that_are_no_set_are_clear_errors(tmp_path):
    with pytest.raises(FvdError, match="does not exist"):
        open_clip_set(tmp_path / "missing", frames=16, max_clips=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FvdError, match="holds no .gif file"):
        open_clip_set(tmp_path / "empty", frames=16, max_clips=None)
