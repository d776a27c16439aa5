"""Gaussian diffusion: noise schedules, conversions between prediction types, the null condition, the training loss.

Notation. Timesteps are integers t in [0, T). `alphas_cumprod[t]` is DDPM's alpha-bar_{t+1} (Ho et al. 2020): index 0
is the first, least noisy step, index T - 1 the last. With a_t = sqrt(alpha-bar_t) and s_t = sqrt(1 - alpha-bar_t),
the forward process is x_t = a_t x0 + s_t eps, eps ~ N(0, I) (Ho et al. 2020, Eq. 4). A model predicts one of
  eps   the noise                          (Ho et al. 2020)
  x0    the clean sample
  v     a_t eps - s_t x0                   (Salimans & Ho 2022, Sec. 4)
and `predict_x0_and_eps` / `training_target` convert exactly between them given x_t.

Everything is a pure function of an immutable `Schedule` pytree, so it can be closed over or passed through `jit`.
Sampling is in model/sampling.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

SCHEDULES = ("linear", "cosine")
PREDICTION_TYPES = ("eps", "v", "x0")
# The keys of a text condition, as named in the records and batches (contracts/records.py).
CONDITION_KEYS = ("text_pooled", "text_tokens", "text_mask")


@struct.dataclass
class Schedule:
    """A noise schedule: per-timestep arrays for t in [0, T) (float32), and what the model predicts.

    `sqrt_alphas_cumprod` and `sqrt_one_minus_alphas_cumprod` (a_t and s_t) are computed in float64 before rounding:
    1 - alpha-bar_t from a float32 alpha-bar_t ~ 0.9999 would keep only three digits of s_t at small t.
    `prediction_type` and `name` are static metadata (not traced), so a function may branch on them under jit.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    prediction_type: str = struct.field(pytree_node=False)
    name: str = struct.field(pytree_node=False)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def make_schedule(name: str, num_timesteps: int = 1000, prediction_type: str = "eps") -> Schedule:
    """The named schedule with `num_timesteps` steps, for a model predicting `prediction_type`.

    linear: betas from 1e-4 to 0.02 at T = 1000 (Ho et al. 2020, Sec. 4), both ends scaled by 1000 / T so that other
        step counts cover the same range of noise levels (Nichol & Dhariwal 2021, as in their code).
    cosine: alpha-bar(t) = f(t) / f(0), f(t) = cos(((t / T + s) / (1 + s)) * pi / 2)^2 with s = 0.008, and betas
        1 - alpha-bar(t) / alpha-bar(t - 1) clipped to at most 0.999 (Nichol & Dhariwal 2021, Eq. 17).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {SCHEDULES}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}; choose one of {PREDICTION_TYPES}")
    if int(num_timesteps) != num_timesteps or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")
    num_timesteps = int(num_timesteps)
    # Computed in float64, stored in float32: cumulative products of 1000 factors lose digits in float32.
    if name == "linear":
        scale = 1000.0 / num_timesteps
        betas = np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    else:
        s = 0.008
        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    alphas_cumprod = np.cumprod(1.0 - betas)
    return Schedule(
        betas=jnp.asarray(betas, jnp.float32),
        alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
        sqrt_alphas_cumprod=jnp.asarray(np.sqrt(alphas_cumprod), jnp.float32),
        sqrt_one_minus_alphas_cumprod=jnp.asarray(np.sqrt(1.0 - alphas_cumprod), jnp.float32),
        prediction_type=prediction_type,
        name=name,
    )


def _at(values: jax.Array, t: jax.Array, like: jax.Array) -> jax.Array:
    """values[t] for t `[B]`, shaped `[B, 1, ..., 1]` to broadcast against `like` `[B, ...]`."""
    return values[t].reshape(t.shape + (1,) * (like.ndim - t.ndim))


def _coefficients(schedule: Schedule, t: jax.Array, like: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(a_t, s_t) = (sqrt(alpha-bar_t), sqrt(1 - alpha-bar_t)), broadcastable against `like`."""
    return _at(schedule.sqrt_alphas_cumprod, t, like), _at(schedule.sqrt_one_minus_alphas_cumprod, t, like)


def q_sample(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = a_t x0 + s_t eps, a sample of q(x_t | x0) (Ho et al. 2020, Eq. 4)."""
    a, s = _coefficients(schedule, t, x0)
    return a * x0 + s * noise


def training_target(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """What a perfect model outputs for x_t = q_sample(x0, noise, t), in the schedule's prediction type."""
    if schedule.prediction_type == "eps":
        return noise
    if schedule.prediction_type == "x0":
        return x0
    a, s = _coefficients(schedule, t, x0)
    return a * noise - s * x0  # v (Salimans & Ho 2022, Sec. 4)


def predict_x0_and_eps(
    schedule: Schedule, model_output: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The (x0, eps) a model output implies at x_t: the exact inverse of `training_target`.

    From x_t = a x0 + s eps with a^2 + s^2 = 1: given eps, x0 = (x_t - s eps) / a; given x0, eps = (x_t - a x0) / s;
    given v = a eps - s x0, x0 = a x_t - s v and eps = s x_t + a v.
    """
    a, s = _coefficients(schedule, t, x_t)
    if schedule.prediction_type == "eps":
        return (x_t - s * model_output) / a, model_output
    if schedule.prediction_type == "x0":
        return model_output, (x_t - a * model_output) / s
    return a * x_t - s * model_output, s * x_t + a * model_output


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio alpha-bar_t / (1 - alpha-bar_t) = (a_t / s_t)^2 at timesteps `t`."""
    return jnp.square(schedule.sqrt_alphas_cumprod[t] / schedule.sqrt_one_minus_alphas_cumprod[t])


def min_snr_weight(schedule: Schedule, t: jax.Array, gamma: float) -> jax.Array:
    """Min-SNR-gamma loss weights `[B]` for MSE in the schedule's prediction type (Hang et al. 2023).

    The method weights the x0 error by min(SNR, gamma). An error d in x0 is an error SNR^(1/2) d in eps and
    (SNR + 1)^(1/2) d in v (from the conversions in `predict_x0_and_eps`), so the same weighting on those targets is
    min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v.
    """
    ratio = snr(schedule, t)
    clipped = jnp.minimum(ratio, gamma)
    if schedule.prediction_type == "eps":
        return clipped / ratio
    if schedule.prediction_type == "v":
        return clipped / (ratio + 1.0)
    return clipped


def null_condition(condition: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The "no text" condition of classifier-free guidance (Ho & Salimans 2022), shaped like `condition`.

    It is zeros for the pooled and token embeddings and an all-zero mask. The U-Net's cross-attention then adds
    nothing (model/layers.py::FactorizedAttentionBlock) and the pooled projection contributes only its bias. Training
    (condition dropout in `diffusion_loss`) and sampling (model/sampling.py::guided_predict_fn) both use this
    function, so the two always agree on what "unconditional" means.
    """
    return {key: jnp.zeros_like(condition[key]) for key in CONDITION_KEYS}


def drop_condition(condition: Mapping[str, jax.Array], rng: jax.Array, prob: float) -> dict[str, jax.Array]:
    """Replaces each example's condition by the null condition with probability `prob` (CFG training)."""
    batch = condition["text_pooled"].shape[0]
    drop = jax.random.bernoulli(rng, prob, (batch,))
    null = null_condition(condition)
    return {
        key: jnp.where(drop.reshape((batch,) + (1,) * (condition[key].ndim - 1)), null[key], condition[key])
        for key in CONDITION_KEYS
    }


def denoising_loss(
    apply_fn: Callable[..., jax.Array],
    params: Any,
    schedule: Schedule,
    x0: jax.Array,
    condition: Mapping[str, jax.Array],
    t: jax.Array,
    noise: jax.Array,
    *,
    train: bool,
    min_snr_gamma: float | None = None,
    rngs: Mapping[str, jax.Array] | None = None,
) -> jax.Array:
    """The per-example loss `[B]` of denoising x_t = q_sample(x0, noise, t): the MSE between the model output and
    `training_target` (Ho et al. 2020, Eq. 14, for eps; the same form for x0 and v), optionally weighted by
    `min_snr_weight`. Training (`diffusion_loss`) and the validation loss (eval) both compute it here."""
    x_t = q_sample(schedule, x0, noise, t)
    output = apply_fn({"params": params}, x_t, t, **condition, train=train, rngs=rngs)
    target = training_target(schedule, x0, noise, t)
    per_example = jnp.mean(jnp.square(output.astype(jnp.float32) - target), axis=tuple(range(1, x0.ndim)))
    if min_snr_gamma is not None:
        per_example = per_example * min_snr_weight(schedule, t, min_snr_gamma)
    return per_example


def diffusion_loss(
    apply_fn: Callable[..., jax.Array],
    params: Any,
    schedule: Schedule,
    x0: jax.Array,
    condition: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    cond_drop_prob: float,
    min_snr_gamma: float | None = None,
    rngs: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training loss on one batch: (mean loss, aux with "per_example_loss" `[B]` and "t" `[B]`).

    `apply_fn` is the U-Net's flax `apply`, called as `apply_fn({"params": params}, x_t, t, text_pooled=...,
    text_tokens=..., text_mask=..., train=True, rngs=rngs)` (`rngs` carries the dropout key). `x0` is the clean batch
    in [-1, 1]; `condition` holds "text_pooled", "text_tokens" and "text_mask". Timesteps are uniform over [0, T)
    and the loss is `denoising_loss`. Each example's condition is replaced by `null_condition` with probability
    `cond_drop_prob`, which trains the unconditional model that classifier-free guidance needs (Ho & Salimans 2022,
    Algorithm 1).
    """
    t_key, noise_key, drop_key = jax.random.split(rng, 3)
    batch = x0.shape[0]
    t = jax.random.randint(t_key, (batch,), 0, schedule.num_timesteps)
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    condition = drop_condition(condition, drop_key, cond_drop_prob)
    per_example = denoising_loss(
        apply_fn, params, schedule, x0, condition, t, noise, train=True, min_snr_gamma=min_snr_gamma, rngs=rngs
    )
    return jnp.mean(per_example), {"per_example_loss": per_example, "t": t}
