"""`ddim50_vs_ddpm1000_speedup`: seconds per GIF with DDPM over 1000 steps divided by seconds per GIF with DDIM over
50 steps, both with classifier-free guidance.

    python -m bench.sampling [--quick] [--config configs/demo.py] [--config.sampling.guidance_scale=...]

Both samplers are `eval.sample.Sampler`, the object `yagg sample` and `yagg eval` draw clips with (one jitted
`vmap` over clips of `model.sampling.sample`, guided by `guided_predict_fn`: one U-Net call on the conditional and
null conditions concatenated, per step), built exactly as `yagg sample` builds it for one prompt and one GIF
(`batch_size` 1, the config's guidance scale and eta, parameters replicated over this process's devices). Only the
method and step count differ: "ddpm" with 1000 steps (every timestep of the schedule) and "ddim" with 50.

Speed does not depend on the weights, so the parameters are freshly initialised (`model.init`) and the condition is
random text embeddings of the config's shapes (the text encoder runs once per prompt, outside the sampler, in both
cases). A GIF's time is one call of the sampler, from host arrays to the host clip, after a warm-up call that
compiles it; the best of the timed calls is kept, and the two samplers' calls are interleaved. The CPU time of each
best call is recorded too (`details.cpu_seconds_per_gif`), and the ratio of those, as a cross-check that does not
depend on how much of a shared machine the other work took while the long DDPM call ran.

Quick mode runs DDPM over QUICK_DDPM_STEPS steps instead of 1000 and scales its time by 1000 / QUICK_DDPM_STEPS. That
is the same program with a shorter loop (`sample` runs every step in one `lax.fori_loop` of identical iterations),
and what does not scale with the steps (starting noise, copying one clip back) is about a millisecond per call
against seconds of model evaluations; the full run measures 1000 steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bench.common import Metric, write_metrics
from bench.train_mfu import DEFAULT_CONFIG, Timed, load, parse_config_args, reproduce_command, timed
from eval.sample import Sampler, abstract_params, build_model
from model.build import example_inputs
from train import mesh as mesh_lib

DDPM_STEPS = 1000
DDIM_STEPS = 50
QUICK_DDPM_STEPS = 250


def random_condition(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
    """One prompt's condition arrays, as `eval.sample.encode_prompts` returns them (8 visible tokens)."""
    d = config.data
    rng = np.random.default_rng(seed)
    return {
        "text_pooled": rng.standard_normal((1, d.text_embed_dim), dtype=np.float32),
        "text_tokens": rng.standard_normal((1, d.text_max_length, d.text_token_dim), dtype=np.float32),
        "text_mask": (np.arange(d.text_max_length) < 8)[None],
    }


def make_samplers(config: ml_collections.ConfigDict, ddpm_steps: int) -> tuple[dict[str, Sampler], object]:
    """{"ddpm": ..., "ddim": ...} built as `eval.sample.sample_to_gifs` builds its sampler, and fresh parameters."""
    model, schedule = build_model(config)
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))
    _, shardings = abstract_params(model, config, mesh, mesh_lib.logical_rules(config.sharding_rules))
    inputs = example_inputs(config, batch_size=1)

    def init(key: jax.Array) -> object:
        zeros = {name: jnp.zeros(spec.shape, spec.dtype) for name, spec in inputs.items()}
        return model.init({"params": key}, **zeros, train=False)["params"]

    params = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))
    s = config.sampling
    samplers = {
        method: Sampler(
            model,
            schedule,
            frames=int(config.data.frames),
            size=int(config.data.size),
            method=method,
            num_steps=steps,
            guidance_scale=float(s.guidance_scale),
            eta=float(s.eta),
            batch_size=1,
            mesh=mesh,
            param_shardings=shardings,
        )
        for method, steps in (("ddpm", ddpm_steps), ("ddim", DDIM_STEPS))
    }
    return samplers, params


def main() -> None:
    args, overrides = parse_config_args(__doc__.split("\n")[0])
    config = load(args.config, overrides)
    steps = {"ddpm": QUICK_DDPM_STEPS if args.quick else DDPM_STEPS, "ddim": DDIM_STEPS}
    scale = {"ddpm": DDPM_STEPS / steps["ddpm"], "ddim": 1.0}
    samplers, params = make_samplers(config, steps["ddpm"])
    condition = random_condition(config)
    repeats = 2 if args.quick else 3
    first_call = {}
    for method, sampler in samplers.items():
        first_call[method] = timed(lambda sampler=sampler: sampler(params, condition, [0])).wall
    calls: dict[str, list[Timed]] = {"ddpm": [], "ddim": []}
    for i in range(repeats):
        for method, sampler in samplers.items():
            calls[method].append(timed(lambda sampler=sampler, i=i: sampler(params, condition, [i + 1])))
    wall = {method: min(c.wall for c in calls[method]) * scale[method] for method in calls}
    cpu = {method: min(c.cpu for c in calls[method]) * scale[method] for method in calls}
    metric = Metric(
        name="ddim50_vs_ddpm1000_speedup",
        value=wall["ddpm"] / wall["ddim"],
        goal=">= 15",
        command=reproduce_command("bench.sampling", args, overrides, DEFAULT_CONFIG),
        details={
            "config": args.config,
            "overrides": overrides,
            "clip": f"{config.data.frames}x{config.data.size}x{config.data.size}",
            "guidance_scale": float(config.sampling.guidance_scale),
            "seconds_per_gif": wall,
            "cpu_seconds_per_gif": cpu,
            "speedup_by_cpu_seconds": cpu["ddpm"] / cpu["ddim"],
            "seconds_per_step": {"ddpm": wall["ddpm"] / DDPM_STEPS, "ddim": wall["ddim"] / DDIM_STEPS},
            "steps_run": steps,
            "ddpm_extrapolated_from_steps": steps["ddpm"] if args.quick else None,
            "timed_calls_seconds": {method: [round(c.wall, 3) for c in calls[method]] for method in calls},
            "first_call_seconds_with_compile": first_call,
            "gifs_per_call": 1,
        },
        unit="x",
    )
    write_metrics([metric], args.json)


if __name__ == "__main__":
    main()
