"""Samplers (DDIM, ancestral DDPM) and classifier-free guidance, as pure jittable functions of a Schedule.

`sample(predict_fn, shape, rng, schedule=..., method=..., num_steps=...)` runs the whole reverse process in one
`lax.fori_loop`, so under `jit` the model is traced once whatever the number of steps. `predict_fn(x_t, t)` returns
the model output in `schedule.prediction_type` for integer timesteps `t` `[B]`; `guided_predict_fn` builds one from
the U-Net's `apply` with classifier-free guidance.

Timestep spacing is "trailing" (Lin et al. 2024): with T timesteps and n steps the sampler visits
t_i = round(T - i T / n) - 1 for i = 0 .. n-1, so it always starts at t = T - 1, the noisiest step, which the model
was trained on; and it ends on a final step to "t = -1" where alpha-bar is 1, returning the predicted x0. With
n = T it visits every timestep.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from model.diffusion import CONDITION_KEYS, Schedule, null_condition, predict_x0_and_eps

PredictFn = Callable[[jax.Array, jax.Array], jax.Array]
METHODS = ("ddim", "ddpm")


def sampling_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """The timesteps `[num_steps]` (descending) that a sampler visits, with trailing spacing (module docstring)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be between 1 and the schedule's {num_timesteps} timesteps, got {num_steps}")
    steps = np.round(num_timesteps - np.arange(num_steps) * (num_timesteps / num_steps)).astype(np.int32) - 1
    assert len(np.unique(steps)) == num_steps and steps[0] == num_timesteps - 1 and steps[-1] >= 0
    return steps


def sample(
    predict_fn: PredictFn,
    shape: tuple[int, ...],
    rng: jax.Array,
    *,
    schedule: Schedule,
    method: str = "ddim",
    num_steps: int,
    eta: float = 0.0,
    clip_x0: float | None = None,
) -> jax.Array:
    """Draws samples of `shape` (`[B, ...]`) from pure noise with `num_steps` model evaluations; returns x0, float32.

    method "ddim" (Song et al. 2021, Eq. 12): x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z
        with sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev) (Eq. 16): eta = 0 is the
        deterministic sampler, eta = 1 the ancestral one (identical to "ddpm" below, step for step).
    method "ddpm" (Ho et al. 2020, Algorithm 2): x_prev is drawn from the posterior q(x_prev | x_t, x0) (Eqs. 6-7)
        with x0 predicted; with num_steps < T it is the posterior of the respaced chain whose betas are
        1 - ab_t / ab_prev (Nichol & Dhariwal 2021, Sec. 4). `eta` does not apply and is ignored.
    Here ab is alpha-bar and ab_prev = 1 on the last step. `rng` is split into the starting noise and one key per
    step (`fold_in(key, step)`); a step adds noise only if its standard deviation is above zero (never the last).
    `clip_x0`, if given, clips the predicted x0 to [-clip_x0, clip_x0] (and recomputes eps to match) before each
    update; by default nothing is clipped. `method`, `num_steps`, `eta` and `clip_x0` are Python values (static
    under jit).
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose one of {METHODS}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    timesteps = sampling_timesteps(schedule.num_timesteps, num_steps)
    previous = previous_timesteps(timesteps)
    init_key, noise_key = split_key(rng)

    def step(i: jax.Array, x: jax.Array) -> jax.Array:
        t, t_prev = jnp.asarray(timesteps)[i], jnp.asarray(previous)[i]
        return denoise_step(
            predict_fn, x, i, t, t_prev, noise_key, schedule=schedule, method=method, eta=eta, clip_x0=clip_x0
        )

    return lax.fori_loop(0, num_steps, step, initial_noise(init_key, shape))


def previous_timesteps(timesteps: np.ndarray) -> np.ndarray:
    """The timestep each step moves to: the next one visited, and -1 ("x0") after the last."""
    return np.append(timesteps[1:], -1).astype(np.int32)


def split_key(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A sample's key -> (the key of its starting noise, the key its steps' noise is folded from)."""
    init_key, noise_key = jax.random.split(rng)
    return init_key, noise_key


def initial_noise(init_key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """x_T: the pure noise a sample starts from."""
    return jax.random.normal(init_key, shape, jnp.float32)


def denoise_step(
    predict_fn: PredictFn,
    x: jax.Array,
    i: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    noise_key: jax.Array,
    *,
    schedule: Schedule,
    method: str | jax.Array,
    eta: float | jax.Array = 0.0,
    clip_x0: float | None = None,
) -> jax.Array:
    """Step `i` of a sampler (see `sample`): from x at timestep `t` to timestep `t_prev` (-1 on the last step).

    `i`, `t` and `t_prev` may be traced scalars, so one compiled step serves every step of every step count; so may
    `eta`. `method` is a name of METHODS, or a traced index into METHODS (both updates are computed and one is kept:
    they are a few elementwise operations against the model's forward pass). The step's noise is
    `fold_in(noise_key, i)`.
    """
    batch = x.shape[0]
    last = t_prev < 0  # the final step, to x0, where alpha-bar is 1
    prev_index = jnp.maximum(t_prev, 0)
    # (a, s) = (sqrt(alpha-bar), sqrt(1 - alpha-bar)) now and at the previous timestep.
    a_t, s_t = schedule.sqrt_alphas_cumprod[t], schedule.sqrt_one_minus_alphas_cumprod[t]
    a_prev = jnp.where(last, 1.0, schedule.sqrt_alphas_cumprod[prev_index])
    s_prev = jnp.where(last, 0.0, schedule.sqrt_one_minus_alphas_cumprod[prev_index])
    t_batch = jnp.full((batch,), t, jnp.int32)
    x0, eps = predict_x0_and_eps(schedule, predict_fn(x, t_batch).astype(jnp.float32), x, t_batch)
    if clip_x0 is not None:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
        eps = (x - a_t * x0) / s_t
    z = jax.random.normal(jax.random.fold_in(noise_key, i), x.shape, jnp.float32)
    if isinstance(method, str):
        if method == "ddim":
            return _ddim_update(x0, eps, z, a_t, s_t, a_prev, s_prev, eta)
        return _posterior_update(x, x0, z, a_t, s_t, a_prev, s_prev)
    ddim = _ddim_update(x0, eps, z, a_t, s_t, a_prev, s_prev, eta)
    ddpm = _posterior_update(x, x0, z, a_t, s_t, a_prev, s_prev)
    return jnp.where(method == METHODS.index("ddpm"), ddpm, ddim)


def _ddim_update(
    x0: jax.Array,
    eps: jax.Array,
    z: jax.Array,
    a_t: jax.Array,
    s_t: jax.Array,
    a_prev: jax.Array,
    s_prev: jax.Array,
    eta: float | jax.Array,
) -> jax.Array:
    """Song et al. 2021, Eq. 12 with sigma from Eq. 16; a = sqrt(alpha-bar), s = sqrt(1 - alpha-bar)."""
    sigma = eta * (s_prev / s_t) * jnp.sqrt(1.0 - (a_t / a_prev) ** 2)
    # max(., 0) only guards rounding; for eta <= 1 the argument is >= 0 exactly.
    direction = jnp.sqrt(jnp.maximum(s_prev**2 - sigma**2, 0.0))
    return a_prev * x0 + direction * eps + sigma * z


def _posterior_update(
    x: jax.Array,
    x0: jax.Array,
    z: jax.Array,
    a_t: jax.Array,
    s_t: jax.Array,
    a_prev: jax.Array,
    s_prev: jax.Array,
) -> jax.Array:
    """A draw from q(x_prev | x_t, x0) = N(mu-tilde, beta-tilde) (Ho et al. 2020, Eqs. 6-7) of the chain whose one
    step from x_prev to x_t has alpha = (a_t / a_prev)^2 and beta = 1 - alpha."""
    alpha = (a_t / a_prev) ** 2
    beta = 1.0 - alpha
    mean = (a_prev * beta * x0 + jnp.sqrt(alpha) * s_prev**2 * x) / s_t**2
    variance = beta * s_prev**2 / s_t**2  # 0 on the last step, where s_prev = 0
    return mean + jnp.sqrt(variance) * z


def guided_predict_fn(
    apply_fn: Callable[..., jax.Array],
    params: Any,
    condition: Mapping[str, jax.Array],
    guidance_scale: float | jax.Array,
    null: Mapping[str, jax.Array] | None = None,
) -> PredictFn:
    """A `predict_fn` with classifier-free guidance: uncond + guidance_scale * (cond - uncond).

    `apply_fn` is the U-Net's flax `apply`, called as `apply_fn({"params": params}, x, t, text_pooled=...,
    text_tokens=..., text_mask=..., train=False)`. `condition` holds "text_pooled", "text_tokens" and "text_mask" for
    the batch being sampled; `null` defaults to `null_condition(condition)`, the condition training dropped to. A
    negative prompt's condition passed as `null` steers away from that prompt instead of from "no text" (the
    negative prompts of Stable Diffusion front ends).
    Conditional and unconditional outputs come from ONE forward pass over the batch concatenated with itself.
    The scale is 1 + w in Ho & Salimans 2022, Eq. 6 (scale 1: no guidance). The combination is taken in the
    model's prediction space; as an affine combination with weights summing to one, it is the same as combining the
    implied eps (or x0 or v), because the conversions between them are affine in the output for a given x_t.
    """
    null = null_condition(condition) if null is None else null
    both = {key: jnp.concatenate([condition[key], null[key]]) for key in CONDITION_KEYS}

    def predict(x_t: jax.Array, t: jax.Array) -> jax.Array:
        out = apply_fn({"params": params}, jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), **both, train=False)
        cond, uncond = jnp.split(out, 2)
        return uncond + guidance_scale * (cond - uncond)

    return predict
