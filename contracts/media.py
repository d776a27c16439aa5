"""GIF media: pixels <-> model space, and clips as GIFs at a frame rate. Used by training (its input and samples),
evaluation, inference and the server, so a clip looks the same wherever it is written.

Model space is float in [-1, 1]: uint8 p maps to p * 2 / 255 - 1. Back to pixels, values are rounded, clipped to
the range, and non-finite values (a diverged model) become black or white instead of undefined casts.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any

import numpy as np

from contracts import storage


def frames_to_model(frames: Any) -> Any:
    """uint8 [0, 255] -> float32 [-1, 1], in jax (inside the jitted step, so hosts ship 1 byte per pixel)."""
    import jax.numpy as jnp

    return frames.astype(jnp.float32) * (2.0 / 255.0) - 1.0


def to_uint8(clips: np.ndarray) -> np.ndarray:
    """Model space -> uint8 pixels as GIFs show them (see the module doc)."""
    clips = np.nan_to_num(np.asarray(clips, np.float32), nan=-1.0, posinf=1.0, neginf=-1.0)
    return np.round((np.clip(clips, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def upscale(clip: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of uint8 [F, H, W, C] by an integer factor (for viewing small clips)."""
    return clip.repeat(factor, axis=1).repeat(factor, axis=2) if factor > 1 else clip


def frame_strip(frames: np.ndarray) -> np.ndarray:
    """[F, H, W, 3] -> [H, F * W, 3]: the clip's frames side by side, left to right in time."""
    return np.concatenate(list(frames), axis=1)


def gif_bytes(frames: np.ndarray, fps: float) -> bytes:
    """uint8 [F, H, W, 3] -> an endlessly looping GIF showing `fps` frames per second.

    GIF delays are whole centiseconds, so a frame lasts round(100 / fps) / 100 s. The bytes depend on the pixels
    and the frame rate alone: the same clip always encodes to the same file.
    """
    from PIL import Image

    images = [Image.fromarray(frame) for frame in np.asarray(frames, np.uint8)]
    out = io.BytesIO()
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=round(1000.0 / fps), loop=0)
    return out.getvalue()


def write_gif(path: str | os.PathLike, frames: np.ndarray, fps: float) -> None:
    """`gif_bytes` written to a local path or a URL (contracts/storage.py)."""
    storage.write_bytes(path, gif_bytes(frames, fps))


def prompt_slug(prompt: str) -> str:
    """A prompt as a file-name fragment: lower-case letters and digits joined by dashes, at most 60 characters."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "prompt"
