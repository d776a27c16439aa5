"""Periodic samples during training: GIFs for `config.sampling.prompts` from the EMA parameters.

The prompts are encoded once, at start-up, with the text encoder that embedded the dataset (dataset_info.json names
it), so samples see exactly the kind of embeddings training saw. Every process runs the sampler (the parameters are
sharded over all of them); process 0 writes `WORKDIR/samples/STEP/NN-<prompt>.gif` at the dataset's frame rate and
a strip of each sample's frames to TensorBoard. The starting noise is the same at every step (`sampling.seed`),
so successive samples of a prompt show what training changed, not a new draw.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from model.sampling import guided_predict_fn, sample
from pipeline import records
from train import mesh as mesh_lib
from train.metrics import MetricsLogger

SAMPLES_DIR = "samples"
# Records read to estimate the frame rate of a dataset sampled time-uniformly (no fixed fps).
_RATE_PROBE_RECORDS = 64


def to_uint8(clips: np.ndarray) -> np.ndarray:
    """Model space [-1, 1] -> uint8 pixels as GIFs show them: values outside the range are clipped, and non-finite
    ones (a diverged model) become black or white instead of undefined casts."""
    clips = np.nan_to_num(np.asarray(clips, np.float32), nan=-1.0, posinf=1.0, neginf=-1.0)
    return np.round((np.clip(clips, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def write_gif(path: Path, frames: np.ndarray, fps: float) -> None:
    """uint8 [F, H, W, 3] -> an endlessly looping GIF showing `fps` frames per second."""
    images = [Image.fromarray(frame) for frame in frames]
    # GIF delays are in centiseconds, so 1000 / fps ms is rounded to 10 ms by the format itself.
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000.0 / fps), loop=0)


def frame_strip(frames: np.ndarray) -> np.ndarray:
    """[F, H, W, 3] -> [H, F * W, 3]: the clip's frames side by side, left to right in time."""
    return np.concatenate(list(frames), axis=1)


def dataset_frame_rate(info: dict[str, Any], paths: Sequence[str]) -> float:
    """The dataset's fps; for time-uniform frame sampling, the median rate of the first records' chosen frames."""
    if info.get("fps"):
        return float(info["fps"])
    source = grain.sources.ArrayRecordDataSource(list(paths))
    gaps = []
    for i in range(min(len(source), _RATE_PROBE_RECORDS)):
        times = records.decode(source[i])["frame_times_ms"]
        gaps.extend(np.diff(times).tolist())
    median_ms = float(np.median(gaps)) if gaps else 0.0
    return 1000.0 / median_ms if median_ms > 0 else 10.0  # single-frame clips have no rate; 10 fps shows them


def prompt_slug(prompt: str) -> str:
    """A prompt as a file-name fragment: lower-case letters and digits joined by dashes, at most 60 characters."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "prompt"


class SampleWriter:
    """Call with (step, ema_params) on every process; returns the folder written (process 0) or None."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        info: dict[str, Any],
        paths: Sequence[str],
        model: nn.Module,
        schedule: Any,
        mesh: jax.sharding.Mesh,
        param_shardings: Any,
        workdir: Path,
    ) -> None:
        s = config.sampling
        self.prompts = [str(p) for p in s.prompts]
        if not self.prompts:
            raise ValueError("sample_every > 0 but config.sampling.prompts is empty")
        self.fps = dataset_frame_rate(info, paths)
        self.workdir = workdir
        # Imported here: pipeline.embed brings in Beam, which only runs that sample need.
        from pipeline.embed import load_text_encoder

        encoder = load_text_encoder(info["text_encoder"]["name"])
        # Constants of the jitted sampler: the same on every process, a few hundred KB at most.
        encoded = encoder.encode(self.prompts)
        condition = {f"text_{k}": np.asarray(encoded[k]) for k in ("pooled", "tokens", "mask")}
        d = config.data
        shape = (len(self.prompts), int(d.frames), int(d.size), int(d.size), 3)
        noise_key = jax.random.PRNGKey(int(s.seed))

        def draw(params: Any) -> jax.Array:
            predict = guided_predict_fn(model.apply, params, condition, float(s.guidance_scale))
            return sample(
                predict,
                shape,
                noise_key,
                schedule=schedule,
                method=s.method,
                num_steps=int(s.num_steps),
                eta=float(s.eta),
            )

        # Replicated output: every process holds all samples, so process 0 can write them without a gather.
        self._draw = jax.jit(draw, in_shardings=(param_shardings,), out_shardings=mesh_lib.replicated(mesh))

    def __call__(self, step: int, ema_params: Any, logger: MetricsLogger) -> Path | None:
        clips = to_uint8(np.asarray(self._draw(ema_params)))
        if jax.process_index() != 0:
            return None
        out = self.workdir / SAMPLES_DIR / str(step)
        out.mkdir(parents=True, exist_ok=True)
        for i, (prompt, clip) in enumerate(zip(self.prompts, clips, strict=True)):
            write_gif(out / f"{i:02d}-{prompt_slug(prompt)}.gif", clip, self.fps)
        logger.write_images(step, {f"samples/{i:02d}": frame_strip(clip)[None] for i, clip in enumerate(clips)})
        return out
