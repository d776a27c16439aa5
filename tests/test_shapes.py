"""The moving-shapes dataset: files are real GIFs, and what is drawn matches the labels."""

import filecmp
import json

import numpy as np
import pytest
from PIL import Image, ImageSequence

from pipeline import shapes


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    shapes.make_shapes(out, num=48, seed=3)
    return out


def _pillow_frames(path):
    with Image.open(path) as im:
        frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            durations.append(im.info["duration"])
        return frames, durations


def test_manifest_layout_and_heldout(dataset):
    lines = (dataset / "manifest.tsv").read_text().splitlines()
    labels = shapes.read_labels(dataset)
    assert len(lines) == len(labels) == 48
    for line, label in zip(lines, labels, strict=True):
        path, caption = line.split("\t")
        assert (dataset / path).is_file()
        assert caption == f"a {label['color']} {label['shape']} moving {label['direction']}"
        assert shapes.parse_caption(caption) == (label["color"], label["shape"], label["direction"])
    seen = [(lab["color"], lab["shape"], lab["direction"]) for lab in labels]
    # 48 clips cycle through the 45 training combinations: every one once, three twice.
    assert set(seen) == set(shapes.training_combinations()) and len(set(seen)) == 45
    listed = json.loads((dataset / "heldout.json").read_text())
    assert listed == [{"color": c, "direction": d} for c, d in shapes.HELDOUT_COLOR_DIRECTION] + [
        {"shape": s, "direction": d} for s, d in shapes.HELDOUT_SHAPE_DIRECTION
    ]
    # No clip shows a listed pair; every word is still seen with other partners.
    for entry in listed:
        assert not [lab for lab in labels if all(lab[kind] == word for kind, word in entry.items())], entry
    assert {lab["color"] for lab in labels} == set(shapes.COLORS)
    assert {lab["shape"] for lab in labels} == set(shapes.SHAPES)
    assert {lab["direction"] for lab in labels} == set(shapes.DIRECTIONS)


def test_held_out_combinations_pair_words_that_training_shows_apart():
    combos = shapes.all_combinations()
    training = set(shapes.training_combinations())
    heldout = [c for c in combos if shapes.is_heldout(*c)]
    assert len(combos) == 72 and len(heldout) == 27 and len(training) == 45
    for color, shape, direction in heldout:
        # Each word of a held-out combination appears in training, just never in this pairing.
        assert any(t[0] == color for t in training) and any(t[1] == shape for t in training)
        assert any(t[2] == direction for t in training)
    for color in shapes.COLORS:
        assert len({t[1] for t in training if t[0] == color}) == 3
        assert len({t[2] for t in training if t[0] == color}) >= 3
    for shape in shapes.SHAPES:
        assert len({t[2] for t in training if t[1] == shape}) == 3
    assert shapes.parse_caption("a cat is jumping") is None
    assert shapes.parse_caption("a red hexagon moving up") is None


def test_drawn_content_matches_labels(dataset):
    for label in shapes.read_labels(dataset):
        frames, durations = _pillow_frames(dataset / label["path"])
        assert durations == label["durations_ms"]
        assert 8 <= len(frames) <= 24
        assert all(d >= 20 for d in durations)
        h, w, _ = frames[0].shape
        assert (w, h) == (label["width"], label["height"]) and 48 <= w <= 96 and 48 <= h <= 96
        color = np.array(shapes.COLORS[label["color"]])
        centroids = []
        for frame in frames:
            fg = np.any(frame != shapes.BACKGROUND, axis=-1)
            # Only the background and the labelled colour occur.
            assert np.all(frame[fg] == color), label["path"]
            ys, xs = np.nonzero(fg)
            assert len(xs) > 20
            centroids.append((xs.mean(), ys.mean()))
        centroids = np.array(centroids)
        dx, dy = shapes.DIRECTIONS[label["direction"]]
        moved = centroids[-1] - centroids[0]
        along, across = (moved[0], moved[1]) if dx else (moved[1], moved[0])
        # Moves at least 5 px the labelled way, and not sideways.
        assert along * (dx or dy) > 5, (label["path"], moved)
        assert abs(across) < 1.0, (label["path"], moved)
        # The recorded start position is where the shape is drawn in the first frame (to rounding).
        ys, xs = np.nonzero(np.any(frames[0] != shapes.BACKGROUND, axis=-1))
        assert abs(xs.min() - label["start_xy"][0]) <= 1 and abs(ys.min() - label["start_xy"][1]) <= 1


def test_whole_path_inside_centre_square(dataset):
    for label in shapes.read_labels(dataset):
        side = min(label["width"], label["height"])
        x0, y0 = (label["width"] - side) / 2, (label["height"] - side) / 2
        frames, _ = _pillow_frames(dataset / label["path"])
        for frame in frames:
            ys, xs = np.nonzero(np.any(frame != shapes.BACKGROUND, axis=-1))
            assert xs.min() >= x0 - 1 and xs.max() <= x0 + side and ys.min() >= y0 - 1 and ys.max() <= y0 + side


def test_gifs_are_frame_optimised_with_both_disposals(dataset):
    partial, disposals = 0, set()
    for label in shapes.read_labels(dataset):
        with Image.open(dataset / label["path"]) as im:
            for i in range(1, im.n_frames):
                im.seek(i)
                partial += im.tile[0][1][2:] != im.size or im.tile[0][1][:2] != (0, 0)
                disposals.add(im.disposal_method)
    assert partial > 0
    assert {1, 2} <= disposals


def test_same_seed_same_bytes(dataset, tmp_path):
    shapes.make_shapes(tmp_path, num=48, seed=3)
    for name in ("manifest.tsv", "labels.jsonl", "heldout.json"):
        assert (tmp_path / name).read_bytes() == (dataset / name).read_bytes()
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "gifs", dataset / "gifs", [f"{i:05d}.gif" for i in range(48)])
    assert not mismatch and not errors


def test_rejects_empty_dataset(tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        shapes.make_shapes(tmp_path, num=0)
