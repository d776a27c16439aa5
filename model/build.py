"""The one place where a config becomes modules and schedules: `build_unet(config)`, `build_schedule(config)`.

Models take plain hyperparameters (model/unet.py); everything that reads `config.model` or `config.diffusion` goes
through here, so a config mistake is reported once, in config terms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from model.diffusion import Schedule, make_schedule
from model.unet import CONV_MODES, UNetConditional3D

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _dtype(field: str, value: str) -> jnp.dtype:
    if value not in DTYPES:
        raise ValueError(f"config.model.{field} must be one of {sorted(DTYPES)}, got {value!r}")
    return DTYPES[value]


def build_unet(config: ml_collections.ConfigDict) -> UNetConditional3D:
    """The U-Net of `config.model`, checked against the clip size in `config.data`."""
    m = config.model
    if m.conv_mode not in CONV_MODES:
        raise ValueError(f"config.model.conv_mode must be one of {CONV_MODES}, got {m.conv_mode!r}")
    mults = tuple(int(k) for k in m.channel_mults)
    factor = 2 ** (len(mults) - 1)
    if config.data.size % factor:
        raise ValueError(
            f"config.data.size={config.data.size} must be divisible by {factor}: the U-Net halves it "
            f"{len(mults) - 1} times (one fewer than the {len(mults)} entries of config.model.channel_mults)"
        )
    widths = {int(m.channels) * k for k in mults}
    if any(w % m.head_dim for w in widths):
        raise ValueError(
            f"config.model.head_dim={m.head_dim} must divide every level's width {sorted(widths)} "
            "(channels x channel_mults), which attention splits into heads"
        )
    return UNetConditional3D(
        channels=int(m.channels),
        channel_mults=mults,
        num_res_blocks=int(m.num_res_blocks),
        attention_resolutions=tuple(int(r) for r in m.attention_resolutions),
        head_dim=int(m.head_dim),
        max_relative_distance=int(m.max_relative_distance),
        dropout=float(m.dropout),
        conv_mode=m.conv_mode,
        norm_groups=int(m.norm_groups),
        dtype=_dtype("dtype", m.dtype),
        param_dtype=_dtype("param_dtype", m.param_dtype),
        remat=bool(m.remat),
    )


def build_schedule(config: ml_collections.ConfigDict) -> Schedule:
    """The noise schedule of `config.diffusion` (model/diffusion.py::make_schedule)."""
    d = config.diffusion
    return make_schedule(d.schedule, num_timesteps=int(d.num_timesteps), prediction_type=d.prediction_type)


def example_inputs(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract U-Net inputs of the configured shapes (for `init` under `jax.eval_shape`, and for lowering)."""
    d = config.data
    return {
        "x": jax.ShapeDtypeStruct((batch_size, d.frames, d.size, d.size, 3), jnp.float32),
        "t": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
        "text_pooled": jax.ShapeDtypeStruct((batch_size, d.text_embed_dim), jnp.float32),
        "text_tokens": jax.ShapeDtypeStruct((batch_size, d.text_max_length, d.text_token_dim), jnp.float32),
        "text_mask": jax.ShapeDtypeStruct((batch_size, d.text_max_length), jnp.bool_),
    }


def params_initializer(model: nn.Module, config: ml_collections.ConfigDict) -> Callable[[jax.Array], Any]:
    """init(key) -> the model's parameters with their logical axis names (boxed), traced on one example of the
    configured shapes. Training initialises from it; readers use it under `jax.eval_shape`, for shapes only."""
    inputs = example_inputs(config, batch_size=1)

    def init(key: jax.Array) -> Any:
        params_key, dropout_key = jax.random.split(key)
        zeros = {name: jnp.zeros(spec.shape, spec.dtype) for name, spec in inputs.items()}
        return model.init({"params": params_key, "dropout": dropout_key}, **zeros, train=False)["params"]

    return init
