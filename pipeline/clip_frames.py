"""One GIF's bytes -> the frames of its training clip: parse, reject stills, pick frames by time, then decode them
streaming, resizing and cropping each chosen frame as soon as it is composited.

This is the whole image path of the preprocessing job, in one function so it can run in a child process under a
wall-clock limit (pipeline/timelimit.py). It imports numpy and Pillow only (no JAX, no Beam) and decodes each GIF
exactly once, however many captions it has, holding one logical screen and the clip whatever its number of frames.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline import frames, gif


@dataclass(frozen=True)
class ClipSpec:
    """What every clip is turned into."""

    num_frames: int
    size: int
    fps: float | None  # None: frames spread uniformly over the GIF's duration
    keep_stills: bool = False
    limits: gif.DecodeLimits = gif.DecodeLimits()


class ClipError(ValueError):
    """The GIF yields no clip: `stage` ("decode" or "frames") and a short `reason` for the dead-letter record."""

    def __init__(self, stage: str, reason: str, detail: str = "") -> None:
        super().__init__(f"{stage}: {reason}: {detail}" if detail else f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason
        self.detail = detail or reason

    def __reduce__(self):  # it crosses the pipe from the decoding child process (pipeline/timelimit.py)
        return ClipError, (self.stage, self.reason, self.detail)


def clip_frames(data: bytes, spec: ClipSpec) -> tuple[np.ndarray, np.ndarray]:
    """Returns (frames uint8 [F, S, S, 3], frame_times_ms float32 [F]) or raises ClipError.

    Streams: frame times come from the parsed file before any pixel is decoded, and each chosen frame is resized as
    soon as it is composited, so the decode holds one logical screen and the clip (`held_bytes`), whatever the
    number of frames; a GIF for which that exceeds `spec.limits.max_decoded_bytes` is refused as "too large".
    """
    animation, indices, times_ms = _choose(data, spec, held_bytes)
    out = np.empty((spec.num_frames, spec.size, spec.size, 3), np.uint8)
    for outputs, screen in _chosen_screens(animation, indices):
        out[outputs] = frames.center_crop_resize(screen, spec.size)  # each distinct frame resized once
    return out, times_ms


def chosen_frames(data: bytes, spec: ClipSpec) -> tuple[np.ndarray, np.ndarray]:
    """The clip's frames before resizing: (uint8 [F, H, W, 3] at the GIF's own size, frame_times_ms float32 [F]).

    Decoding, the refusal of stills and the choice of frames by time are the training clip's; `spec.size` is not
    used, and the budget covers the F frames at the GIF's own size. Raises ClipError. (FVD resizes these frames its
    own way: eval/fvd.py.)
    """

    def held(width: int, height: int, spec: ClipSpec) -> int:
        return gif.stream_bytes(width, height) + spec.num_frames * width * height * 3

    animation, indices, times_ms = _choose(data, spec, held)
    out = np.empty((spec.num_frames, animation.height, animation.width, 3), np.uint8)
    for outputs, screen in _chosen_screens(animation, indices):
        out[outputs] = np.asarray(screen.convert("RGB"))
    return out, times_ms


def held_bytes(width: int, height: int, spec: ClipSpec) -> int:
    """The most memory `clip_frames` holds for a width x height GIF: the streaming decode's and the clip's."""
    return gif.stream_bytes(width, height) + spec.num_frames * spec.size * spec.size * 3


def _choose(
    data: bytes, spec: ClipSpec, held_bytes: Callable[[int, int, ClipSpec], int]
) -> tuple[gif.Animation, np.ndarray, np.ndarray]:
    """(the parsed GIF, the index of each output frame, its time in ms), after every refusal: not a GIF, a decode
    over the memory budget, a still (unless kept), a clip too short."""
    if not gif.is_gif(data):
        # Recognised by its bytes, not its name: hosts serve GIFs as .gifv/.php and JPEGs as .gif.
        raise ClipError("decode", "not a gif", f"starts with {data[:8]!r}")
    try:
        animation = gif.parse(data, spec.limits)
    except gif.GifError as e:
        raise ClipError("decode", e.reason, str(e)) from e
    held, budget = held_bytes(animation.width, animation.height, spec), spec.limits.max_decoded_bytes
    if held > budget:
        raise ClipError(
            "decode",
            "too large",
            f"a {animation.width}x{animation.height} screen and {spec.num_frames} frames"
            f" need {held / 2**20:.0f} MiB to decode, over the budget of {budget / 2**20:.0f} MiB",
        )
    if len(animation) == 1:
        if not spec.keep_stills:
            raise ClipError("frames", "still image", "the GIF has a single frame (pass --keep-stills to keep stills)")
        # A still has no timeline to sample: every output frame is the one image, shown from time 0.
        return animation, np.zeros(spec.num_frames, np.int64), np.zeros(spec.num_frames, np.float32)
    try:
        indices, times_ms = frames.select_frames(animation.durations_ms, spec.num_frames, spec.fps)
    except frames.ClipTooShort as e:
        raise ClipError("frames", e.reason, str(e)) from e
    return animation, np.asarray(indices), np.asarray(times_ms, np.float32)


def _chosen_screens(animation: gif.Animation, indices: np.ndarray) -> Iterator[tuple[slice, Image.Image]]:
    """(the output frames it fills, the composited screen as an RGBX image) for each distinct chosen frame, in order.
    Frame times increase, so the chosen indices do, and a frame shown longer than a sampling step fills several
    consecutive outputs. The screen is composited in place: use it before asking for the next."""
    distinct, first = np.unique(indices, return_index=True)
    size = (animation.width, animation.height)
    ends = [*first[1:], len(indices)]
    for (_, screen), start, end in zip(animation.screens(distinct.tolist()), first, ends, strict=True):
        yield slice(int(start), int(end)), Image.frombuffer("RGBX", size, screen, "raw", "RGBX", 0, 1)
