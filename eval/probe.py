"""The shapes probe: an analytic detector (no learned weights) of a clip's colour and motion direction.

For clips of the moving-shapes dataset (pipeline/shapes.py), generated or real:
  * foreground = pixels far from the known background colour;
  * colour = the dataset colour that best explains the median foreground pixel as a blend of that colour with the
    background (at 16x16 a small shape's pixels are mostly edge pixels, half background: nearest-colour matching
    would read a darkened cyan as green);
  * direction = the sign of the larger of the horizontal and vertical slopes of a least-squares line through the
    per-frame foreground centroids. Frames are picked uniformly in time by preprocessing and the shapes move linearly
    in time, so the slope is the velocity. A clip whose centroid moves less than `min_travel` of the frame side over
    the clip reads as "static" and counts as wrong: direction must come from the motion itself, not from a pose.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from pipeline.shapes import BACKGROUND, COLORS, DIRECTIONS

# A pixel is foreground when some channel differs from the background by more than this (0-255 scale); the dataset's
# colours all differ from the background by > 150 in some channel, generated noise mostly by far less.
FOREGROUND_THRESHOLD = 60
MIN_FOREGROUND_FRACTION = 0.005  # below this fraction of pixels a frame counts as empty
MIN_TRAVEL = 0.08  # least centroid travel over the clip, as a fraction of the frame side, to read a direction

_COLOR_NAMES = list(COLORS)
_COLOR_OFFSETS = np.array(list(COLORS.values()), np.float64) - np.array(BACKGROUND, np.float64)


def foreground_mask(clip: np.ndarray) -> np.ndarray:
    """bool [F, H, W] for a uint8 clip [F, H, W, 3]."""
    diff = np.abs(clip.astype(np.int16) - np.array(BACKGROUND, np.int16))
    return diff.max(axis=-1) > FOREGROUND_THRESHOLD


def detect_color(clip: np.ndarray) -> str | None:
    mask = foreground_mask(clip)
    if mask.mean() < MIN_FOREGROUND_FRACTION:
        return None
    offset = np.median(clip[mask].astype(np.float64), axis=0) - np.array(BACKGROUND, np.float64)
    # pixel = background + a * (colour - background) with a in [0, 1]: the least-squares a per colour, then the
    # colour with the smallest residual.
    alpha = np.clip(_COLOR_OFFSETS @ offset / np.sum(_COLOR_OFFSETS**2, axis=1), 0.0, 1.0)
    residual = np.linalg.norm(offset[None, :] - alpha[:, None] * _COLOR_OFFSETS, axis=1)
    return _COLOR_NAMES[int(np.argmin(residual))]


def detect_direction(clip: np.ndarray) -> str | None:
    """'left'/'right'/'up'/'down', or None for a static or empty clip."""
    mask = foreground_mask(clip)
    frames, height, width = mask.shape
    ys, xs = np.mgrid[0:height, 0:width]
    times, centroids = [], []
    for t in range(frames):
        if mask[t].mean() >= MIN_FOREGROUND_FRACTION:
            times.append(t)
            centroids.append((xs[mask[t]].mean(), ys[mask[t]].mean()))
    if len(times) < 2:
        return None
    times = np.asarray(times, np.float64)
    centroids = np.asarray(centroids)
    slope_x, slope_y = np.polyfit(times, centroids, 1)[0]
    span = times[-1] - times[0]
    if max(abs(slope_x), abs(slope_y)) * span < MIN_TRAVEL * min(height, width):
        return None
    step = (int(np.sign(slope_x)), 0) if abs(slope_x) >= abs(slope_y) else (0, int(np.sign(slope_y)))
    return next(name for name, d in DIRECTIONS.items() if d == step)


def probe_scores(
    clips: Iterable[np.ndarray],
    targets: Sequence[tuple[str, str]],
    heldout: Iterable[tuple[str, str]],
) -> dict[str, float]:
    """Accuracies of the detected (colour, direction) against `targets`, split into training and held-out combinations.

    Returns probe/color_acc, probe/direction_acc (training combinations) and probe/heldout_color_acc,
    probe/heldout_direction_acc (held-out ones); a split with no clips is left out.
    """
    heldout = set(heldout)
    hits: dict[str, list[float]] = {"": [], "heldout_": []}
    direction_hits: dict[str, list[float]] = {"": [], "heldout_": []}
    for clip, (color, direction) in zip(clips, targets, strict=True):
        prefix = "heldout_" if (color, direction) in heldout else ""
        hits[prefix].append(float(detect_color(clip) == color))
        direction_hits[prefix].append(float(detect_direction(clip) == direction))
    scores = {}
    for prefix in hits:
        if hits[prefix]:
            scores[f"probe/{prefix}color_acc"] = float(np.mean(hits[prefix]))
            scores[f"probe/{prefix}direction_acc"] = float(np.mean(direction_hits[prefix]))
    return scores
