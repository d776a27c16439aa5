"""From a checkpoint and prompts to clips and GIFs: `yagg sample`, and the pieces the eval job shares with it.

    yagg sample --workdir runs/demo "a red circle moving left" --out red-left.gif --num 4 --scale 8

What a sample is made of:
  * parameters: the EMA parameters of `WORKDIR/checkpoints/STEP/` (`--raw-params`: the trained ones), restored
    without the optimizer state; only finished checkpoints count (Orbax writes `commit_success.txt` before it renames
    the temporary folder, and that file is the only mark of completion on filesystems without atomic rename);
  * the model: built from the config stored in the checkpoint itself, so it always matches the parameters;
  * the text: embedded by the CLIP that embedded the training data (dataset_info.json of the checkpoint's
    `data.path`; the config's `data.text_encoder` when that folder is not on this machine; `--text-encoder` wins);
  * the noise: sample i starts from `PRNGKey(seed_i)` alone and is drawn in a batch of its own under `vmap`, so a
    clip depends on its prompt and seed only, never on the other clips sampled with it. `yagg sample PROMPT --seed S`
    therefore reproduces the eval job's sample of PROMPT with seed S (same method, steps and guidance);
  * the frame rate: the dataset's (dataset_info's fps; for time-uniform frame sampling, the median spacing of the
    frames preprocessing picked: train/samples.py::dataset_frame_rate); without the dataset, the config's data.fps,
    else DEFAULT_FPS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from model.build import build_schedule, build_unet, example_inputs
from model.diffusion import CONDITION_KEYS, Schedule
from model.sampling import METHODS, guided_predict_fn, sample
from train import mesh as mesh_lib
from train.checkpoint import CHECKPOINT_DIR
from train.input import DataError, read_dataset_info, shard_paths
from train.samples import dataset_frame_rate, to_uint8, write_gif

log = logging.getLogger(__name__)

DEFAULT_FPS = 8.0  # GIF frame rate when the dataset (and so its frame spacing) is not at hand
# Orbax writes this into a checkpoint folder as the last step of a save (before the rename, where there is one).
COMMIT_FILE = "commit_success.txt"


class SampleError(ValueError):
    """Something the user asked for cannot be done: a missing checkpoint, a prompt too long, a mismatched config."""


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints.


class CheckpointDeletedError(SampleError):
    """A checkpoint vanished while it was being read (training's retention deleted it)."""


class CheckpointReader:
    """Read-only access to the finished checkpoints of `WORKDIR/checkpoints/` while training may still write there.

    The Orbax manager is opened read-only and never cleans temporary folders: those belong to the trainer.
    """

    def __init__(self, workdir: str | Path) -> None:
        self.directory = Path(workdir) / CHECKPOINT_DIR
        self._manager = ocp.CheckpointManager(
            self.directory.absolute(),
            options=ocp.CheckpointManagerOptions(read_only=True),
            # Every item the trainer writes (train/checkpoint.py) has a handler, even those never read here (the rng
            # and the data position): Orbax warns about each item it finds without one, on every restore.
            item_handlers={
                "state": ocp.PyTreeCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
                "rng": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
            },
        )

    def steps(self) -> list[int]:
        """The finished checkpoints' steps, ascending, as of now."""
        self._manager.reload()
        return sorted(s for s in self._manager.all_steps() if self.is_finished(s))

    def is_finished(self, step: int) -> bool:
        return (self.directory / str(step) / COMMIT_FILE).is_file()

    def config(self, step: int) -> ml_collections.ConfigDict:
        """The config of the run that wrote checkpoint `step` (the checkpoint's `config` item)."""
        with self._deletion_is_reported(step):
            stored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        return ml_collections.ConfigDict(stored)

    def params(self, step: int, abstract: Any, *, raw: bool = False) -> Any:
        """The EMA (or, with `raw`, the trained) parameters of checkpoint `step`, restored into `abstract`'s shardings.

        `abstract` is the model's parameter tree of ShapeDtypeStructs; a checkpoint whose arrays differ from it in
        names or shapes raises SampleError listing the differences (Orbax itself would restore them silently).
        """
        name = "params" if raw else "ema_params"
        with self._deletion_is_reported(step):
            stored = self._manager.item_metadata(step)["state"].tree[name]
            _check_same_arrays(stored, abstract, where=self.directory / str(step))
            item = {name: abstract}
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
                    )
                ),
            )
        return restored["state"][name]

    @contextlib.contextmanager
    def _deletion_is_reported(self, step: int) -> Iterator[None]:
        try:
            yield
        except SampleError:
            raise
        # Broad on purpose: a folder deleted mid-read fails in many ways (missing file, truncated metadata). If the
        # folder is gone, retention won the race; if it is still there, the error is real and propagates.
        except Exception as e:
            if self.is_finished(step):
                raise
            raise CheckpointDeletedError(f"checkpoint {self.directory / str(step)} was deleted while being read") from e


def _check_same_arrays(stored: Any, abstract: Any, where: Path) -> None:
    def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
        return {
            jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        }

    ours, theirs = shapes(abstract), shapes(stored)
    problems = [f"{k}: missing from the checkpoint" for k in sorted(ours.keys() - theirs.keys())]
    problems += [f"{k}: in the checkpoint, not in the model" for k in sorted(theirs.keys() - ours.keys())]
    problems += [
        f"{k}: {theirs[k]} in the checkpoint, {ours[k]} in the model"
        for k in sorted(ours.keys() & theirs.keys())
        if ours[k] != theirs[k]
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise SampleError(
            f"the parameters in {where} do not fit the model its config describes ({shown}). The checkpoint was "
            "written by a different model definition: sample with the yagg version that trained it"
        )


def find_checkpoint(
    workdir: str | Path | None = None, checkpoint: str | Path | None = None
) -> tuple[CheckpointReader, int]:
    """Reader and step for `--workdir DIR` (its newest finished checkpoint) or `--checkpoint DIR/checkpoints/STEP`."""
    if (workdir is None) == (checkpoint is None):
        raise SampleError("give exactly one of --workdir (newest checkpoint) and --checkpoint (a given one)")
    if checkpoint is not None:
        path = Path(checkpoint)
        if not (path.name.isdigit() and path.parent.name == CHECKPOINT_DIR):
            raise SampleError(f"--checkpoint {path}: expected a step folder WORKDIR/{CHECKPOINT_DIR}/STEP")
        reader, step = CheckpointReader(path.parent.parent), int(path.name)
        if not reader.is_finished(step):
            raise SampleError(f"--checkpoint {path} is not a finished checkpoint (no {COMMIT_FILE} in it)")
        return reader, step
    reader = CheckpointReader(workdir)
    steps = reader.steps()
    if not steps:
        raise SampleError(
            f"no finished checkpoint in {reader.directory}: train first (yagg train --workdir {workdir} ...) or "
            f"pass --checkpoint WORKDIR/{CHECKPOINT_DIR}/STEP"
        )
    return reader, steps[-1]


# ----------------------------------------------------------------------------------------------------------------------
# Config, model and parameters.

# Fields that decide what a checkpoint's parameters mean, beyond their shapes (which are checked separately).
# Computation-only fields (model.dtype, model.remat, model.dropout) may differ between training and evaluation.
MATCHING_FIELDS = (
    "model.channels",
    "model.channel_mults",
    "model.num_res_blocks",
    "model.attention_resolutions",
    "model.head_dim",
    "model.max_relative_distance",
    "model.conv_mode",
    "model.norm_groups",
    "model.param_dtype",
    "diffusion.schedule",
    "diffusion.num_timesteps",
    "diffusion.prediction_type",
    "data.frames",
    "data.size",
    "data.text_embed_dim",
    "data.text_token_dim",
    "data.text_max_length",
)


def _field(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    # The stored config went through JSON: tuples came back as lists.
    return list(node) if isinstance(node, tuple | list) else node


def check_config_matches(config: ml_collections.ConfigDict, trained: ml_collections.ConfigDict, where: Path) -> None:
    """Raises SampleError naming every field of MATCHING_FIELDS on which `config` and the checkpoint's config differ."""
    wrong = [
        f"{name}={_field(config, name)!r} but the checkpoint has {_field(trained, name)!r}"
        for name in MATCHING_FIELDS
        if _field(config, name) != _field(trained, name)
    ]
    if wrong:
        raise SampleError(
            f"the config does not match checkpoint {where}: {'; '.join(wrong)}. Use the config the run was trained "
            "with, or override these fields (--config.model.channels=...)"
        )


def build_model(config: ml_collections.ConfigDict) -> tuple[nn.Module, Schedule]:
    try:
        return build_unet(config), build_schedule(config)
    except ValueError as e:  # build_* name the config field that is wrong
        raise SampleError(str(e)) from e


def abstract_params(
    model: nn.Module, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]]
) -> tuple[Any, Any]:
    """(abstract parameter tree with shardings, the shardings), from shapes only: nothing is initialised."""
    inputs = example_inputs(config, batch_size=1)

    def init(key: jax.Array) -> Any:
        zeros = {name: jnp.zeros(spec.shape, spec.dtype) for name, spec in inputs.items()}
        return model.init({"params": key}, **zeros, train=False)["params"]

    boxed = jax.eval_shape(init, jax.ShapeDtypeStruct((2,), jnp.uint32))
    shardings = mesh_lib.logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
        nn.unbox(boxed),
        shardings,
    )
    return abstract, shardings


# ----------------------------------------------------------------------------------------------------------------------
# Text and frame rate.


@dataclasses.dataclass(frozen=True)
class DataFacts:
    """What sampling needs to know about the training data."""

    text_encoder: str  # the CLIP that embedded the captions
    fps: float  # the GIF frame rate


def data_facts(config: ml_collections.ConfigDict, text_encoder: str | None = None) -> DataFacts:
    """The text encoder and frame rate of the dataset at `config.data.path` (fallbacks in the module docstring)."""
    try:
        info = read_dataset_info(config.data.path)
        fps = dataset_frame_rate(info, shard_paths(config.data.path, info))
        name = info["text_encoder"]["name"]
    except DataError as e:
        log.warning(
            "%s; using the config's data.text_encoder %r and %.3g fps", e, str(config.data.text_encoder), DEFAULT_FPS
        )
        name = str(config.data.text_encoder)
        fps = float(config.data.fps) if config.data.fps else DEFAULT_FPS
    return DataFacts(text_encoder=text_encoder or name, fps=fps)


def load_text_encoder(name: str) -> Any:
    """The CLIP text tower `name`, with loading failures reported as SampleError."""
    from pipeline.embed import load_text_encoder as load  # Beam's filesystems, for gs:// folders

    try:
        return load(name)
    except (OSError, ValueError) as e:
        raise SampleError(
            f"cannot load the text encoder {name!r} ({e}): it must be the CLIP that embedded the training data, "
            "available on this machine"
        ) from e


def encode_prompts(encoder: Any, prompts: Sequence[str], data: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """The condition arrays the U-Net takes for `prompts`: text_pooled f32, text_tokens f32, text_mask bool."""
    dims = [
        ("data.text_embed_dim", data.text_embed_dim, encoder.pooled_dim),
        ("data.text_token_dim", data.text_token_dim, encoder.token_dim),
        ("data.text_max_length", data.text_max_length, encoder.max_length),
    ]
    wrong = [f"{name}={ours} but {encoder.name!r} gives {theirs}" for name, ours, theirs in dims if ours != theirs]
    if wrong:
        raise SampleError(
            f"the text encoder does not fit the model ({'; '.join(wrong)}): use the CLIP the training data was "
            "embedded with (--text-encoder)"
        )
    try:
        encoded = encoder.encode(list(prompts))
    except ValueError as e:  # names the prompt that is too long for the encoder
        raise SampleError(str(e)) from e
    return {
        "text_pooled": np.asarray(encoded["pooled"], np.float32),
        "text_tokens": np.asarray(encoded["tokens"], np.float32),
        "text_mask": np.asarray(encoded["mask"]).astype(bool),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Sampling.


class Sampler:
    """Draws clips for (condition, seed) pairs with classifier-free guidance; see the module docstring on noise.

    Calls are jitted once: clips are drawn `batch_size` at a time (a short last batch is padded), each one under
    `vmap` with its own key, so the result of a clip does not depend on `batch_size` (up to float rounding).
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule,
        *,
        frames: int,
        size: int,
        method: str,
        num_steps: int,
        guidance_scale: float,
        eta: float,
        batch_size: int,
        mesh: jax.sharding.Mesh,
        param_shardings: Any,
    ) -> None:
        if method not in METHODS:
            raise SampleError(f"unknown sampling method {method!r}; choose one of {METHODS}")
        if not 1 <= num_steps <= schedule.num_timesteps:
            raise SampleError(f"sampling steps must be in [1, {schedule.num_timesteps}], got {num_steps}")
        if batch_size < 1:
            raise SampleError(f"the sampling batch size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        clip_shape = (1, frames, size, size, 3)

        def one(params: Any, key: jax.Array, condition: dict[str, jax.Array]) -> jax.Array:
            single = {k: v[None] for k, v in condition.items()}
            predict = guided_predict_fn(model.apply, params, single, guidance_scale)
            x0 = sample(predict, clip_shape, key, schedule=schedule, method=method, num_steps=num_steps, eta=eta)
            return x0[0]

        draw = jax.vmap(one, in_axes=(None, 0, 0))
        replicated = mesh_lib.replicated(mesh)
        # Replicated outputs: every process holds all clips, so process 0 can write them without a gather.
        self._draw = jax.jit(draw, in_shardings=(param_shardings, replicated, replicated), out_shardings=replicated)

    def __call__(self, params: Any, condition: Mapping[str, np.ndarray], seeds: Sequence[int]) -> np.ndarray:
        """float32 clips [N, F, S, S, 3] in model space (about [-1, 1], unclipped) for N = len(seeds) conditions."""
        count = len(seeds)
        assert all(len(condition[k]) == count for k in CONDITION_KEYS), "one condition row per seed"
        keys = np.stack([np.asarray(jax.random.PRNGKey(int(seed))) for seed in seeds])
        out = []
        for start in range(0, count, self.batch_size):
            rows = np.arange(start, start + self.batch_size).clip(max=count - 1)  # pad with the last row
            batch = {k: condition[k][rows] for k in CONDITION_KEYS}
            clips = np.asarray(self._draw(params, keys[rows], batch))
            out.append(clips[: min(self.batch_size, count - start)])
        return np.concatenate(out)


def upscale(clip: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of uint8 [F, H, W, C] by an integer factor (for viewing small clips)."""
    return clip.repeat(factor, axis=1).repeat(factor, axis=2) if factor > 1 else clip


def output_paths(out: str | Path, num_prompts: int, num: int) -> list[list[Path]]:
    """Where `yagg sample` writes: OUT itself for one prompt and one sample, else OUT-PPP-NN.gif beside it (prompt
    index PPP, sample index NN, both from 0); paths[p][n]."""
    out = Path(out)
    if out.suffix.lower() != ".gif":
        raise SampleError(f"--out {out}: the output must be a .gif file name")
    if num_prompts == 1 and num == 1:
        return [[out]]
    return [[out.with_name(f"{out.stem}-{p:03d}-{n:02d}.gif") for n in range(num)] for p in range(num_prompts)]


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    """`yagg sample`'s settings; None means the checkpoint config's `sampling` section decides."""

    num_steps: int | None = None
    guidance_scale: float | None = None
    method: str | None = None
    seed: int = 0  # sample n of each prompt uses seed + n
    num: int = 1  # samples per prompt
    scale: int = 1  # nearest-neighbour upscaling factor of the written GIFs
    raw_params: bool = False  # the trained parameters instead of their EMA
    text_encoder: str | None = None  # overrides the dataset's text encoder


def sample_to_gifs(
    prompts: Sequence[str],
    out: str | Path,
    options: SampleOptions,
    *,
    workdir: str | Path | None = None,
    checkpoint: str | Path | None = None,
) -> list[dict[str, Any]]:
    """`yagg sample`: writes options.num GIFs per prompt (names: `output_paths`); returns one record per GIF
    ({"file", "prompt", "seed", "step"}). Raises SampleError for anything the user can fix."""
    if not prompts:
        raise SampleError("give at least one prompt")
    if options.num < 1 or options.scale < 1:
        raise SampleError(f"--num and --scale must be at least 1, got {options.num} and {options.scale}")
    paths = output_paths(out, len(prompts), options.num)
    reader, step = find_checkpoint(workdir, checkpoint)
    config = reader.config(step)
    model, schedule = build_model(config)
    # One process, parameters replicated on its devices: sampling needs no FSDP, and the training mesh may not exist.
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))
    abstract, shardings = abstract_params(model, config, mesh, mesh_lib.logical_rules(config.sharding_rules))
    params = reader.params(step, abstract, raw=options.raw_params)

    facts = data_facts(config, options.text_encoder)
    condition = encode_prompts(load_text_encoder(facts.text_encoder), prompts, config.data)
    s = config.sampling
    sampler = Sampler(
        model,
        schedule,
        frames=int(config.data.frames),
        size=int(config.data.size),
        method=options.method or s.method,
        num_steps=int(s.num_steps if options.num_steps is None else options.num_steps),
        guidance_scale=float(s.guidance_scale if options.guidance_scale is None else options.guidance_scale),
        eta=float(s.eta),
        batch_size=min(len(prompts) * options.num, 8),
        mesh=mesh,
        param_shardings=shardings,
    )
    rows = np.repeat(np.arange(len(prompts)), options.num)
    seeds = [options.seed + n for _ in prompts for n in range(options.num)]
    clips = to_uint8(sampler(params, {k: v[rows] for k, v in condition.items()}, seeds))
    written = []
    for clip, p, seed, path in zip(clips, rows, seeds, [q for row in paths for q in row], strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_gif(path, upscale(clip, options.scale), facts.fps)
        written.append({"file": str(path), "prompt": prompts[p], "seed": seed, "step": step})
    return written
