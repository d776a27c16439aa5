"""The train state, the optimizer, and creating both already sharded over the mesh.

The state is a plain pytree of arrays (no functions inside), so Orbax saves it as it is and eval can restore it
without the optimizer. The model and optimizer are passed to the step separately.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from jax.sharding import Mesh

from parallel import mesh as mesh_lib


class TrainState(struct.PyTreeNode):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    ema_params: Any  # exponential moving average of params; samples and eval use these


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    warmup = int(opt.warmup_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=float(opt.learning_rate),
        warmup_steps=warmup,
        decay_steps=max(int(total_steps), warmup + 1),
        end_value=0.0,
    )


def weight_decay_mask(params: Any) -> Any:
    """True for conv and dense kernels only.

    Biases, normalisation scales and embedding tables get no decay: shrinking them towards 0 only fights the
    normalisation (scales) or pulls rare tokens' and timesteps' embeddings together (tables), it does not regularise.
    """

    def decays(path: tuple, leaf: Any) -> bool:
        return getattr(path[-1], "key", None) == "kernel"

    # The mask is built on unboxed params; it is a prefix of the boxed tree (a box sits where an array would).
    return jax.tree_util.tree_map_with_path(decays, nn.unbox(params))


def make_optimizer(
    opt: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with warmup + cosine, global-norm gradient clipping and decoupled weight decay on kernels only."""
    schedule = learning_rate_schedule(opt, total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(float(opt.grad_clip_norm)),
        optax.adamw(
            schedule,
            b1=float(opt.b1),
            b2=float(opt.b2),
            weight_decay=float(opt.weight_decay),
            mask=weight_decay_mask,
        ),
    )
    return tx, schedule


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
    """EMA with the usual warmup: decay min(decay, (1 + s) / (10 + s)), so early EMA params follow training quickly
    instead of staying near the random initialisation for ~1/(1 - decay) steps."""
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step)).astype(jnp.float32)
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p.astype(jnp.float32)).astype(e.dtype), ema, params)


@dataclasses.dataclass(frozen=True)
class StatePlan:
    """Where every leaf of the train state lives; built from shapes only, before any parameter exists."""

    shardings: TrainState  # NamedSharding per leaf (parameters by their logical axis names, the rest replicated)
    abstract: TrainState  # ShapeDtypeStructs carrying those shardings: what Orbax restores into
    _init: Callable[[jax.Array], TrainState]

    def create(self, key: jax.Array) -> TrainState:
        """Initialises the state directly into its shardings: each device computes only its own shards."""
        return self._init(key)


def plan_state(
    init_params: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: tuple[tuple[str, Any], ...],
) -> StatePlan:
    """`init_params(key)` returns the model's params with logical axis names (boxed)."""

    def init_boxed(key: jax.Array) -> TrainState:
        params = init_params(key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema_params=params)

    abstract, shardings = mesh_lib.plan(init_boxed, mesh, rules)
    jitted = jax.jit(lambda key: nn.unbox(init_boxed(key)), out_shardings=shardings)

    def init(key: jax.Array) -> TrainState:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(key)

    return StatePlan(shardings=shardings, abstract=abstract, _init=init)
