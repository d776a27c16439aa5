"""Periodic samples during training: GIFs for `config.sampling.prompts` from the EMA parameters.

The clips come from the inference core (inference/generator.py) with the run's sampling settings, every prompt from
seed `sampling.seed`, so the same starting noise at every step: successive samples of a prompt show what training
changed, not a new draw, and `yagg sample --checkpoint WORKDIR/checkpoints/STEP --seed SEED PROMPT` writes the same
GIF, byte for byte, from that step's checkpoint. Every process draws (the parameters are sharded over all of them);
process 0 writes `WORKDIR/samples/STEP/NN-<prompt>.gif`, `samples.json` ({"file", "prompt", "seed"} per GIF) and a
strip of each sample's frames to TensorBoard.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections

from contracts import media, storage
from contracts.conditioning import load_conditioner
from contracts.dataset import DataFacts
from inference.generator import Generator, Request
from train.metrics import MetricsLogger

SAMPLES_DIR = "samples"
SAMPLES_FILE = "samples.json"


class SampleWriter:
    """Call with (step, ema_params, logger) on every process; returns the folder written (process 0) or None."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        facts: DataFacts,
        mesh: jax.sharding.Mesh,
        param_shardings: Any,
        workdir: str,
    ) -> None:
        self.prompts = [str(p) for p in config.sampling.prompts]
        if not self.prompts:
            raise ValueError("sample_every > 0 but config.sampling.prompts is empty")
        self.seed = int(config.sampling.seed)
        self.workdir = workdir
        self._generator = Generator(
            config=config,
            facts=facts,
            conditioner=load_conditioner(facts.text_encoder.name),
            params=None,
            step=0,
            mesh=mesh,
            param_shardings=param_shardings,
        )
        # Fails now, not at the first sample, on a prompt the text encoder cannot read or a bad sampling setting.
        d = self._generator.defaults
        self._generator.check(
            [Request(p, self.seed, d.guidance, d.eta, method=d.method) for p in self.prompts], d.steps
        )

    def __call__(self, step: int, ema_params: Any, logger: MetricsLogger) -> str | None:
        clips = self._generator.with_params(ema_params, step).generate(self.prompts, [self.seed] * len(self.prompts))
        if jax.process_index() != 0:
            return None
        out = storage.join(self.workdir, SAMPLES_DIR, str(step))
        written = []
        for i, (prompt, pixels) in enumerate(zip(self.prompts, clips.pixels, strict=True)):
            name = f"{i:02d}-{media.prompt_slug(prompt)}.gif"
            media.write_gif(storage.join(out, name), pixels, clips.fps)
            written.append({"file": name, "prompt": prompt, "seed": self.seed})
        storage.write_text(storage.join(out, SAMPLES_FILE), json.dumps(written, indent=1) + "\n")
        strips = {f"samples/{i:02d}": media.frame_strip(pixels)[None] for i, pixels in enumerate(clips.pixels)}
        logger.write_images(step, strips)
        return out
