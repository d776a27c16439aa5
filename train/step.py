"""The train step: one pure function `(state, batch, rng) -> (state, metrics)`, jitted with explicit shardings.

Everything random in a step comes from `fold_in(rng, state.step)`: the same key for step s in every run, every
process layout and after any resume. With jax's partitionable threefry (the default) the noise drawn for a global
[B, ...] array does not depend on how the batch is split over devices either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from contracts.conditioning import model_condition
from contracts.media import frames_to_model
from model.diffusion import diffusion_loss
from parallel import mesh as mesh_lib
from train.state import TrainState, ema_update

# Per-timestep-bucket losses: the loss at small t (fine detail) and large t (layout, motion) move differently, and a
# single mean hides which one a change helped.
NUM_T_BUCKETS = 4


def _bucket_stats(per_example: jax.Array, t: jax.Array, num_timesteps: int) -> tuple[jax.Array, jax.Array]:
    bucket = jnp.clip(t * NUM_T_BUCKETS // num_timesteps, 0, NUM_T_BUCKETS - 1)
    one_hot = jax.nn.one_hot(bucket, NUM_T_BUCKETS, dtype=jnp.float32)
    return one_hot.T @ per_example.astype(jnp.float32), one_hot.sum(axis=0)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    model: nn.Module,
    schedule: Any,
    tx: optax.GradientTransformation,
    learning_rate: optax.Schedule,
    ema_decay: float,
    loss_kwargs: dict[str, Any],
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on one global batch; returns the new state and this step's metrics (replicated)."""
    key = jax.random.fold_in(rng, state.step)
    loss_key, dropout_key = jax.random.split(key)
    x0 = frames_to_model(batch["frames"])
    cond = model_condition(batch)

    def loss_fn(params: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        return diffusion_loss(
            model.apply, params, schedule, x0, cond, loss_key, rngs={"dropout": dropout_key}, **loss_kwargs
        )

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    bucket_sum, bucket_count = _bucket_stats(aux["per_example_loss"], aux["t"], schedule.num_timesteps)
    metrics = {
        "loss": loss,
        "grad_norm": optax.global_norm(grads),  # before clipping: spikes here are what clipping hides
        "param_norm": optax.global_norm(params),
        "learning_rate": learning_rate(state.step),
        "bucket_loss_sum": bucket_sum,
        "bucket_count": bucket_count,
    }
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        ema_params=ema_update(state.ema_params, params, state.step, ema_decay),
    )
    return new_state, metrics


def jit_train_step(
    step_fn: Callable[..., tuple[TrainState, dict[str, jax.Array]]],
    state_shardings: TrainState,
    batch_fields: tuple[str, ...],
    mesh: Mesh,
) -> Callable[[TrainState, dict[str, jax.Array], jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """`step_fn` jitted: state in its own shardings (donated: updated in place), batch split over all devices."""
    batch_sharding = {name: mesh_lib.batch_sharding(mesh) for name in batch_fields}
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding, mesh_lib.replicated(mesh)),
        out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
        donate_argnums=0,
    )
