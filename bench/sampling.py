"""`ddim50_vs_ddpm1000_speedup`: seconds per GIF with DDPM over 1000 steps divided by seconds per GIF with DDIM over
50 steps, both with classifier-free guidance.

    python -m bench.sampling [--quick] [--config configs/demo.py] [--config.sampling.guidance_scale=...]

Both draw through the inference core (`inference.generator.Generator`), the object `yagg sample`, `yagg eval`,
training's samples and the server draw clips with (a Python loop over one compiled, vmapped denoising step with
classifier-free guidance: one U-Net call on the conditional and null conditions concatenated, per step), built as
`yagg sample` builds it (the config's lanes per device, guidance scale and eta, parameters replicated over this
process's devices), drawing one GIF for one prompt. Only the method and step count differ: "ddpm" with 1000 steps
(every timestep of the schedule) and "ddim" with 50.

Speed does not depend on the weights, so the parameters are freshly initialised and the text encoder is the tiny
random CLIP (`yagg make-tiny-clip`), whose shapes the demo config has (the text encoder runs once per prompt, before
the first step, in both cases). A GIF's time is one `generate` call, from the prompt to the host clip, after a warm-up
call that compiles it; the best of the timed calls is kept, and the two samplers' calls are interleaved. The CPU time
of each best call is recorded too (`details.cpu_seconds_per_gif`), and the ratio of those, as a cross-check that does
not depend on how much of a shared machine the other work took while the long DDPM call ran.

Quick mode runs DDPM over QUICK_DDPM_STEPS steps instead of 1000 and scales its time by 1000 / QUICK_DDPM_STEPS. That
is the same loop of identical compiled steps, shorter, and what does not scale with the steps (starting noise,
copying one clip back) is about a millisecond per call against seconds of model evaluations; the full run measures
1000 steps.
"""

from __future__ import annotations

import tempfile

import flax.linen as nn
import jax
import ml_collections

from bench.common import Metric, write_metrics
from bench.train_mfu import DEFAULT_CONFIG, Timed, load, parse_config_args, reproduce_command, timed
from contracts.conditioning import load_conditioner
from contracts.dataset import DEFAULT_FPS, DataFacts
from inference.generator import Generator, placement
from model.build import build_unet, params_initializer
from model.tiny_clip import make_tiny_clip

DDPM_STEPS = 1000
DDIM_STEPS = 50
QUICK_DDPM_STEPS = 250
PROMPT = "a red circle moving left"


def make_generator(config: ml_collections.ConfigDict, clip_dir: str) -> Generator:
    """The inference core over freshly initialised parameters, as `Generator.load` places them."""
    mesh, _, shardings = placement(config, None)
    init = params_initializer(build_unet(config), config)
    params = jax.jit(lambda key: nn.unbox(init(key)), out_shardings=shardings)(jax.random.PRNGKey(0))
    conditioner = load_conditioner(clip_dir)
    d = config.data
    facts = DataFacts(frames=int(d.frames), size=int(d.size), fps=DEFAULT_FPS, text_encoder=conditioner.info)
    return Generator(
        config=config,
        facts=facts,
        conditioner=conditioner,
        params=params,
        step=0,
        mesh=mesh,
        param_shardings=shardings,
    )


def main() -> None:
    args, overrides = parse_config_args(__doc__.split("\n")[0])
    config = load(args.config, overrides)
    steps = {"ddpm": QUICK_DDPM_STEPS if args.quick else DDPM_STEPS, "ddim": DDIM_STEPS}
    scale = {"ddpm": DDPM_STEPS / steps["ddpm"], "ddim": 1.0}
    with tempfile.TemporaryDirectory() as folder:
        generator = make_generator(config, str(make_tiny_clip(folder)))

    def draw(method: str, seed: int) -> object:
        return generator.generate([PROMPT], [seed], method=method, steps=steps[method])

    repeats = 2 if args.quick else 3
    first_call = {method: timed(lambda method=method: draw(method, 0)).wall for method in steps}
    calls: dict[str, list[Timed]] = {"ddpm": [], "ddim": []}
    for i in range(repeats):
        for method in steps:
            calls[method].append(timed(lambda method=method, i=i: draw(method, i + 1)))
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
            "lanes_per_call": generator.width,
        },
        unit="x",
    )
    write_metrics([metric], args.json)


if __name__ == "__main__":
    main()
