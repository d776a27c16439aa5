"""`factorized_vs_full_attention_memory`: peak temporary memory of the U-Net's factorised space-time attention block
divided by that of the same block with full spatio-temporal self-attention, forward + backward, at 16 x 64 x 64.

    python -m bench.attention_memory [--quick] [--config configs/tgif64.py]

The factorised side is the product's `model.layers.FactorizedAttentionBlock` (spatial self-attention within each
frame, temporal self-attention across frames at each pixel, cross-attention to the text tokens). yagg has no
full-attention mode, so the full side is built here from the product's own pieces: `FullAttentionBlock` below is the
same block with its spatial and temporal self-attentions replaced by one `model.layers.Attention` over the flattened
F*H*W sequence (its `layer_norm`, residual and cross-attention are the factorised block's). It is what a model
without the factorisation would run, and it exists only for this comparison.

Width and heads are those of configs/tgif64.py at its first level with attention: tgif64 has none at 64 x 64 (its
attention_resolutions are 16 and 8), so the first one is the 16 x 16 level, channels x channel_mults[2] = 384 wide,
384 / head_dim 64 = 6 heads; the block is applied to a batch of one 16 x 64 x 64 x 384 activation in the config's
compute dtype, with the config's 77 text tokens. Each side is `jax.jit(jax.grad(...)).lower(...).compile()` of the
sum of the block's output, differentiated with respect to its parameters and its input, and the figure is XLA's
`memory_analysis().temp_size_in_bytes` of the compiled program: nothing is run, which is the point (full attention's
logits alone at 65,536 positions are 65,536^2 x 6 heads x 4 bytes = 103 GB).
"""

from __future__ import annotations

import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from bench.common import Metric, write_metrics
from bench.train_mfu import load, parse_config_args, reproduce_command
from model.build import DTYPES
from model.layers import Attention, FactorizedAttentionBlock, constrain_video, layer_norm

DEFAULT_CONFIG = "configs/tgif64.py"
FRAMES, SIZE = 16, 64


class FullAttentionBlock(nn.Module):
    """FactorizedAttentionBlock with full self-attention over all F*H*W positions in place of its spatial and temporal
    self-attentions (benchmark only: the comparison unit for `factorized_vs_full_attention_memory`)."""

    head_dim: int = 64
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, text_tokens: jax.Array, text_mask: jax.Array) -> jax.Array:
        b, f, h, w, c = x.shape
        heads = c // self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(self.dtype)

        y = layer_norm("full_norm", **kw)(x).reshape(b, f * h * w, c)
        y = Attention(heads, self.head_dim, name="full_attn", **kw)(y, y)
        x = x + y.reshape(b, f, h, w, c)

        y = layer_norm("cross_norm", **kw)(x).reshape(b, f * h * w, c)
        y = Attention(heads, self.head_dim, kv_axis="text_embed", name="cross_attn", **kw)(
            y, text_tokens, mask=text_mask
        )
        has_text = jnp.any(text_mask > 0, axis=-1).astype(self.dtype)
        x = x + has_text[:, None, None, None, None] * y.reshape(b, f, h, w, c)
        return constrain_video(x)


def first_attention_level(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(level, width) of the first U-Net level whose feature-map height is in attention_resolutions."""
    m = config.model
    for level, mult in enumerate(m.channel_mults):
        if config.data.size // 2**level in m.attention_resolutions:
            return level, int(m.channels) * int(mult)
    raise ValueError(f"no level of {config.data.size}px frames has attention ({m.attention_resolutions})")


def compiled_temp_bytes(block: nn.Module, x: jax.ShapeDtypeStruct, tokens: Any, mask: Any) -> tuple[int, float]:
    """(temporary bytes, compile seconds) of the block's forward + backward, compiled for abstract inputs."""
    params = jax.eval_shape(block.init, jax.random.PRNGKey(0), x, tokens, mask)

    def loss(params: Any, x: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        return jnp.sum(block.apply(params, x, tokens, mask).astype(jnp.float32))

    start = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, tokens, mask).compile()
    return compiled.memory_analysis().temp_size_in_bytes, time.perf_counter() - start


def main() -> None:
    args, overrides = parse_config_args(__doc__.split("\n")[0], DEFAULT_CONFIG)
    config = load(args.config, overrides)
    m, d = config.model, config.data
    level, width = first_attention_level(config)
    dtype, param_dtype = DTYPES[m.dtype], DTYPES[m.param_dtype]
    x = jax.ShapeDtypeStruct((1, FRAMES, SIZE, SIZE, width), dtype)
    tokens = jax.ShapeDtypeStruct((1, d.text_max_length, d.text_token_dim), dtype)
    mask = jax.ShapeDtypeStruct((1, d.text_max_length), jnp.bool_)
    factorized = FactorizedAttentionBlock(
        int(m.head_dim), int(m.max_relative_distance), dtype=dtype, param_dtype=param_dtype
    )
    full = FullAttentionBlock(int(m.head_dim), dtype=dtype, param_dtype=param_dtype)
    fact_bytes, fact_seconds = compiled_temp_bytes(factorized, x, tokens, mask)
    full_bytes, full_seconds = compiled_temp_bytes(full, x, tokens, mask)
    metric = Metric(
        name="factorized_vs_full_attention_memory",
        value=fact_bytes / full_bytes,
        goal="<= 0.10",
        command=reproduce_command("bench.attention_memory", args, overrides, DEFAULT_CONFIG),
        details={
            "config": args.config,
            "activation": f"1 x {FRAMES} x {SIZE} x {SIZE} x {width} ({m.dtype})",
            "width_from": f"level {level} ({d.size // 2**level}x{d.size // 2**level} maps in {args.config}), the "
            "first with attention",
            "heads": width // int(m.head_dim),
            "head_dim": int(m.head_dim),
            "text_tokens": int(d.text_max_length),
            "temp_bytes": {"factorized": fact_bytes, "full": full_bytes},
            "temp_gib": {"factorized": fact_bytes / 2**30, "full": full_bytes / 2**30},
            "compile_seconds": {"factorized": fact_seconds, "full": full_seconds},
            "backend": jax.default_backend(),
        },
        unit="ratio of temporary bytes",
    )
    write_metrics([metric], args.json)


if __name__ == "__main__":
    main()
