"""FVD's cost: `fvd_i3d_batched_vs_one_clip` (I3D clips/s in batches of BATCH ÷ one clip per call, 16 x 224 x 224)
and `fvd_share_of_demo_eval_pass` (the fvd evaluator's seconds ÷ a whole demo eval pass with it).

    python -m bench.fvd [--quick] [--config configs/demo.py] [--config.eval.samples_per_prompt=...]

Both time the code users run. The I3D rate is `eval.fvd.I3DFeatures` (resize, scaling, the jitted I3D, a batch
prepared while the previous one runs) on uint8 clips of 16 frames of 224 x 224 (so the resize keeps their size), as
`yagg fvd` and the fvd evaluator call it: clips/s with `batch_size` BATCH, and with 1, each the best of its calls
after a compiling one, the two interleaved; CPU-seconds per clip are recorded beside them.

The eval pass is what `yagg eval` does per checkpoint (eval/job.py::_Job.evaluate_step, without writing files):
the inference core (`inference.generator.Generator`, as `bench.sampling.make_generator` builds it) draws the config's
eval prompt set (the demo: 72 shapes clips of 6 x 16 x 16, DDIM 25 steps, guidance 8, in lanes of 1) from freshly
initialised parameters (speed does not depend on the weights), then every
evaluator of the demo plus fvd runs on them, built as `build_evaluators` builds them but from stand-in validation
data (random clips and text embeddings of the dataset's shapes; the tiny CLIP of `yagg make-tiny-clip`); the
validation side of FVD is computed once per eval job, not per pass, so it is a stand-in too. The fvd evaluator's I3D
is the batched extractor of the rate measurement (compiled there); a first pass without fvd compiles the rest, and
the second pass is timed, per part. The prompts are encoded once per job,
outside the pass, as the job does.

Quick mode: batches of 4 with one timed call each for the I3D rate, and the eval pass on the first QUICK_CLIPS clips of
the prompt set with the fvd evaluator's I3D in batches of 4 (the val loss does not shrink with the clips, so the
quick share is lower than the full one).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from bench.common import Metric, write_metrics
from bench.sampling import make_generator
from bench.train_mfu import DEFAULT_CONFIG, Timed, load, parse_config_args, reproduce_command, timed
from eval import evaluators as ev
from eval.fvd import I3DFeatures, SetFeatures, default_cache_dir, make_protocol
from eval.job import prompt_set
from inference.generator import placement
from model.tiny_clip import make_tiny_clip

BATCH = 8  # the demo's eval.batch_size, so the eval pass's fvd runs the batch measured here
QUICK_BATCH = 4
QUICK_CLIPS = 8


def i3d_rates(quick: bool) -> tuple[Metric, I3DFeatures]:
    """The metric, and the batched extractor (compiled for its batch, which the eval pass's fvd reuses)."""
    protocol = make_protocol("reference")
    batch = QUICK_BATCH if quick else BATCH
    clips = np.random.default_rng(0).integers(0, 256, (batch, 16, 224, 224, 3), dtype=np.uint8)
    extractors = {size: I3DFeatures(protocol, cache_dir=default_cache_dir(), batch_size=size) for size in (batch, 1)}
    calls: dict[int, list[Timed]] = {batch: [], 1: []}
    for size, extractor in extractors.items():
        extractor(clips[:size])  # compiles
    for _ in range(1 if quick else 2):  # interleaved, so both see the same share of a busy machine
        for size, extractor in extractors.items():
            calls[size].append(timed(lambda e=extractor, n=size: e(clips[:n])))
    wall = {size: min(c.wall for c in timings) for size, timings in calls.items()}
    cpu = {size: min(c.cpu for c in timings) for size, timings in calls.items()}
    per_s = {f"batch_{size}": size / seconds for size, seconds in wall.items()}
    metric = Metric(
        name="fvd_i3d_batched_vs_one_clip",
        value=per_s[f"batch_{batch}"] / per_s["batch_1"],
        goal=None,
        command="python -m bench.fvd" + (" --quick" if quick else ""),
        details={
            "clips_per_s": per_s,
            "cpu_seconds_per_clip": {f"batch_{size}": seconds / size for size, seconds in cpu.items()},
            # The same ratio by CPU-seconds per clip: what batching saves in work, whatever else loads the machine.
            "ratio_by_cpu_seconds": (cpu[1] / 1) / (cpu[batch] / batch),
            "timed_calls_seconds": {f"batch_{size}": [round(c.wall, 2) for c in cs] for size, cs in calls.items()},
            "clip": "16 x 224 x 224 uint8 (resize keeps the size)",
            "device": str(jax.devices()[0]),
        },
        unit="x",
    )
    return metric, extractors[batch]


def eval_pass(config: ml_collections.ConfigDict, extractor: I3DFeatures, quick: bool) -> tuple[dict[str, float], int]:
    """Seconds of each part of one warm eval pass (module doc), and the number of clips sampled; `extractor` is the
    fvd evaluator's, already compiled for its batch."""
    e = config.eval
    prompts = prompt_set(config)
    count = QUICK_CLIPS if quick else len(prompts.prompts)
    texts, seeds = prompts.prompts[:count], prompts.seeds[:count]
    targets = prompts.targets[:count] if prompts.targets else None

    clip_dir = make_tiny_clip(Path(tempfile.mkdtemp()) / "tiny-clip", seed=0)
    generator = make_generator(config, str(clip_dir))
    model, schedule, params = generator.model, generator.schedule, generator.params
    mesh, _, shardings = placement(config, None)  # as make_generator placed the parameters
    d = config.data

    # Stand-in validation data of the dataset's shapes.
    rng = np.random.default_rng(0)
    val_count = int(e.val_batches) * int(e.batch_size)
    val = {
        "frames": rng.integers(0, 256, (val_count, d.frames, d.size, d.size, 3), dtype=np.uint8),
        "text_pooled": rng.standard_normal((val_count, d.text_embed_dim), dtype=np.float32),
        "text_tokens": rng.standard_normal((val_count, d.text_max_length, d.text_token_dim)).astype(np.float16),
        "text_mask": np.broadcast_to(np.arange(d.text_max_length) < 8, (val_count, d.text_max_length)).copy(),
    }
    clip = ev.ClipModel(str(clip_dir))
    gamma = config.diffusion.min_snr_gamma
    assert extractor.protocol == make_protocol(e.fvd_protocol, frames=e.fvd_frames, max_clips=e.fvd_max_clips)
    reference = SetFeatures(rng.standard_normal((val_count, 400)).astype(np.float32), "stand-in", {}, False, 0.0)
    evaluators = {
        "val_loss": ev.ValLoss(
            model,
            schedule,
            val,
            batch_size=int(e.batch_size),
            num_buckets=int(e.val_loss_buckets),
            seed=int(e.seed),
            min_snr_gamma=None if gamma is None else float(gamma),
            mesh=mesh,
            param_shardings=shardings,
        ),
        "video": ev.VideoMetrics(),
        "probe": ev.ShapesProbe([], []),
        "clipsim": ev.ClipSim(clip),
        "frechet_clip": ev.FrechetClip(clip, val["frames"]),
        "fvd": ev.Fvd(extractor, reference, num_samples=count),
    }
    names = [n for n in config.eval.evaluators if n in evaluators]

    def run_pass(skip: tuple[str, ...] = ()) -> dict[str, float]:
        times = {}
        start = time.perf_counter()
        clips = generator.generate(texts, seeds).raw
        times["sampling"] = time.perf_counter() - start
        ctx = ev.EvalContext(step=0, params=params, prompts=texts, seeds=seeds, clips=clips, targets=targets)
        for name in names:
            if name in skip:
                continue
            start = time.perf_counter()
            dict(evaluators[name].run(ctx))
            evaluators[name].per_sample(ctx)
            times[name] = time.perf_counter() - start
        return times

    run_pass(skip=("fvd",))  # compiles the sampler, the val loss and the CLIP towers (the I3D is compiled already)
    return run_pass(), count


def main() -> None:
    args, overrides = parse_config_args(__doc__.split("\n")[0])
    if not any(o.startswith("--config.eval.evaluators=") for o in overrides):
        overrides = [*overrides, "--config.eval.evaluators=('val_loss','video','probe','clipsim','frechet_clip','fvd')"]
    config = load(args.config, overrides)
    rates, extractor = i3d_rates(args.quick)
    times, count = eval_pass(config, extractor, args.quick)
    total = sum(times.values())
    share = Metric(
        name="fvd_share_of_demo_eval_pass",
        value=times["fvd"] / total,
        goal=None,
        command=reproduce_command("bench.fvd", args, overrides, DEFAULT_CONFIG),
        details={
            "config": args.config,
            "overrides": overrides,
            "clips": count,
            "seconds": times,
            "fvd_seconds_per_clip": times["fvd"] / count,
            "pass_seconds": total,
        },
    )
    write_metrics([rates, share], args.json)


if __name__ == "__main__":
    main()
