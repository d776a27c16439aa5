"""Weight-free video metrics over a set of clips.

All take clips as float arrays in the model's pixel space [-1, 1] (before any clipping), shape [N, F, H, W, C], so
that non-finite and saturated values are still visible; the temporal metrics work on the clipped uint8 view that a
GIF would show.

  video/flicker        mean |x_{t+1} - x_t| over consecutive frames, on the 0-255 scale divided by 255. VBench's
                       temporal-flickering score (Huang et al. 2024, "VBench", sec. 3.2) is 1 - video/flicker.
  video/motion_energy  mean squared consecutive-frame difference (0-1 scale): weights large changes more than
                       flicker does, so a moving object scores high while low-amplitude noise scores low.
  video/static_fraction  fraction of clips whose largest per-pixel change over the whole clip stays below
                       STATIC_THRESHOLD (a frozen clip; noise-free generated stills land here).
  video/nonfinite_fraction, video/saturated_fraction  fractions of values that are NaN/inf, or outside [-1, 1].
"""

from __future__ import annotations

import numpy as np

from contracts.media import to_uint8

STATIC_THRESHOLD = 8 / 255  # largest per-pixel change (0-1 scale) for a clip to count as static


def video_metrics(clips: np.ndarray) -> dict[str, float]:
    clips = np.asarray(clips, np.float32)
    if clips.ndim != 5:
        raise ValueError(f"expected clips [N, F, H, W, C], got shape {clips.shape}")
    finite = np.isfinite(clips)
    scores = {
        "video/nonfinite_fraction": float(1.0 - finite.mean()),
        "video/saturated_fraction": float((finite & (np.abs(clips) > 1.0)).mean()),
    }
    pixels = to_uint8(clips).astype(np.float32) / 255.0
    if clips.shape[1] > 1:
        diff = np.diff(pixels, axis=1)
        scores["video/flicker"] = float(np.abs(diff).mean())
        scores["video/motion_energy"] = float((diff**2).mean())
        largest_change = (pixels.max(axis=1) - pixels.min(axis=1)).reshape(len(pixels), -1).max(axis=1)
        scores["video/static_fraction"] = float((largest_change < STATIC_THRESHOLD).mean())
    return scores
