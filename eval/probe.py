"""The shapes probe: an analytic detector (no learned weights) of a clip's colour, shape and motion direction.

For clips of the moving-shapes dataset (pipeline/shapes.py), generated or real:
  * foreground = pixels far from the known background colour;
  * colour = the dataset colour that best explains the median foreground pixel as a blend of that colour with the
    background (at 16x16 a small shape's pixels are mostly edge pixels, half background: nearest-colour matching
    would read a darkened cyan as green);
  * shape = the template that best matches the frames' coverage. Each pixel's coverage is the fraction of it the
    detected colour covers (the same blend, solved per pixel), counted at foreground pixels and their neighbours
    only (so that faint noise elsewhere in a generated frame does not count as shape). In each frame, each shape's
    template is drawn the way pipeline/shapes.py draws it (square; circle; triangle with its apex up, base = height),
    anti-aliased by supersampling, with the frame's covered area and centroid, and the shape whose templates leave
    the least squared difference over the clip's frames wins. The templates are geometry, not learned: the circle
    differs from the square only by its missing corners, which is why a template and not a bounding box or a second
    moment (the two have nearly the same spread) decides;
  * direction = the sign of the larger of the horizontal and vertical slopes of a least-squares line through the
    per-frame foreground centroids. Frames are picked uniformly in time by preprocessing and the shapes move linearly
    in time, so the slope is the velocity. A clip whose centroid moves less than `min_travel` of the frame side over
    the clip reads as "static" and counts as wrong: direction must come from the motion itself, not from a pose.

The eval job reports the detector's accuracy on the dataset's own clips (`probe/real_*`) beside the model's, so a
reader can tell a detector's miss from the model's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Sequence

import numpy as np

from pipeline.shapes import BACKGROUND, COLORS, DIRECTIONS, SHAPES

# A pixel is foreground when some channel differs from the background by more than this (0-255 scale); the dataset's
# colours all differ from the background by > 150 in some channel, generated noise mostly by far less.
FOREGROUND_THRESHOLD = 60
MIN_FOREGROUND_FRACTION = 0.005  # below this fraction of pixels a frame counts as empty
MIN_TRAVEL = 0.08  # least centroid travel over the clip, as a fraction of the frame side, to read a direction
# Each shape's area as a fraction of its bounding square (pipeline/shapes.py::render_frames): the square fills it, the
# inscribed circle pi/4 of it, the triangle with base and height equal to the side half of it.
FILL_FRACTION = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
SUPERSAMPLE = 8  # template sub-pixels per pixel side: coverage in steps of 1/64

_COLOR_NAMES = list(COLORS)
_BACKGROUND = np.array(BACKGROUND, np.float64)
_COLOR_OFFSETS = np.array(list(COLORS.values()), np.float64) - _BACKGROUND
assert set(FILL_FRACTION) == set(SHAPES)


@dataclasses.dataclass(frozen=True)
class Reading:
    """What the detector reads from one clip; None where it reads nothing (an empty or static clip)."""

    color: str | None
    shape: str | None
    direction: str | None

    def matches(self, target: tuple[str, str, str]) -> tuple[bool, bool, bool]:
        """Per word of a (colour, shape, direction) target, whether the clip shows it."""
        color, shape, direction = target
        return self.color == color, self.shape == shape, self.direction == direction


def foreground_mask(clip: np.ndarray) -> np.ndarray:
    """bool [F, H, W] for a uint8 clip [F, H, W, 3]."""
    diff = np.abs(clip.astype(np.int16) - np.array(BACKGROUND, np.int16))
    return diff.max(axis=-1) > FOREGROUND_THRESHOLD


def detect_color(clip: np.ndarray) -> str | None:
    mask = foreground_mask(clip)
    if mask.mean() < MIN_FOREGROUND_FRACTION:
        return None
    offset = np.median(clip[mask].astype(np.float64), axis=0) - _BACKGROUND
    # pixel = background + a * (colour - background) with a in [0, 1]: the least-squares a per colour, then the
    # colour with the smallest residual.
    alpha = np.clip(_COLOR_OFFSETS @ offset / np.sum(_COLOR_OFFSETS**2, axis=1), 0.0, 1.0)
    residual = np.linalg.norm(offset[None, :] - alpha[:, None] * _COLOR_OFFSETS, axis=1)
    return _COLOR_NAMES[int(np.argmin(residual))]


def coverage(clip: np.ndarray, color: str) -> np.ndarray:
    """float [F, H, W] in [0, 1]: per pixel, the least-squares a of pixel = background + a * (colour - background)."""
    offset = np.array(COLORS[color], np.float64) - _BACKGROUND
    return np.clip((clip.astype(np.float64) - _BACKGROUND) @ offset / (offset @ offset), 0.0, 1.0)


def template(shape: str, centroid: tuple[float, float], area: float, size: int) -> np.ndarray:
    """float [size, size]: the coverage of `shape` with the given area (pixels) and centroid (x, y; pixel centres at
    i + 0.5), upright as pipeline/shapes.py draws it, averaged over SUPERSAMPLE x SUPERSAMPLE sub-pixels per pixel."""
    side = np.sqrt(area / FILL_FRACTION[shape])
    grid = (np.arange(size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    dx = grid[None, :] - centroid[0]
    dy = grid[:, None] - centroid[1]
    if shape == "square":
        inside = (np.abs(dx) <= side / 2) & (np.abs(dy) <= side / 2)
    elif shape == "circle":
        inside = dx**2 + dy**2 <= (side / 2) ** 2
    else:
        # Apex up, base down; a triangle's centroid lies two thirds of its height below the apex.
        depth = dy + 2 * side / 3  # distance below the apex
        inside = (depth >= 0) & (depth <= side) & (np.abs(dx) <= depth / 2)
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def _dilate(mask: np.ndarray) -> np.ndarray:
    """bool [F, H, W]: `mask` grown by one pixel in each of the 8 directions (within the frame)."""
    grown = mask.copy()
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    height, width = mask.shape[1:]
    for dy in range(3):
        for dx in range(3):
            grown |= padded[:, dy : dy + height, dx : dx + width]
    return grown


def detect_shape(clip: np.ndarray, color: str | None = None) -> str | None:
    """'circle'/'square'/'triangle' (module docstring), or None for an empty clip; `color`: the detected one if None."""
    color = color or detect_color(clip)
    if color is None:
        return None
    mask = foreground_mask(clip)
    # Coverage counts only at and next to foreground pixels: a generated clip's faint background noise, spread over the
    # frame, would otherwise add to the area and pull the template's size and centroid away from the shape.
    cover = coverage(clip, color) * _dilate(mask)
    height, width = cover.shape[1:]
    assert height == width, f"frames must be square, got {height}x{width}"
    centres = np.arange(height) + 0.5
    errors = dict.fromkeys(SHAPES, 0.0)
    frames_read = 0
    for frame, frame_mask in zip(cover, mask, strict=True):
        area = frame.sum()
        if frame_mask.mean() < MIN_FOREGROUND_FRACTION or area <= 0:
            continue
        frames_read += 1
        centroid = (float(frame.sum(axis=0) @ centres / area), float(frame.sum(axis=1) @ centres / area))
        for shape in SHAPES:
            errors[shape] += float(np.sum((template(shape, centroid, area, height) - frame) ** 2))
    if not frames_read:
        return None
    return min(errors, key=errors.__getitem__)


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


def read_clip(clip: np.ndarray) -> Reading:
    """The detector's reading of a uint8 clip [F, H, W, 3]."""
    color = detect_color(clip)
    return Reading(color=color, shape=detect_shape(clip, color), direction=detect_direction(clip))


def probe_scores(
    readings: Iterable[Reading],
    targets: Sequence[tuple[str, str, str]],
    heldout: Collection[tuple[str, str, str]],
    *,
    prefix: str = "probe/",
) -> dict[str, float]:
    """Accuracies of the readings against the (colour, shape, direction) `targets`, split into training combinations
    (`{prefix}color_acc`, `{prefix}shape_acc`, `{prefix}direction_acc`) and the `heldout` ones (`{prefix}heldout_...`);
    a split with no clips is left out."""
    hits: dict[str, list[tuple[bool, bool, bool]]] = {"": [], "heldout_": []}
    for reading, target in zip(readings, targets, strict=True):
        hits["heldout_" if tuple(target) in heldout else ""].append(reading.matches(target))
    scores = {}
    for split, rows in hits.items():
        if rows:
            accuracies = np.mean(np.asarray(rows, np.float64), axis=0)
            for word, accuracy in zip(("color", "shape", "direction"), accuracies, strict=True):
                scores[f"{prefix}{split}{word}_acc"] = float(accuracy)
    return scores
