"""The inference core: parameters and prompts in, clips out. `yagg sample`, `yagg eval`, training's periodic samples
and the HTTP server all draw their clips here, so a prompt, seed and settings give the same clip wherever it is drawn.

    generator = Generator.load("runs/demo")       # a workdir's newest checkpoint, one checkpoint, or an export
    clips = generator.generate(["a red circle moving left"], seeds=[0])
    media.write_gif("red.gif", clips.pixels[0], clips.fps)

A clip depends on its prompt, negative prompt, seed, settings (steps, guidance, method, eta) and the parameters,
never on what else is drawn with it:
  * noise: clip i starts from PRNGKey(seed_i) alone (split into the starting noise's key and the key each step's
    noise is folded from, model/sampling.py), one vmapped lane per clip;
  * text: each prompt is encoded on its own (contracts/conditioning.py), never in a batch of other prompts;
  * arithmetic: XLA's result for one row of a batch changes in its last bits with the batch's size (about 1e-5 on
    the CPU between batches of 1 and 8), enough to move rounded GIF pixels. So every clip is computed in a call of
    exactly `lanes_per_device` clips per device (config `sampling.lanes_per_device`), padded with repeats of the
    last clip: the only compiled width there is. Lanes never interact (no batch statistics at inference), so what the
    other lanes hold changes nothing. As with any XLA program, results are reproduced on the same kind of device and
    number of devices.
The denoising runs as a Python loop over one compiled step whose step index and timesteps are array inputs: one
compilation serves every step count, progress can be reported step by step, and a call can be cancelled between
steps. Guidance, eta and the method (DDIM or DDPM) are per-lane inputs, so clips with different values share a call;
clips share a call when their step counts agree.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from contracts import checkpoint as checkpoint_lib
from contracts import export as export_lib
from contracts import media, storage
from contracts.conditioning import CaptionTooLong, TextConditioner, load_conditioner, model_condition
from contracts.dataset import DEFAULT_FPS, DataError, DataFacts, TextEncoderInfo, read_dataset_info
from model.build import build_schedule, build_unet, params_initializer
from model.diffusion import CONDITION_KEYS, Schedule
from model.sampling import (
    METHODS,
    denoise_step,
    guided_predict_fn,
    initial_noise,
    previous_timesteps,
    sampling_timesteps,
    split_key,
)
from parallel import mesh as mesh_lib

log = logging.getLogger(__name__)

DEFAULT_LANES_PER_DEVICE = 8  # for configs written before sampling.lanes_per_device existed
MAX_SEED = 2**32 - 1  # seeds are uint32 lane inputs
_TEXT_CACHE_SIZE = 4096  # prompts whose condition arrays are kept (a server sees the same prompts again and again)


class GenerateError(ValueError):
    """Something asked of the generator cannot be done: a bad setting, a prompt too long, no usable model."""


class Cancelled(Exception):
    """The caller's `cancelled()` said stop; raised between denoising steps."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One clip to draw. Requests with the same step count can share a call."""

    prompt: str
    seed: int
    guidance: float
    eta: float = 0.0
    negative_prompt: str | None = None
    method: str = "ddim"


@dataclasses.dataclass(frozen=True)
class Clips:
    """Drawn clips: `raw` in model space as the sampler left it (unclipped, float32 [N, F, S, S, 3])."""

    raw: np.ndarray
    fps: float  # the frame rate to show them at: the training data's
    step: int  # the training step of the parameters

    @property
    def pixels(self) -> np.ndarray:
        """uint8 [N, F, S, S, 3], as GIFs show them (contracts/media.py)."""
        return media.to_uint8(self.raw)


@dataclasses.dataclass(frozen=True)
class Defaults:
    """Settings used where a caller gives none: the model config's `sampling` section."""

    steps: int
    guidance: float
    method: str
    eta: float

    @classmethod
    def of(cls, config: ml_collections.ConfigDict) -> Defaults:
        s = config.sampling
        return cls(steps=int(s.num_steps), guidance=float(s.guidance_scale), method=str(s.method), eta=float(s.eta))


class Generator:
    """Draws clips from one set of parameters; see the module doc. Construct with `load` (from files) or, in a
    process that already holds parameters (training), directly."""

    def __init__(
        self,
        *,
        config: ml_collections.ConfigDict,
        facts: DataFacts,
        conditioner: TextConditioner,
        params: Any,
        step: int,
        mesh: jax.sharding.Mesh,
        param_shardings: Any,
        lanes_per_device: int | None = None,
    ) -> None:
        try:
            self.model, self.schedule = build_unet(config), build_schedule(config)
        except ValueError as e:  # build_* name the config field that is wrong
            raise GenerateError(str(e)) from e
        wrong = conditioner.info.mismatches(config.data)
        if wrong:
            raise GenerateError(
                f"the text encoder does not fit the model ({'; '.join(wrong)}): use the CLIP the training data was "
                "embedded with"
            )
        self.config = config
        self.facts = facts
        self.conditioner = conditioner
        self.params = params
        self.step = step
        self.defaults = Defaults.of(config)
        lanes = lanes_per_device or int(config.sampling.get("lanes_per_device", DEFAULT_LANES_PER_DEVICE))
        if lanes < 1:
            raise GenerateError(f"sampling.lanes_per_device must be at least 1, got {lanes}")
        self.width = lanes * mesh.devices.size  # clips per call, over all devices
        self.mesh = mesh
        self._compiled = _Compiled(self.model, self.schedule, mesh, param_shardings, (facts.frames, facts.size))
        self._text = _TextCache(conditioner)

    # ------------------------------------------------------------------------------------------------------------------
    # Loading.

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        kind: str | None = None,
        step: int | None = None,
        raw_params: bool = False,
        text_encoder: str | None = None,
        mesh: jax.sharding.Mesh | None = None,
        lanes_per_device: int | None = None,
    ) -> Generator:
        """A generator for `source`, of `kind` "model" (an exported model folder), "checkpoint" (one checkpoint
        folder WORKDIR/checkpoints/STEP) or "workdir" (a training workdir: its newest finished checkpoint, or
        checkpoint `step`); None tells them apart by what the folder holds.

        `raw_params`: the trained parameters instead of their EMA (checkpoints only). `text_encoder` overrides the
        CLIP named by the dataset or export (needed only when that one is not on this machine). `mesh`: where the
        parameters go (default: every local device, parameters replicated). `lanes_per_device` overrides the model
        config's (clips then differ in their last bits from those drawn at the config's width). GenerateError for
        anything the user can fix.
        """
        try:
            source = storage.check(os.fspath(source).rstrip("/"), "the model")
        except storage.PathError as e:
            raise GenerateError(str(e)) from e
        path = storage.path(source)
        is_checkpoint = path.name.isdigit() and path.parent.name == checkpoint_lib.CHECKPOINT_DIR
        if kind is None:
            kind = "model" if export_lib.is_export(source) else "checkpoint" if is_checkpoint else "workdir"
        try:
            if kind == "model":
                if raw_params or step is not None:
                    raise GenerateError("an exported model holds one step's EMA parameters: no step or raw parameters")
                return cls._from_export(export_lib.read_export(source), text_encoder, mesh, lanes_per_device)
            if kind == "checkpoint":
                reader, found = checkpoint_lib.find_checkpoint(checkpoint=source)
            else:
                reader, found = checkpoint_lib.find_checkpoint(workdir=source)
                if step is not None:
                    if step not in reader.steps():
                        raise GenerateError(f"no finished checkpoint of step {step} in {reader.directory}")
                    found = step
            return cls._from_checkpoint(reader, found, raw_params, text_encoder, mesh, lanes_per_device)
        except (checkpoint_lib.ReadError, export_lib.ExportError) as e:
            raise GenerateError(str(e)) from e

    @classmethod
    def _from_checkpoint(
        cls,
        reader: checkpoint_lib.CheckpointReader,
        step: int,
        raw_params: bool,
        text_encoder: str | None,
        mesh: jax.sharding.Mesh | None,
        lanes_per_device: int | None,
    ) -> Generator:
        config = reader.config(step)
        facts = training_data_facts(config)
        mesh, abstract, shardings = placement(config, mesh)
        params = reader.params(step, abstract, raw=raw_params)
        return cls(
            config=config,
            facts=facts,
            conditioner=_load_conditioner(text_encoder or facts.text_encoder.name),
            params=params,
            step=step,
            mesh=mesh,
            param_shardings=shardings,
            lanes_per_device=lanes_per_device,
        )

    @classmethod
    def _from_export(
        cls,
        exported: export_lib.ExportedModel,
        text_encoder: str | None,
        mesh: jax.sharding.Mesh | None,
        lanes_per_device: int | None,
    ) -> Generator:
        mesh, abstract, shardings = placement(exported.config, mesh)
        return cls(
            config=exported.config,
            facts=exported.data,
            conditioner=_load_conditioner(text_encoder or exported.text_encoder),
            params=exported.params(abstract),
            step=exported.step,
            mesh=mesh,
            param_shardings=shardings,
            lanes_per_device=lanes_per_device,
        )

    def with_params(self, params: Any, step: int) -> Generator:
        """The same generator (compiled functions and text cache shared) over other parameters of the same model."""
        other = object.__new__(Generator)
        other.__dict__.update(self.__dict__)
        other.params, other.step = params, step
        return other

    # ------------------------------------------------------------------------------------------------------------------
    # Drawing.

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        steps: int | None = None,
        guidance: float | None = None,
        method: str | None = None,
        eta: float | None = None,
        negative_prompts: Sequence[str | None] | None = None,
        progress: Callable[[int, int], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Clips:
        """Clip i for prompts[i] from seeds[i]; settings left None come from the model's config (`defaults`).

        A negative prompt (one per prompt, None for none) takes the place of the null condition in guidance: the
        sample is pushed away from it instead of from "no text". `progress(done, total)` is called after every
        denoising step once that step has finished; `cancelled()` is asked between steps (Cancelled if true).
        """
        if len(prompts) != len(seeds):
            raise GenerateError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
        if negative_prompts is not None and len(negative_prompts) != len(prompts):
            raise GenerateError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
        d = self.defaults
        g = d.guidance if guidance is None else guidance
        e = d.eta if eta is None else eta
        negatives = negative_prompts or [None] * len(prompts)
        requests = [
            Request(prompt=p, seed=int(s), guidance=g, eta=e, negative_prompt=n, method=method or d.method)
            for p, s, n in zip(prompts, seeds, negatives, strict=True)
        ]
        return self.run(requests, steps=d.steps if steps is None else steps, progress=progress, cancelled=cancelled)

    def check(self, requests: Sequence[Request], steps: int) -> None:
        """GenerateError for the first request or setting that cannot be drawn (before any work starts)."""
        if not 1 <= steps <= self.schedule.num_timesteps:
            raise GenerateError(f"steps must be in [1, {self.schedule.num_timesteps}], got {steps}")
        for r in requests:
            if r.method not in METHODS:
                raise GenerateError(f"unknown sampling method {r.method!r}; choose one of {METHODS}")
            if not 0 <= r.seed <= MAX_SEED:
                raise GenerateError(f"seed must be in [0, {MAX_SEED}], got {r.seed}")
            if not np.isfinite(r.guidance):
                raise GenerateError(f"guidance must be a finite number, got {r.guidance}")
            if not (np.isfinite(r.eta) and r.eta >= 0):
                raise GenerateError(f"eta must be >= 0, got {r.eta}")
        try:
            self._text.prefetch(
                [r.prompt for r in requests] + [r.negative_prompt for r in requests if r.negative_prompt]
            )
        except CaptionTooLong as e:
            raise GenerateError(str(e)) from e

    def run(
        self,
        requests: Sequence[Request],
        *,
        steps: int,
        progress: Callable[[int, int], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Clips:
        """Draws one clip per request in calls of `width` lanes (see the module doc); the lower-level `generate`."""
        if not requests:
            raise GenerateError("nothing to generate: give at least one prompt")
        self.check(requests, steps)
        timesteps = sampling_timesteps(self.schedule.num_timesteps, steps)
        previous = previous_timesteps(timesteps)
        calls = range(0, len(requests), self.width)
        out = []
        for k, start in enumerate(calls):
            lanes = [requests[min(i, len(requests) - 1)] for i in range(start, start + self.width)]

            def report(done: int, k: int = k) -> None:
                if progress is not None:
                    progress(k * steps + done, len(calls) * steps)

            x = self._draw(lanes, timesteps, previous, report if progress else None, cancelled)
            out.append(x[: min(self.width, len(requests) - start)])
        return Clips(raw=np.concatenate(out), fps=self.facts.fps, step=self.step)

    def _draw(
        self,
        lanes: Sequence[Request],
        timesteps: np.ndarray,
        previous: np.ndarray,
        progress: Callable[[int], None] | None,
        cancelled: Callable[[], bool] | None,
    ) -> np.ndarray:
        c = self._compiled
        place = c.replicate
        cond = place(_stack([self._text.get(r.prompt) for r in lanes]))
        null = self.conditioner.null(1)
        uncond = place(_stack([self._text.get(r.negative_prompt) if r.negative_prompt else null for r in lanes]))
        guidance = place(np.array([r.guidance for r in lanes], np.float32))
        eta = place(np.array([r.eta for r in lanes], np.float32))
        method = place(np.array([METHODS.index(r.method) for r in lanes], np.int32))
        x, noise_keys = c.init(place(np.array([r.seed for r in lanes], np.uint32)))
        for i, (t, t_prev) in enumerate(zip(timesteps, previous, strict=True)):
            if cancelled is not None and cancelled():
                raise Cancelled(f"cancelled before step {i + 1} of {len(timesteps)}")
            x = c.step(self.params, x, noise_keys, cond, uncond, guidance, eta, method, np.int32(i), t, t_prev)
            if progress is not None:
                x.block_until_ready()
                progress(i + 1)
        return np.asarray(c.gather(x))

    def warm_up(self) -> None:
        """Compiles everything a call needs (the text tower at every caption-length bucket, the initial noise, the
        step, the gather) by drawing one clip of one step, so no later request waits for a compilation: the step
        count, method, guidance, eta and seeds are inputs of those programs, not part of them."""
        self.conditioner.warm_up()
        self.run([Request(prompt="warm-up", seed=0, guidance=self.defaults.guidance)], steps=1)


def _stack(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([row[key] for row in rows]) for key in CONDITION_KEYS}


class _TextCache:
    """Condition arrays per prompt, each prompt encoded alone (a batch's other prompts must not change its numbers),
    the most recent `_TEXT_CACHE_SIZE` kept."""

    def __init__(self, conditioner: TextConditioner) -> None:
        self._conditioner = conditioner
        self._cache: collections.OrderedDict[str, dict[str, np.ndarray]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, prompt: str) -> dict[str, np.ndarray]:
        with self._lock:
            if prompt in self._cache:
                self._cache.move_to_end(prompt)
                return self._cache[prompt]
        arrays = self._conditioner.encode([prompt])
        with self._lock:
            self._cache[prompt] = arrays
            while len(self._cache) > _TEXT_CACHE_SIZE:
                self._cache.popitem(last=False)
        return arrays

    def prefetch(self, prompts: Sequence[str]) -> None:
        for prompt in dict.fromkeys(prompts):
            self.get(prompt)


class _Compiled:
    """The jitted functions of one model on one mesh: lanes split over every device, parameters in their shardings."""

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule,
        mesh: jax.sharding.Mesh,
        param_shardings: Any,
        clip: tuple[int, int],
    ) -> None:
        frames, size = clip
        lane_shape = (1, frames, size, size, 3)
        replicated, lanes = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
        self.replicate = lambda value: jax.device_put(value, replicated)

        def init(seeds: jax.Array) -> tuple[jax.Array, jax.Array]:
            def one(seed: jax.Array) -> tuple[jax.Array, jax.Array]:
                init_key, noise_key = split_key(jax.random.PRNGKey(seed))
                return initial_noise(init_key, lane_shape)[0], noise_key

            return jax.vmap(one)(seeds)

        self.init = jax.jit(init, in_shardings=replicated, out_shardings=(lanes, lanes))

        def lane(params, x, noise_key, cond, uncond, guidance, eta, method, i, t, t_prev):
            single = {k: v[None] for k, v in model_condition(cond).items()}
            null = {k: v[None] for k, v in model_condition(uncond).items()}
            predict = guided_predict_fn(model.apply, params, single, guidance, null=null)
            x = denoise_step(predict, x[None], i, t, t_prev, noise_key, schedule=schedule, method=method, eta=eta)
            return x[0]

        batched = jax.vmap(lane, in_axes=(None, 0, 0, 0, 0, 0, 0, 0, None, None, None))

        def step(params, x, noise_key, cond, uncond, guidance, eta, method, i, t, t_prev):
            # The small per-lane inputs arrive replicated (host arrays); the lanes are split over the devices.
            shard = lambda tree: jax.lax.with_sharding_constraint(tree, lanes)  # noqa: E731
            per_lane = [shard(v) for v in (cond, uncond, guidance, eta, method)]
            return batched(params, x, noise_key, *per_lane, i, t, t_prev)

        self.step = jax.jit(
            step,
            # x and the noise keys come from `init`, split over the devices; the rest are host arrays, replicated.
            in_shardings=(param_shardings, lanes, lanes, *[replicated] * 5, None, None, None),
            out_shardings=lanes,
            donate_argnums=1,
        )
        # Replicated clips: every process holds all of them, so process 0 can write them without a gather of its own.
        self.gather = jax.jit(lambda x: x, out_shardings=replicated)


def placement(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None) -> tuple[jax.sharding.Mesh, Any, Any]:
    """(mesh, abstract parameters with shardings, shardings): the given mesh with the config's sharding rules, or
    every local device with the parameters replicated (sampling needs no FSDP, and the training mesh may not exist)."""
    if mesh is None:
        mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))
    try:
        model = build_unet(config)
    except ValueError as e:
        raise GenerateError(str(e)) from e
    rules = mesh_lib.logical_rules(config.sharding_rules)
    abstract, shardings = mesh_lib.plan(params_initializer(model, config), mesh, rules)
    return mesh, abstract, shardings


def training_data_facts(config: ml_collections.ConfigDict) -> DataFacts:
    """The facts of the dataset at the config's `data.path`; where that folder is not on this machine, the config's
    own data section (its text encoder, its fps or DEFAULT_FPS), with a warning."""
    d = config.data
    try:
        return DataFacts.of_dataset(str(d.path), read_dataset_info(storage.check(str(d.path), "data.path")))
    except (DataError, storage.PathError) as e:
        fps = float(d.fps) if d.get("fps") else DEFAULT_FPS
        log.warning("%s; using the config's data.text_encoder %r and %.3g fps", e, str(d.text_encoder), fps)
        return DataFacts(
            frames=int(d.frames),
            size=int(d.size),
            fps=fps,
            text_encoder=TextEncoderInfo(
                name=str(d.text_encoder),
                max_length=int(d.text_max_length),
                pooled_dim=int(d.text_embed_dim),
                token_dim=int(d.text_token_dim),
            ),
        )


def _load_conditioner(name: str) -> TextConditioner:
    try:
        return load_conditioner(name)
    except (OSError, ValueError) as e:
        raise GenerateError(
            f"cannot load the text encoder {name!r} ({e}): it must be the CLIP that embedded the training data, "
            "available on this machine (or pass another copy of it)"
        ) from e
