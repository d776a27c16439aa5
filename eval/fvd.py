"""Fréchet Video Distance (Unterthiner et al. 2018) with the Kinetics-400 I3D: protocol, features, cache, distance.

The protocol of the reference code (google-research `frechet_video_distance`), step by step:

    clips uint8 [N, T, H, W, 3]
    -> every frame resized to 224 x 224 by bilinear interpolation, aspect ratio not kept (`resize_frames`: TF1's
       `tf.image.resize_bilinear`, which the reference calls, i.e. without half-pixel centres)
    -> scaled to [-1, 1] (2 x / 255 - 1)
    -> the I3D (eval/i3d.py) -> the 400 logits averaged over time, before softmax: one vector per clip
    -> Fréchet distance between the Gaussians fitted to the two sets of vectors, in float64 (eval/frechet.py: unbiased
       covariances, matrix square roots by symmetric eigen-decomposition)

FVD depends on choices the formula does not show, so every value is reported with them (`Protocol.describe`): the
number of clips per side (the estimate is biased upward at small N, and only values at equal N compare), frames per
clip, stretch vs aspect-keeping centre crop, and the square-root method. Named protocols set the defaults:

  reference   16 frames, every clip of each side, stretch (the reference code's example feeds 16 clips of 15 frames;
              its sanity check, 16 all-black against 16 all-white clips, "should be around 131");
  stylegan-v  StyleGAN-V's `fvd2048_16f` (Skorokhodov et al. 2022): 16 frames, 2048 clips per side. Only the counts
              are StyleGAN-V's; the rest stays the reference's (README, "Evaluation -> FVD", lists what differs).

Clips with another frame count than the protocol's are re-timed first (`retime`): their frames are taken as equally
long, and the protocol's frames are picked by time the way preprocessing picks them (pipeline/frames.py), so an
8-frame clip shows each frame twice in 16.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
import time
import typing
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from contracts import storage
from eval.frechet import frechet_distance
from eval.i3d import MIN_FRAMES, NUM_CLASSES, RESOLUTION
from pipeline.frames import select_frames

# Below this many clips on either side a value is flagged: StyleGAN-V's protocol and most papers since use 2048, and
# below 401 clips the 400 x 400 covariance is singular.
SMALL_N = 2048
SQRTM = "eigh"  # how eval/frechet.py takes matrix square roots: symmetric eigen-decomposition, negatives clipped
# Bump when anything that turns the same bytes into other features changes (the GIF decoder or frame choice, the
# resize, the feature definition): cached features are keyed by input bytes, protocol and weights only.
FEATURES_VERSION = 1


class FvdError(ValueError):
    """FVD cannot be computed as asked (a bad protocol setting, an empty or unreadable set of clips)."""


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How clips become FVD features, and how many: what must be reported beside every FVD value."""

    name: str  # "reference" or "stylegan-v": where the defaults came from
    frames: int = 16  # frames per clip fed to the I3D (clips with another count are re-timed, see module doc)
    max_clips: int | None = None  # clips per side at most (the first ones, in the set's order); None: all
    center_crop: bool = False  # crop each frame's centred square before resizing (keeps the aspect ratio)

    def __post_init__(self) -> None:
        if self.frames < MIN_FRAMES:
            raise FvdError(f"FVD needs at least {MIN_FRAMES} frames per clip (the I3D pools time), got {self.frames}")
        if self.max_clips is not None and self.max_clips < 2:
            raise FvdError(f"a Fréchet distance needs at least 2 clips per side, got max_clips={self.max_clips}")

    def describe(self) -> str:
        """Every setting in one line, e.g. "reference (16 frames, stretch to 224x224, sqrtm eigh)"."""
        resize = "centre crop + resize" if self.center_crop else "stretch"
        clips = "" if self.max_clips is None else f", at most {self.max_clips} clips per side"
        return f"{self.name} ({self.frames} frames, {resize} to {RESOLUTION}x{RESOLUTION}, sqrtm {SQRTM}{clips})"


PROTOCOLS = {"reference": Protocol("reference"), "stylegan-v": Protocol("stylegan-v", max_clips=2048)}


def make_protocol(
    name: str, *, frames: int | None = None, max_clips: int | None = None, center_crop: bool = False
) -> Protocol:
    """The named protocol with any explicit setting overriding its default."""
    if name not in PROTOCOLS:
        raise FvdError(f"unknown FVD protocol {name!r}; choose from {sorted(PROTOCOLS)}")
    base = PROTOCOLS[name]
    return dataclasses.replace(
        base,
        frames=base.frames if frames is None else int(frames),
        max_clips=base.max_clips if max_clips is None else int(max_clips),
        center_crop=center_crop,
    )


def small_n_warning(n: int, n_other: int) -> str | None:
    """The warning that goes with an FVD from `n` and `n_other` clips, or None when both sides are large enough."""
    if min(n, n_other) >= SMALL_N:
        return None
    return (
        f"FVD from {n} and {n_other} clips, fewer than {SMALL_N} per side: it is biased upward at small N "
        "(the more so the fewer), so compare it only with values from the same numbers of clips and protocol"
    )


# ----------------------------------------------------------------------------------------------------------------------
# Clip -> I3D input.


def retime(frames: np.ndarray, num_frames: int) -> np.ndarray:
    """`num_frames` frames of a clip whose frames are equally long, picked by time (pipeline/frames.py's rule)."""
    if len(frames) == num_frames:
        return frames
    indices, _ = select_frames(np.ones(len(frames)), num_frames)
    return frames[indices]


def _sample_points(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where TF1's resize_bilinear (align_corners=False, no half-pixel centres) samples one axis, in float32 as TF
    computes it: output pixel o reads x = o * (in / out), between pixels floor(x) and floor(x) + 1 (the last pixel
    repeated past the edge), with weight x - floor(x) on the second."""
    x = np.arange(out_size, dtype=np.float32) * (np.float32(in_size) / np.float32(out_size))
    lower = np.floor(x).astype(np.int64)
    return lower, np.minimum(lower + 1, in_size - 1), (x - np.floor(x)).astype(np.float32)


def resize_frames(frames: np.ndarray, center_crop: bool = False, size: int = RESOLUTION) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 [T, size, size, 3], values still 0..255 (module doc: the reference's resize)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise FvdError(f"clips must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    if center_crop:
        height, width = frames.shape[1:3]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        frames = frames[:, top : top + side, left : left + side]
    y0, y1, y_lerp = _sample_points(frames.shape[1], size)
    x0, x1, x_lerp = _sample_points(frames.shape[2], size)
    x_lerp = x_lerp[:, None]

    def along_x(rows: np.ndarray) -> np.ndarray:
        left = np.take(rows, x0, axis=2).astype(np.float32)
        return left + (np.take(rows, x1, axis=2).astype(np.float32) - left) * x_lerp

    # TF's order of operations: interpolate along x in the two rows, then between the rows.
    top, bottom = along_x(np.take(frames, y0, axis=1)), along_x(np.take(frames, y1, axis=1))
    return top + (bottom - top) * y_lerp[:, None, None]


def i3d_input(clip: np.ndarray, protocol: Protocol) -> np.ndarray:
    """One uint8 clip [T, H, W, 3] -> float32 [protocol.frames, 224, 224, 3] in [-1, 1]."""
    resized = resize_frames(retime(np.asarray(clip), protocol.frames), protocol.center_crop)
    return resized * np.float32(2.0 / 255.0) - np.float32(1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Features.


def default_cache_dir() -> Path:
    """$YAGG_CACHE, else $XDG_CACHE_HOME/yagg, else ~/.cache/yagg."""
    if os.environ.get("YAGG_CACHE"):
        return Path(os.environ["YAGG_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "yagg"


class I3DFeatures:
    """Clips -> FVD features [N, 400] under a protocol, `batch_size` clips per I3D call.

    The weights come from eval/i3d_weights.py (converted into `cache_dir` on first use); the forward pass is compiled
    once per batch shape and runs on JAX's default device. While the device works on one batch, the host resizes the
    next.
    """

    def __init__(self, protocol: Protocol, *, cache_dir: str | Path, batch_size: int = 8) -> None:
        import jax

        from eval.i3d import InceptionI3d
        from eval.i3d_weights import VARIABLES_SHA256, load_variables

        if batch_size < 1:
            raise FvdError(f"the I3D batch size must be at least 1, got {batch_size}")
        self.protocol = protocol
        self.batch_size = batch_size
        self.weights_digest = VARIABLES_SHA256
        self._variables = jax.device_put(load_variables(cache_dir))
        model = InceptionI3d()
        self._forward = jax.jit(lambda variables, videos: model.apply(variables, videos))

    def __call__(self, clips: Iterable[np.ndarray], on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """float32 [N, 400] for the clips (uint8 [T, H, W, 3] each, any T and size); `on_batch(clips done so far)`."""
        features: list[np.ndarray] = []
        pending = None  # the batch on the device: its output is fetched after the next batch is prepared
        done = 0
        for batch in _batches((i3d_input(c, self.protocol) for c in clips), self.batch_size):
            running = self._forward(self._variables, batch)  # dispatched asynchronously
            if pending is not None:
                features.append(np.asarray(pending))
                done += len(features[-1])
                if on_batch:
                    on_batch(done)
            pending = running
        if pending is not None:
            features.append(np.asarray(pending))
            if on_batch:
                on_batch(done + len(features[-1]))
        return np.concatenate(features) if features else np.zeros((0, NUM_CLASSES), np.float32)


def _batches(items: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    batch: list[np.ndarray] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)  # a shorter last batch: one more compiled shape, rather than padding clips to run


class ClipSet(typing.Protocol):
    """One side of an FVD: what eval/video_sets.py opens, and what the eval job builds from the validation split."""

    description: str  # e.g. "GIF folder runs/demo/eval/800 (48 files)"
    expected: int  # how many clips it will yield at most (for progress)

    def fingerprint(self) -> str:
        """A hash of the content the clips come from, the same whenever the clips would be the same."""

    def clips(self) -> Iterator[np.ndarray]:
        """The clips, uint8 [T, H, W, 3] each, in a fixed order."""

    def skipped(self) -> dict[str, int]:
        """Why inputs yielded no clip, reason -> count (filled while `clips()` runs)."""


@dataclasses.dataclass
class SetFeatures:
    features: np.ndarray  # float32 [N, 400]
    description: str
    skipped: dict[str, int]
    cached: bool  # read from the feature cache instead of computed
    seconds: float  # time spent computing (0 when cached)

    @property
    def n(self) -> int:
        return len(self.features)


class FeatureCache:
    """FVD features of whole sets, under `DIR/fvd-features/KEY.npz` (NumPy arrays only, read without pickle).

    KEY hashes everything the features depend on: the set's content (`ClipSet.fingerprint`), the protocol's frame
    count, crop and clip limit, the I3D weights' digest and FEATURES_VERSION. So a set's features are computed once
    per protocol, wherever its files live.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = storage.join(os.fspath(directory), "fvd-features")

    @staticmethod
    def key(clip_set: ClipSet, protocol: Protocol, weights_digest: str) -> str:
        settings = {
            "version": FEATURES_VERSION,
            "weights": weights_digest,
            "frames": protocol.frames,
            "center_crop": protocol.center_crop,
            "max_clips": protocol.max_clips,
        }
        return hashlib.sha256(f"{json.dumps(settings, sort_keys=True)}\n{clip_set.fingerprint()}".encode()).hexdigest()

    def load(self, key: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        path = storage.join(self.directory, f"{key}.npz")
        if not storage.is_file(path):
            return None
        with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as stored:
            return stored["features"], json.loads(str(stored["meta"]))

    def save(self, key: str, features: np.ndarray, meta: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, features=features, meta=np.array(json.dumps(meta)))
        storage.write_bytes(storage.join(self.directory, f"{key}.npz"), buffer.getvalue())  # written whole


def set_features(
    clip_set: ClipSet,
    extractor: I3DFeatures,
    cache: FeatureCache | None = None,
    *,
    write_cache: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> SetFeatures:
    """The FVD features of every clip of `clip_set`, from `cache` when it has them (then stored there if computed).

    Raises FvdError when the set yields fewer than 2 clips.
    """
    key = cache.key(clip_set, extractor.protocol, extractor.weights_digest) if cache else None
    if cache and key and (hit := cache.load(key)) is not None:
        features, meta = hit
        return SetFeatures(features, clip_set.description, meta["skipped"], cached=True, seconds=0.0)
    started = time.perf_counter()
    features = extractor(clip_set.clips(), on_batch)
    seconds = time.perf_counter() - started
    skipped = clip_set.skipped()
    if len(features) < 2:
        why = f" (skipped: {_reasons(skipped)})" if skipped else ""
        raise FvdError(f"{clip_set.description} gave {len(features)} clip(s); FVD needs at least 2{why}")
    if cache and key and write_cache:
        cache.save(key, features, {"description": clip_set.description, "skipped": skipped, "n": len(features)})
    return SetFeatures(features, clip_set.description, skipped, cached=False, seconds=seconds)


def _reasons(skipped: dict[str, int]) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))


def fvd(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FVD between two sets of features [N, 400] (float64 Fréchet distance; symmetric in its arguments)."""
    return frechet_distance(features_a, features_b)


class Progress:
    """A progress line on `stream` for one set: a bar on a terminal, otherwise a line every `every_s` seconds."""

    def __init__(self, label: str, total: int, stream: TextIO = sys.stderr, every_s: float = 10.0) -> None:
        self.label, self.total, self.stream, self.every_s = label, max(total, 1), stream, every_s
        self.started = self._last = time.perf_counter()
        self.tty = stream.isatty()
        self.done = 0
        self._written = -1  # `done` at the last line written

    def __call__(self, done: int) -> None:
        self.done = done
        now = time.perf_counter()
        if self.tty or now - self._last >= self.every_s:
            self._last = now
            self._write(now)

    def finish(self) -> None:
        """The last line: clips done (fewer than the total when inputs were skipped) and the overall rate."""
        if self.tty or self._written != self.done:
            self._write(time.perf_counter())
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _write(self, now: float) -> None:
        rate = self.done / max(now - self.started, 1e-9)
        filled = round(20 * min(self.done / self.total, 1.0))
        bar = "#" * filled + "." * (20 - filled)
        line = f"{self.label}: [{bar}] {self.done}/{self.total} clips, {rate:.2f} clips/s"
        self.stream.write(f"\r{line}" if self.tty else f"{line}\n")
        self.stream.flush()
        self._written = self.done
