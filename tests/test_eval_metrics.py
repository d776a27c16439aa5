"""The shapes probe and the weight-free video metrics on inputs with known answers."""

import numpy as np
import pytest

from contracts.media import to_uint8
from eval.probe import Reading, detect_color, detect_direction, detect_shape, probe_scores, read_clip
from eval.video_metrics import video_metrics
from pipeline import shapes
from pipeline.frames import resize_center_crop, select_frames
from pipeline.gif import decode


@pytest.fixture(scope="module")
def shape_clips(tmp_path_factory):
    """Clips as preprocessing makes them (decode, pick 8 frames by time, 16x16), with their labels."""
    out = tmp_path_factory.mktemp("shapes")
    shapes.make_shapes(out, num=40, seed=5)
    clips, labels = [], shapes.read_labels(out)
    for label in labels:
        gif = decode((out / label["path"]).read_bytes())
        indices, _ = select_frames(gif.durations_ms, 8)
        clips.append(resize_center_crop(gif.frames[indices], 16))
    return clips, labels


def _targets(labels):
    return [(lab["color"], lab["shape"], lab["direction"]) for lab in labels]


def test_probe_reads_the_labels_of_real_clips(shape_clips):
    clips, labels = shape_clips
    assert {lab["shape"] for lab in labels} == set(shapes.SHAPES)
    scores = probe_scores([read_clip(c) for c in clips], _targets(labels), heldout=())
    assert scores == {"probe/color_acc": 1.0, "probe/shape_acc": 1.0, "probe/direction_acc": 1.0}


def test_probe_splits_heldout_and_penalises_wrong_answers(shape_clips):
    clips, labels = shape_clips
    # Claim that the first 10 clips are of a held-out combination: they then score there, and wrongly wherever the
    # claimed word differs from the drawn one.
    targets = _targets(labels)
    fake = ("red", "triangle", "up")
    targets[:10] = [fake] * 10
    scores = probe_scores([read_clip(c) for c in clips], targets, heldout={fake})
    for i, word in enumerate(("color", "shape", "direction")):
        expected = np.mean([lab[word] == fake[i] for lab in labels[:10]])
        assert scores[f"probe/heldout_{word}_acc"] == pytest.approx(expected)
        assert scores[f"probe/{word}_acc"] == 1.0


def test_shape_is_read_from_the_outline_not_the_size_or_place(shape_clips):
    clips, labels = shape_clips
    square = next(c for c, lab in zip(clips, labels, strict=True) if lab["shape"] == "square")
    assert detect_shape(square) == "square"
    # A solid disc and a solid upright triangle drawn on the background, the same colour, both read as what they are.
    yy, xx = np.mgrid[0:16, 0:16] + 0.5
    shapes_drawn = {
        "circle": (xx - 9) ** 2 + (yy - 7) ** 2 <= 3.5**2,
        "triangle": (yy >= 3) & (yy <= 11) & (np.abs(xx - 8) <= (yy - 3) / 2),
        "square": (np.abs(xx - 6) <= 3) & (np.abs(yy - 9) <= 3),
    }
    for name, inside in shapes_drawn.items():
        frame = np.where(inside[..., None], shapes.COLORS["cyan"], shapes.BACKGROUND).astype(np.uint8)
        assert detect_shape(np.repeat(frame[None], 4, axis=0)) == name
    assert read_clip(np.full_like(square, shapes.BACKGROUND[0])) == Reading(None, None, None)


def test_static_and_empty_clips_have_no_direction(shape_clips):
    clips, labels = shape_clips
    frozen = np.repeat(clips[0][:1], 8, axis=0)
    assert detect_direction(frozen) is None
    assert detect_color(frozen) == labels[0]["color"]
    empty = np.full_like(clips[0], shapes.BACKGROUND[0])
    assert detect_direction(empty) is None and detect_color(empty) is None
    reversed_clip = clips[0][::-1]
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    assert detect_direction(reversed_clip) == opposite[labels[0]["direction"]]


def _to_model_space(clips):
    return np.stack(clips).astype(np.float32) / 127.5 - 1.0


def test_shuffled_frames_raise_flicker(shape_clips):
    clips, _ = shape_clips
    ordered = _to_model_space(clips)
    rng = np.random.default_rng(0)
    shuffled = np.stack([clip[rng.permutation(len(clip))] for clip in ordered])
    assert video_metrics(shuffled)["video/flicker"] > video_metrics(ordered)["video/flicker"]


def test_static_clips_are_flagged(shape_clips):
    clips, _ = shape_clips
    moving = _to_model_space(clips[:4])
    frozen = np.repeat(moving[:, :1], moving.shape[1], axis=1)
    mixed = np.concatenate([moving, frozen])
    scores = video_metrics(mixed)
    assert scores["video/static_fraction"] == 0.5
    assert video_metrics(moving)["video/static_fraction"] == 0.0
    assert video_metrics(frozen)["video/motion_energy"] == 0.0 < scores["video/motion_energy"]


def test_nonfinite_and_saturated_counts():
    clips = np.zeros((2, 3, 4, 4, 3), np.float32)
    clips[0, 0, 0, 0, 0] = np.nan
    clips[1, 1, 1, 1, 1] = np.inf
    clips[1, 2, 2, 2, 2] = 1.5
    scores = video_metrics(clips)
    assert scores["video/nonfinite_fraction"] == pytest.approx(2 / clips.size)
    assert scores["video/saturated_fraction"] == pytest.approx(1 / clips.size)
    assert to_uint8(clips).dtype == np.uint8


def test_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\[N, F, H, W, C\]"):
        video_metrics(np.zeros((3, 4, 4, 3)))
