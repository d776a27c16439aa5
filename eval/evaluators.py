"""The eval job's scores: one small interface and the six evaluators, built from `config.eval`.

An evaluator is built once per eval job, loading what it needs up front (validation clips, a CLIP, the I3D), and then
run once per checkpoint on an `EvalContext`: the checkpoint's EMA parameters and the clips generated from them. `run`
yields `(name, value)` pairs: floats are scores (metrics.jsonl, TensorBoard and the gallery's curves); ints are counts
that say what a score was computed from (metrics.jsonl and the gallery, e.g. `fvd/n`); strings are labels that say how
a score was made (e.g. `clipsim/backbone`, `fvd/protocol`), and a label named `.../warning` is shown as a warning in
the gallery. `per_sample` gives scores per generated clip for samples.json.
The shape of big_vision's `evaluators/common.py`, without its registry: `build_evaluators` names the six.

  val_loss      the denoising loss on the `val` split at fixed timestep buckets (`ValLoss`)
  video         weight-free video metrics of the generated clips (eval/video_metrics.py)
  probe         the shapes probe (eval/probe.py): colour, shape and direction accuracy, training vs held-out
                combinations, beside the same detector's accuracy on the val split's real clips (`probe/real_*`);
                only with `eval.prompts = "shapes"`, which says what every clip should show
  clipsim       CLIPSIM (Wu et al. 2021, "GODIVA", sec. 4.1) as `clipsim/cos`: the raw cosine similarity (in [-1, 1];
                not x100, not clipped at 0 as CLIPScore is) between the prompt's CLIP text embedding and each frame's
                CLIP image embedding, averaged over frames, then over clips; the CLIP is named in `clipsim/backbone`
  frechet_clip  Fréchet distance (eval/frechet.py) between generated and validation clips, each clip represented by
                the mean of its frames' L2-normalised CLIP image embeddings (one vector per clip, so frame count and
                motion do not weigh in; the FVD idea with a CLIP image backbone, as "CLIP-FID" is to FID). No paper
                reports it; it is a cheap trend line, not FVD
  fvd           Fréchet Video Distance (eval/fvd.py) between generated and validation clips with the Kinetics-400 I3D
                of the reference FVD; `fvd/n` and `fvd/n_ref` clips, `fvd/protocol` says how (`Fvd`)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from contracts import records, storage
from contracts.conditioning import model_condition
from contracts.media import frames_to_model, to_uint8
from eval import fvd as fvd_lib
from eval.frechet import frechet_distance
from eval.probe import Reading, probe_scores, read_clip
from eval.video_metrics import video_metrics
from model.diffusion import CONDITION_KEYS, Schedule, denoising_loss
from parallel import mesh as mesh_lib
from pipeline.shapes import is_heldout, parse_caption
from yagg.config import ConfigError

log = logging.getLogger(__name__)

EVALUATORS = ("val_loss", "video", "probe", "clipsim", "frechet_clip", "fvd")
# What ValLoss reads from each validation record (the train step's inputs).
VAL_FIELDS = ("frames", *CONDITION_KEYS)
# The most val clips the probe reads to score its own detector on real data (the demo's val split has about 50).
PROBE_REAL_CLIPS = 256


@dataclasses.dataclass
class EvalContext:
    """One checkpoint's evaluation: its parameters and the clips generated from them, sample i for prompts[i]."""

    step: int
    params: Any  # EMA parameters, in the shardings the eval job restored them into
    prompts: Sequence[str]
    seeds: Sequence[int]
    clips: np.ndarray  # float32 [N, F, H, W, 3] in model space, as the sampler returned them (unclipped)
    # (colour, shape, direction) per sample, for the shapes prompts.
    targets: Sequence[tuple[str, str, str]] | None = None
    _memo: dict[Any, Any] = dataclasses.field(default_factory=dict)

    @property
    def pixels(self) -> np.ndarray:
        """The clips as their GIFs show them: uint8 [N, F, H, W, 3]."""
        return self.memo("pixels", lambda: to_uint8(self.clips))

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        """`compute()` once per context: evaluators share work on the same samples (e.g. CLIP frame embeddings)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]


class Evaluator(Protocol):
    def run(self, ctx: EvalContext) -> Iterable[tuple[str, float | int | str]]:
        """The scores of one checkpoint."""

    def per_sample(self, ctx: EvalContext) -> Mapping[str, Sequence[float]]:
        """Scores per generated clip, name -> one value per sample ({} for evaluators without any)."""


# ----------------------------------------------------------------------------------------------------------------------
# Validation loss.


def load_val_examples(paths: Sequence[str], count: int, fields: Sequence[str] = VAL_FIELDS) -> dict[str, np.ndarray]:
    """The first `count` records of the val shards (fewer if the split is smaller), stacked per field."""
    source = grain.sources.ArrayRecordDataSource(list(paths))
    examples = [records.decode(source[i]) for i in range(min(count, len(source)))]
    return {name: np.stack([e[name] for e in examples]) for name in fields} if examples else {}


def bucket_names(num_timesteps: int, num_buckets: int) -> list[tuple[str, int, int]]:
    """(name, first t, last t) per bucket: `val/loss_t000-099` ... for T = 1000 and 10 buckets (inclusive ranges)."""
    if not 1 <= num_buckets <= num_timesteps:
        raise ConfigError(f"eval.val_loss_buckets must be in [1, {num_timesteps}], got {num_buckets}")
    width = len(str(num_timesteps - 1))
    edges = [b * num_timesteps // num_buckets for b in range(num_buckets + 1)]
    return [
        (f"val/loss_t{lo:0{width}d}-{hi - 1:0{width}d}", lo, hi - 1)
        for lo, hi in zip(edges[:-1], edges[1:], strict=True)
    ]


class ValLoss:
    """The training objective on fixed validation batches, per timestep bucket and overall (`val/loss`).

    The loss is training's (model/diffusion.py::denoising_loss, which the training loss calls: MSE to the target of
    the prediction type, weighted by min-SNR-gamma when training was) without condition dropout: every example keeps
    its caption. Everything random is
    fixed: for batch b and bucket k, the timesteps (uniform within the bucket) and the noise come from
    `fold_in(PRNGKey(eval.seed), b * buckets + k)`, so successive checkpoints are scored on identical inputs and
    their differences are the model's alone. `val/loss` is the mean over buckets: an estimate of the loss at a uniform
    timestep, like the training loss.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Schedule,
        examples: Mapping[str, np.ndarray],
        *,
        batch_size: int,
        num_buckets: int,
        seed: int,
        min_snr_gamma: float | None,
        mesh: jax.sharding.Mesh,
        param_shardings: Any,
    ) -> None:
        self._buckets = bucket_names(schedule.num_timesteps, num_buckets)
        count = len(examples["frames"])
        assert count > 0, "ValLoss needs validation examples"
        self._batches = []
        for start in range(0, count, batch_size):
            # A short last batch is padded by repeating its last example, with weight 0, to keep one compiled shape.
            rows = np.arange(start, start + batch_size).clip(max=count - 1)
            weights = (np.arange(start, start + batch_size) < count).astype(np.float32)
            self._batches.append(({name: value[rows] for name, value in examples.items()}, weights))
        self._key = jax.random.PRNGKey(seed)

        def per_example(params: Any, batch: dict[str, jax.Array], key: jax.Array, lo: jax.Array, hi: jax.Array):
            t_key, noise_key = jax.random.split(key)
            x0 = frames_to_model(batch["frames"])
            t = jax.random.randint(t_key, (x0.shape[0],), lo, hi + 1)
            noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
            return denoising_loss(
                model.apply,
                params,
                schedule,
                x0,
                model_condition(batch),
                t,
                noise,
                train=False,
                min_snr_gamma=min_snr_gamma,
            )

        replicated = mesh_lib.replicated(mesh)
        self._losses = jax.jit(
            per_example,
            in_shardings=(param_shardings, replicated, replicated, replicated, replicated),
            out_shardings=replicated,
        )

    def run(self, ctx: EvalContext) -> Iterable[tuple[str, float]]:
        bucket_losses = []
        for k, (name, lo, hi) in enumerate(self._buckets):
            total = weight = 0.0
            for b, (batch, weights) in enumerate(self._batches):
                key = jax.random.fold_in(self._key, b * len(self._buckets) + k)
                losses = np.asarray(self._losses(ctx.params, batch, key, np.int32(lo), np.int32(hi)))
                total += float(np.sum(losses * weights))
                weight += float(weights.sum())
            bucket_losses.append(total / weight)
            yield name, bucket_losses[-1]
        yield "val/loss", float(np.mean(bucket_losses))

    def per_sample(self, ctx: EvalContext) -> Mapping[str, Sequence[float]]:
        return {}


# ----------------------------------------------------------------------------------------------------------------------
# Scores of the generated clips alone.


class VideoMetrics:
    """eval/video_metrics.py on the generated clips (non-finite and saturated values included)."""

    def run(self, ctx: EvalContext) -> Iterable[tuple[str, float]]:
        yield from video_metrics(ctx.clips).items()

    def per_sample(self, ctx: EvalContext) -> Mapping[str, Sequence[float]]:
        return {}


class ShapesProbe:
    """The shapes probe on the generated clips against the colour, shape and direction each prompt asked for, split
    into training and held-out combinations (pipeline/shapes.py::is_heldout); and, once per job, the same detector
    on real clips of the dataset (`real_clips`, uint8 [N, F, H, W, 3], with their captions' words as
    `real_targets`), reported at every step as `probe/real_*_acc`: what the detector reads where the answer is
    known, the ceiling of the model's scores (none when there are no real clips)."""

    def __init__(self, real_clips: Sequence[np.ndarray], real_targets: Sequence[tuple[str, str, str]]) -> None:
        readings = [read_clip(clip) for clip in real_clips]
        self.real_scores = probe_scores(readings, real_targets, heldout=(), prefix="probe/real_")

    def run(self, ctx: EvalContext) -> Iterable[tuple[str, float]]:
        targets = _targets(ctx)
        heldout = {t for t in targets if is_heldout(*t)}
        yield from probe_scores(_readings(ctx), targets, heldout).items()
        yield from self.real_scores.items()

    def per_sample(self, ctx: EvalContext) -> Mapping[str, Sequence[float]]:
        hits = np.asarray([r.matches(t) for r, t in zip(_readings(ctx), _targets(ctx), strict=True)], np.float64)
        return {f"probe/{word}": hits[:, i].tolist() for i, word in enumerate(("color", "shape", "direction"))}


def _readings(ctx: EvalContext) -> list[Reading]:
    return ctx.memo("probe", lambda: [read_clip(clip) for clip in ctx.pixels])


def _targets(ctx: EvalContext) -> Sequence[tuple[str, str, str]]:
    assert ctx.targets is not None, "the probe runs only on the shapes prompts, which carry targets"
    return ctx.targets


def load_real_probe_clips(val_paths: Sequence[str], count: int) -> tuple[list[np.ndarray], list[tuple[str, str, str]]]:
    """Up to `count` val clips whose captions are the moving-shapes dataset's, with their (colour, shape, direction)."""
    examples = load_val_examples(val_paths, count, fields=("frames", "caption"))
    clips, targets = [], []
    for frames, caption in zip(examples.get("frames", ()), examples.get("caption", ()), strict=True):
        words = parse_caption(str(caption))
        if words is not None:
            clips.append(frames)
            targets.append(words)
    return clips, targets


# ----------------------------------------------------------------------------------------------------------------------
# CLIP-based scores.


class ClipModel:
    """One CLIP's text and vision towers (model/clip.py), shared by the evaluators that use it."""

    def __init__(self, name: str) -> None:
        from model.clip import TextEncoder, VisionEncoder

        try:
            local = storage.local_copy(name)  # a gs:// folder is copied once to a local cache, as the pipeline does
            self.text = TextEncoder.from_pretrained(local)
            self.vision = VisionEncoder.from_pretrained(local)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"cannot load the CLIP {name!r} for clipsim and frechet ({e}); it is eval.clip if set, else the "
                "dataset's text encoder: pass --config.eval.clip=NAME_OR_FOLDER"
            ) from e
        self.name = name

    def text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings [N, D] (CLIP's text_embeds)."""
        try:
            return _normalise(self.text.encode(list(prompts))["pooled"])
        except ValueError as e:  # a prompt longer than this CLIP's context
            raise ConfigError(f"eval.clip={self.name!r}: {e}") from e

    def frame_embeddings(self, pixels: np.ndarray) -> np.ndarray:
        """L2-normalised image embeddings [N, F, D] of every frame of uint8 clips [N, F, H, W, 3]."""
        n, f = pixels.shape[:2]
        frames = self.vision.encode(pixels.reshape(n * f, *pixels.shape[2:]))
        return _normalise(frames).reshape(n, f, -1)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _generated_frame_embeddings(ctx: EvalContext, clip: ClipModel) -> np.ndarray:
    return ctx.memo(("clip-frames", clip.name), lambda: clip.frame_embeddings(ctx.pixels))


class ClipSim:
    """CLIPSIM per sample (mean over frames of cos(text, frame)) and its mean over samples (`clipsim/cos`, raw cosine),
    with the backbone's name."""

    def __init__(self, clip: ClipModel) -> None:
        self._clip = clip
        self._text: dict[tuple[str, ...], np.ndarray] = {}  # the prompts are the same at every checkpoint

    def _similarities(self, ctx: EvalContext) -> np.ndarray:
        prompts = tuple(ctx.prompts)
        if prompts not in self._text:
            self._text[prompts] = self._clip.text_embeddings(prompts)
        frames = _generated_frame_embeddings(ctx, self._clip)
        return np.einsum("nfd,nd->nf", frames, self._text[prompts]).mean(axis=1)

    def run(self, ctx: EvalContext) -> Iterable[tuple[str, float | str]]:
        yield "clipsim/cos", float(ctx.memo("clipsim", lambda: self._similarities(ctx)).mean())
        yield "clipsim/backbone", self._clip.name

    def per_sample(self, ctx: EvalContext) -> Mapping[str, Sequence[float]]:
        return {"clipsim/cos": [float(s) for s in ctx.memo("clipsim", lambda: self._similarities(ctx))]}


class FrechetClip:
    """Fréchet distance between generated and validation clips on mean-pooled CLIP frame embeddings (`frechet_clip`).

    With fewer clips than embedding dimensions the covariances are rank-deficient; eval/frechet.py handles that, but
    the value then depends on the number of clips: compare runs evaluated with the same counts.
    """

    def __init__(self, clip: ClipModel, reference_pixels: np.ndarray) -> None:
        self._clip = clip
        # The validation clips' features are the same at every checkpoint: computed once.
        self._reference = clip.frame_embeddings(reference_pixels).mean(axis=1)

    def run(self, ctx: EvalContext) -> Iterable[tuple[str, float | str]]:
        generated = _generated_frame_embeddings(ctx, self._clip).mean(axis=1)
        yield "frechet_clip", frechet_distance(generated, self._reference)
        yield "frechet_clip/backbone", self._clip.name

    def per_sample(self, ctx: EvalContext) -> Mapping[str, Sequence[float]]:
        return {}


# ----------------------------------------------------------------------------------------------------------------------
# FVD.


class Fvd:
    """FVD between the generated clips and the validation split's (eval/fvd.py), with what it was computed from.

    The validation side is computed once per job, or read from the feature cache, where process 0 stores it keyed by
    the shards' content, so a second eval job on the same dataset skips it. Every process computes the same features
    (the I3D runs on each process's default device, unsharded); only the generated side is computed per checkpoint.
    """

    def __init__(self, extractor: fvd_lib.I3DFeatures, reference: fvd_lib.SetFeatures, num_samples: int) -> None:
        self._extractor = extractor
        self._reference = reference
        self._warning = fvd_lib.small_n_warning(num_samples, reference.n)
        if self._warning:
            log.warning("fvd: %s", self._warning)

    def run(self, ctx: EvalContext) -> Iterable[tuple[str, float | int | str]]:
        generated = self._extractor(ctx.pixels)
        yield "fvd", fvd_lib.fvd(generated, self._reference.features)
        yield "fvd/n", len(generated)
        yield "fvd/n_ref", self._reference.n
        yield "fvd/protocol", self._extractor.protocol.describe()
        if self._warning:
            yield "fvd/warning", self._warning

    def per_sample(self, ctx: EvalContext) -> Mapping[str, Sequence[float]]:
        return {}


def build_fvd(e: ml_collections.ConfigDict, val_paths: Sequence[str], num_samples: int) -> Fvd:
    """The `fvd` evaluator from `config.eval`; ConfigError for settings or weights that cannot work."""
    from eval.i3d_weights import WeightsError
    from eval.video_sets import dataset_set

    cache_dir = e.fvd_cache or fvd_lib.default_cache_dir()
    try:
        protocol = fvd_lib.make_protocol(e.fvd_protocol, frames=e.fvd_frames, max_clips=e.fvd_max_clips)
        extractor = fvd_lib.I3DFeatures(protocol, cache_dir=cache_dir, batch_size=int(e.batch_size))
        reference = dataset_set(val_paths, "the validation split", protocol.max_clips)
        log.info("fvd: features of %d validation clip(s) at most (cached under %s)", reference.expected, cache_dir)
        features = fvd_lib.set_features(
            reference, extractor, fvd_lib.FeatureCache(cache_dir), write_cache=jax.process_index() == 0
        )
    except WeightsError as error:
        raise ConfigError(f'eval.evaluators has "fvd": {error} (or drop "fvd" from eval.evaluators)') from error
    except fvd_lib.FvdError as error:
        raise ConfigError(f"fvd: {error}") from error
    how = "read from the cache" if features.cached else f"computed in {features.seconds:.1f} s"
    log.info("fvd: %d validation clips' features %s; protocol %s", features.n, how, protocol.describe())
    return Fvd(extractor, features, num_samples)


# ----------------------------------------------------------------------------------------------------------------------
# From config.


def build_evaluators(
    config: ml_collections.ConfigDict,
    *,
    model: nn.Module,
    schedule: Schedule,
    mesh: jax.sharding.Mesh,
    param_shardings: Any,
    val_paths: Sequence[str],
    clip_name: str,
    shapes_prompts: bool,
    num_samples: int,
) -> list[Evaluator]:
    """The evaluators `config.eval.evaluators` names, in that order; ConfigError for a list that cannot work.

    `val_paths` are the val split's shards, `clip_name` the CLIP for clipsim/frechet_clip (config.eval.clip, or the
    dataset's text encoder), `num_samples` the number of clips generated per checkpoint.
    """
    e = config.eval
    names = list(e.evaluators)
    unknown = [n for n in names if n not in EVALUATORS]
    if unknown:
        raise ConfigError(f"eval.evaluators: unknown evaluator(s) {unknown}; choose from {EVALUATORS}")
    if "probe" in names and not shapes_prompts:
        raise ConfigError('eval.evaluators has "probe", which needs eval.prompts="shapes" (it knows no other targets)')
    too_few = [n for n in ("frechet_clip", "fvd") if n in names and num_samples < 2]
    if too_few:
        raise ConfigError(
            f"{too_few[0]} needs at least 2 generated clips per checkpoint, eval.prompts gives {num_samples}"
        )

    val: dict[str, np.ndarray] = {}
    if {"val_loss", "frechet_clip"} & set(names):
        val = load_val_examples(val_paths, int(e.val_batches) * int(e.batch_size))
        count = len(val.get("frames", ()))
        if count < 2:
            raise ConfigError(
                f"val_loss and frechet_clip need at least 2 validation examples, but the dataset's val split has "
                f"{count}: preprocess with a larger --val-fraction, or drop them from eval.evaluators"
            )
    clip = ClipModel(clip_name) if {"clipsim", "frechet_clip"} & set(names) else None

    def build(name: str) -> Evaluator:
        if name == "val_loss":
            gamma = config.diffusion.min_snr_gamma
            return ValLoss(
                model,
                schedule,
                val,
                batch_size=int(e.batch_size),
                num_buckets=int(e.val_loss_buckets),
                seed=int(e.seed),
                min_snr_gamma=None if gamma is None else float(gamma),
                mesh=mesh,
                param_shardings=param_shardings,
            )
        if name == "video":
            return VideoMetrics()
        if name == "probe":
            return ShapesProbe(*load_real_probe_clips(val_paths, PROBE_REAL_CLIPS))
        if name == "clipsim":
            return ClipSim(clip)
        if name == "frechet_clip":
            return FrechetClip(clip, val["frames"])
        return build_fvd(e, val_paths, num_samples)

    return [build(name) for name in names]
