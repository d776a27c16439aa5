"""The moving-shapes dataset: real GIF files of one coloured shape moving in one direction, with captions.

It is the demo's data and the end-to-end test bed. `make_shapes(out_dir, num, seed)` writes

  out_dir/gifs/NNNNN.gif   real animated GIFs, saved by Pillow with frame optimisation, so later frames are usually
                           partial rectangles and both "none" and "restore to background" disposal occur;
  out_dir/manifest.tsv     TGIF's layout: `gifs/NNNNN.gif<TAB>a red circle moving left` (paths relative to it);
  out_dir/labels.jsonl     one JSON object per clip with the ground truth (shape, colour, direction, geometry, delays);
  out_dir/heldout.json     the held-out combinations: colour x direction and shape x direction pairs that never
                           occur together in the manifest (each entry names the two words it pairs).

The GIFs vary the way real ones do: canvas 48-96 px per side, 8-24 frames, per-frame delays of 20-100 ms (constant
in most clips, jittered in some). The shape's position is a function of *time*, not of frame index, so a clip with
uneven delays still shows uniform motion when its frames are picked by time, as the preprocessing job does. The
whole path stays inside the canvas's centred square, so the centre crop of preprocessing never cuts the motion.
Everything is drawn directly in palette mode with a fixed palette, so pixel colours are exact and a probe can read
colour and motion back from decoded frames.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
# Saturated, well-separated colours; names are the words used in captions.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 70, 230),
    "yellow": (235, 220, 30),
    "magenta": (220, 40, 210),
    "cyan": (30, 210, 220),
}
BACKGROUND = (16, 16, 16)
# Unit steps in image coordinates (x right, y down).
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# Held out of training: pairs of words that never occur together in the manifest. Each colour, shape and direction is
# still seen in training with other partners (every colour with every shape and three directions, every shape with
# three directions), so generating these combinations tests generalisation, not memorisation. A caption is held out
# when it contains any of these pairs: 12 colour x shape x direction combinations through the first list, 18 through
# the second, three ("a blue circle moving down", "a yellow square moving right", "a red triangle moving up")
# through both: 27 of 72. (Colour x shape pairs were tried as well and are not held out: at the demo's scale the
# model drew an unseen colour x shape pair in the colour's familiar shapes; README, "What the demo learns".)
HELDOUT_COLOR_DIRECTION: tuple[tuple[str, str], ...] = (
    ("red", "up"),
    ("green", "left"),
    ("blue", "down"),
    ("yellow", "right"),
)
HELDOUT_SHAPE_DIRECTION: tuple[tuple[str, str], ...] = (("circle", "down"), ("square", "right"), ("triangle", "up"))

CANVAS_RANGE = (48, 96)  # pixels per side, inclusive
FRAMES_RANGE = (8, 24)  # frames per clip, inclusive, before merging repeated frames (rare; see _merge_repeated_frames)
DELAY_RANGE_MS = (20, 100)  # per-frame delay, inclusive; GIF stores centiseconds, so multiples of 10
SIZE_FRACTION = (0.45, 0.55)  # shape size as a fraction of the centred square's side
TRAVEL_FRACTION = (0.75, 0.85)  # distance travelled over the clip as a fraction of the free room along the path
# Where a shape's path lies. Along the motion it starts within START_BAND of the free room from the edge it moves away
# from; across it, within ACROSS_BAND of the free room around the centre line. With speeds in a narrow band
# (TRAVEL_FRACTION), the clips of one caption sweep nearly the same stretch of the frame while shape, size, colour,
# canvas, frame count and delays vary: the conditional mean of a caption is itself a moving blob, which is what lets
# a small model learn motion in minutes on a CPU (the demo; measurements in the README). Direction is still only
# readable from motion: every clip passes through the centre, and no single frame says which way the shape goes.
START_BAND = 0.05
ACROSS_BAND = 0.2

_PALETTE = [BACKGROUND, *COLORS.values()]


@dataclass(frozen=True)
class Clip:
    """Ground truth of one GIF, as written to labels.jsonl."""

    path: str
    caption: str
    shape: str
    color: str
    direction: str
    width: int
    height: int
    size: int  # the shape's bounding-box side in pixels
    start_xy: tuple[float, float]  # top-left of the shape's box at time 0
    velocity_px_per_s: tuple[float, float]
    durations_ms: tuple[int, ...]


def caption_for(shape: str, color: str, direction: str) -> str:
    return f"a {color} {shape} moving {direction}"


def is_heldout(color: str, shape: str, direction: str) -> bool:
    """True for a combination that never occurs in the training manifest (it contains a held-out pair)."""
    return (color, direction) in HELDOUT_COLOR_DIRECTION or (shape, direction) in HELDOUT_SHAPE_DIRECTION


def all_combinations() -> list[tuple[str, str, str]]:
    """Every (colour, shape, direction), in COLORS x SHAPES x DIRECTIONS order, held-out ones included."""
    return [(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]


def training_combinations() -> list[tuple[str, str, str]]:
    """The (colour, shape, direction) combinations that appear in the training manifest."""
    return [combo for combo in all_combinations() if not is_heldout(*combo)]


def heldout_records() -> list[dict[str, str]]:
    """heldout.json's entries: one object per held-out pair, keyed by the kinds of word it pairs."""
    return [{"color": c, "direction": d} for c, d in HELDOUT_COLOR_DIRECTION] + [
        {"shape": s, "direction": d} for s, d in HELDOUT_SHAPE_DIRECTION
    ]


def parse_caption(caption: str) -> tuple[str, str, str] | None:
    """(colour, shape, direction) of a caption written by `caption_for`, or None for any other sentence."""
    words = caption.split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving":
        return None
    color, shape, direction = words[1], words[2], words[4]
    if color not in COLORS or shape not in SHAPES or direction not in DIRECTIONS:
        return None
    return color, shape, direction


def _sample_clip(
    rng: np.random.Generator,
    index: int,
    combo: tuple[str, str, str],
    canvas_range: tuple[int, int],
    frames_range: tuple[int, int],
) -> Clip:
    color, shape, direction = combo
    width, height = (int(v) for v in rng.integers(canvas_range[0], canvas_range[1] + 1, size=2))
    num_frames = int(rng.integers(frames_range[0], frames_range[1] + 1))
    base_cs = int(rng.integers(DELAY_RANGE_MS[0] // 10, DELAY_RANGE_MS[1] // 10 + 1))
    if rng.random() < 0.25:  # jittered delays, as in GIFs exported from videos with dropped frames
        low, high = DELAY_RANGE_MS[0] // 10, DELAY_RANGE_MS[1] // 10
        delays_cs = np.clip(base_cs + rng.integers(-2, 3, size=num_frames), low, high)
    else:
        delays_cs = np.full(num_frames, base_cs)
    durations_ms = tuple(int(d) * 10 for d in delays_cs)

    side = min(width, height)  # the centred square that survives a centre crop
    x0, y0 = (width - side) / 2, (height - side) / 2
    size = int(round(side * rng.uniform(*SIZE_FRACTION)))
    room = side - size  # free room along either axis inside the square
    travel = room * rng.uniform(*TRAVEL_FRACTION)
    dx, dy = DIRECTIONS[direction]
    # Start so that the whole path fits: along the motion axis the start is drawn from the start band, across it
    # from the band around the centre line.
    along = rng.uniform(0, min(room - travel, START_BAND * room))
    across = rng.uniform((1 - ACROSS_BAND) * room / 2, (1 + ACROSS_BAND) * room / 2)
    if dx:
        sx = along if dx > 0 else room - along
        sy = across
    else:
        sx = across
        sy = along if dy > 0 else room - along
    # The last frame is shown at time D - last delay; make the shape arrive there.
    last_start_s = (sum(durations_ms) - durations_ms[-1]) / 1000.0
    speed = travel / last_start_s
    clip = Clip(
        path=f"gifs/{index:05d}.gif",
        caption=caption_for(shape, color, direction),
        shape=shape,
        color=color,
        direction=direction,
        width=width,
        height=height,
        size=size,
        start_xy=(x0 + sx, y0 + sy),
        velocity_px_per_s=(dx * speed, dy * speed),
        durations_ms=durations_ms,
    )
    return _merge_repeated_frames(clip)


def _merge_repeated_frames(clip: Clip) -> Clip:
    """Merges consecutive frames that render identically (slow motion rounds to the same pixel) into one longer frame.

    A GIF writer drops such repeats anyway (Pillow does), so the labels describe the file that is written. The kept
    frames keep their start times, hence their positions.
    """
    rendered = [np.asarray(f) for f in render_frames(clip)]
    durations = [clip.durations_ms[0]]
    for previous, current, duration in zip(rendered, rendered[1:], clip.durations_ms[1:], strict=False):
        if np.array_equal(previous, current):
            durations[-1] += duration
        else:
            durations.append(duration)
    return replace(clip, durations_ms=tuple(durations))


def frame_positions(clip: Clip) -> np.ndarray:
    """Top-left corner of the shape's box in each frame, float [N, 2] (x, y): position is linear in time."""
    starts_s = np.concatenate([[0], np.cumsum(clip.durations_ms[:-1])]) / 1000.0
    return np.asarray(clip.start_xy)[None, :] + starts_s[:, None] * np.asarray(clip.velocity_px_per_s)[None, :]


def render_frames(clip: Clip) -> list[Image.Image]:
    """Draws the clip's frames as palette images (index 0 background, 1.. the colours)."""
    palette = [channel for rgb in _PALETTE for channel in rgb]
    color_index = 1 + list(COLORS).index(clip.color)
    frames = []
    for x, y in frame_positions(clip):
        image = Image.new("P", (clip.width, clip.height), 0)
        image.putpalette(palette)
        draw = ImageDraw.Draw(image)
        x, y = int(round(x)), int(round(y))
        box = (x, y, x + clip.size - 1, y + clip.size - 1)
        if clip.shape == "circle":
            draw.ellipse(box, fill=color_index)
        elif clip.shape == "square":
            draw.rectangle(box, fill=color_index)
        else:
            draw.polygon([(x + (clip.size - 1) / 2, y), (box[2], box[3]), (x, box[3])], fill=color_index)
        frames.append(image)
    return frames


def write_gif(clip: Clip, path: Path, disposal: int) -> None:
    frames = render_frames(clip)
    # optimize=True lets Pillow crop each later frame to the rectangle that changed (partial frames).
    frames[0].save(
        path,
        save_all=True,
        append_images=frames[1:],
        duration=list(clip.durations_ms),
        loop=0,
        disposal=disposal,
        optimize=True,
    )


def make_shapes(
    out_dir: str | Path,
    num: int,
    seed: int = 0,
    canvas_range: tuple[int, int] = CANVAS_RANGE,
    frames_range: tuple[int, int] = FRAMES_RANGE,
) -> Path:
    """Writes `num` training clips (held-out combinations excluded) and returns the manifest's path. The ranges
    (inclusive) of canvas side and frame count default to the demo's; bench/preprocess.py makes long, large ones."""
    if num < 1:
        raise ValueError(f"--num must be at least 1, got {num}")
    out = Path(out_dir)
    (out / "gifs").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # Cycle through the combinations so that every one is equally represented, in an order shuffled once so that even
    # a small set mixes every colour, shape and direction.
    training = training_combinations()
    combos = [training[j] for j in rng.permutation(len(training))]
    clips = []
    for i in range(num):
        clip = _sample_clip(rng, i, combos[i % len(combos)], canvas_range, frames_range)
        write_gif(clip, out / clip.path, disposal=int(rng.choice([1, 2])))
        clips.append(clip)
    manifest = out / "manifest.tsv"
    manifest.write_text("".join(f"{c.path}\t{c.caption}\n" for c in clips), encoding="utf-8")
    with open(out / "labels.jsonl", "w", encoding="utf-8") as f:
        for c in clips:
            f.write(json.dumps(asdict(c)) + "\n")
    (out / "heldout.json").write_text(json.dumps(heldout_records(), indent=1) + "\n", encoding="utf-8")
    return manifest


def read_labels(out_dir: str | Path) -> list[dict]:
    with open(Path(out_dir) / "labels.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]
