"""Frame selection by time and the centre-crop resize, against hand-computed expectations."""

import numpy as np
import pytest

from pipeline.frames import ClipTooShort, resize_center_crop, select_frames


def test_time_uniform_follows_uneven_delays():
    # Frames end at 200, 250, 300, 1000 ms; samples at 125, 375, 625, 875 ms. The two 50 ms frames fall between
    # samples and are skipped, the long last frame is sampled three times.
    indices, times = select_frames(np.array([200, 50, 50, 700]), 4)
    np.testing.assert_array_equal(indices, [0, 3, 3, 3])
    np.testing.assert_allclose(times, [125, 375, 625, 875])
    assert indices.dtype == np.int64


def test_sample_on_a_frame_boundary_shows_the_next_frame():
    # Frames end at 100, 400, 500, 1000; samples at 100, 300, 500, 700, 900: a frame is shown during
    # [start, end), so t = 100 and t = 500 belong to the frames that start there.
    indices, _ = select_frames(np.array([100, 300, 100, 500]), 5)
    np.testing.assert_array_equal(indices, [1, 1, 3, 3, 3])


def test_fewer_frames_than_samples_repeat_as_held():
    indices, times = select_frames(np.array([100, 300]), 4)  # samples at 50, 150, 250, 350
    np.testing.assert_array_equal(indices, [0, 1, 1, 1])
    np.testing.assert_allclose(times, [50, 150, 250, 350])


def test_single_frame():
    indices, times = select_frames(np.array([70]), 3)
    np.testing.assert_array_equal(indices, [0, 0, 0])
    np.testing.assert_allclose(times, [70 / 6, 35, 70 * 5 / 6])


def test_fixed_rate_window_is_centred():
    # 1000 ms of 100 ms frames; 4 samples at 10 fps span 400 ms, from 300 to 700 ms, sampled at 350, ..., 650.
    indices, times = select_frames(np.full(10, 100), 4, fps=10)
    np.testing.assert_array_equal(indices, [3, 4, 5, 6])
    np.testing.assert_allclose(times, [350, 450, 550, 650])


def test_fixed_rate_with_uneven_delays():
    # Frames end at 500, 600, 700, 1000; 3 samples at 5 fps span 600 ms from 200: t = 300, 500, 700.
    indices, _ = select_frames(np.array([500, 100, 100, 300]), 3, fps=5)
    np.testing.assert_array_equal(indices, [0, 1, 3])


def test_fixed_rate_clip_exactly_as_long_as_the_window():
    indices, _ = select_frames(np.full(8, 100), 8, fps=10)
    np.testing.assert_array_equal(indices, np.arange(8))
    indices, _ = select_frames(np.full(3, 100), 9, fps=30)  # 9 frames at 30 fps: 300 ms, not exact in binary
    np.testing.assert_array_equal(indices, [0, 0, 0, 1, 1, 1, 2, 2, 2])


def test_fixed_rate_clip_too_short():
    with pytest.raises(ClipTooShort) as info:
        select_frames(np.full(5, 100), 8, fps=10)  # 500 ms < 800 ms
    assert info.value.reason == "shorter than F/fps"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("durations", "num_frames", "fps"),
    [([], 4, None), ([100, 100], 0, None), ([100], 4, 0.0), ([0, 0], 2, None), ([100, -10], 2, None)],
)
def test_bad_arguments(durations, num_frames, fps):
    with pytest.raises(ValueError):
        select_frames(np.array(durations), num_frames, fps)


@pytest.mark.parametrize(("height", "width"), [(30, 50), (50, 30), (7, 5), (64, 64)])
def test_resize_shape_and_dtype(height, width):
    frames = np.random.default_rng(0).integers(0, 256, (3, height, width, 3), dtype=np.uint8)
    out = resize_center_crop(frames, 16)
    assert out.shape == (3, 16, 16, 3)
    assert out.dtype == np.uint8


def test_resize_keeps_the_centre_and_crops_the_sides():
    green, red, blue = (0, 160, 0), (255, 0, 0), (0, 0, 255)
    frame = np.empty((60, 120, 3), np.uint8)
    frame[:] = green
    frame[:, :30] = red  # outside the centred 60 x 60 square
    frame[:, 90:] = blue
    frame[26:34, 56:64] = 0  # a black marker in the very centre
    out = resize_center_crop(frame[None], 30)[0].astype(int)
    assert out[14:16, 14:16].max() < 40  # the marker survives, in the middle
    # No trace of the side bands (Lanczos blends in at most a sliver of the pixels next to the crop line).
    assert out[..., 0].max() < 30 and out[..., 2].max() < 30
    assert out[:, [0, -1], 1].min() > 140  # the first and last columns are the centre square's green


@pytest.mark.parametrize(("height", "width", "size"), [(40, 70, 16), (5, 3, 24), (33, 33, 33)])
def test_flat_colour_stays_exact(height, width, size):
    colour = np.array([37, 142, 201], np.uint8)
    frames = np.broadcast_to(colour, (2, height, width, 3)).copy()
    out = resize_center_crop(frames, size)
    assert (out == colour).all()


def test_resize_rejects_non_rgb_frames():
    with pytest.raises(ValueError, match="uint8"):
        resize_center_crop(np.zeros((2, 8, 8), np.uint8), 4)
