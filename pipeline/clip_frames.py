"""One GIF's bytes -> the frames of its training clip: decode, reject stills, pick frames by time, resize and crop.

This is the whole image path of the preprocessing job, in one function so it can run in a child process under a
wall-clock limit (pipeline/timelimit.py). It imports numpy and Pillow only (no JAX, no Beam) and decodes each GIF
exactly once, however many captions it has.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
    """Returns (frames uint8 [F, S, S, 3], frame_times_ms float32 [F]) or raises ClipError."""
    chosen, times_ms = chosen_frames(data, spec)
    return frames.resize_center_crop(chosen, spec.size), times_ms


def chosen_frames(data: bytes, spec: ClipSpec) -> tuple[np.ndarray, np.ndarray]:
    """The clip's frames before resizing: (uint8 [F, H, W, 3] at the GIF's own size, frame_times_ms float32 [F]).

    Decoding, the refusal of stills and the choice of frames by time are the training clip's; `spec.size` is not
    used. Raises ClipError. (FVD resizes these frames its own way: eval/fvd.py.)
    """
    if not gif.is_gif(data):
        # Recognised by its bytes, not its name: hosts serve GIFs as .gifv/.php and JPEGs as .gif.
        raise ClipError("decode", "not a gif", f"starts with {data[:8]!r}")
    try:
        decoded = gif.decode(data, spec.limits)
    except gif.GifError as e:
        raise ClipError("decode", e.reason, str(e)) from e
    durations = np.asarray(decoded.durations_ms)
    if len(decoded.frames) == 1:
        if not spec.keep_stills:
            raise ClipError("frames", "still image", "the GIF has a single frame (pass --keep-stills to keep stills)")
        # A still has no timeline to sample: every output frame is the one image, shown from time 0.
        indices, times_ms = np.zeros(spec.num_frames, np.int64), np.zeros(spec.num_frames, np.float32)
    else:
        try:
            indices, times_ms = frames.select_frames(durations, spec.num_frames, spec.fps)
        except frames.ClipTooShort as e:
            raise ClipError("frames", e.reason, str(e)) from e
    return decoded.frames[np.asarray(indices)], np.asarray(times_ms, np.float32)
