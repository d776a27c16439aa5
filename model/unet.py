"""The text-conditional 3D U-Net that denoises videos.

`UNetConditional3D(x, t, text_pooled, text_tokens, text_mask, train=...)` maps a noisy clip `x` `[B, F, H, W, C]`
(channels last), integer timesteps `t` `[B]` and the frozen CLIP text embeddings (pooled `[B, P]`, tokens
`[B, L, D]`, mask `[B, L]`) to an output of `x`'s shape, in whatever prediction type the diffusion schedule says
(model/diffusion.py). The layout is ADM's (Dhariwal & Nichol 2021) made 3-D as in Video Diffusion Models (Ho et al.
2022): residual blocks and factorized space-time attention at each level, spatial-only down/upsampling (so F = 1, a
batch of images, works and frames are never mixed by striding), skip connections by concatenation. Text enters twice:
the pooled embedding is added to the time embedding that every ResnetBlock3D receives, and the token embeddings are
attended to by every FactorizedAttentionBlock.

Where things are, in space and time, is given to the network rather than left for it to infer. The first convolution
sees two extra input channels, the pixel's row and column scaled to [-1, 1] (CoordConv, Liu et al. 2018), and the
conditioning vector is per frame: time + pooled text + a projection of the frame index's sinusoidal embedding, so
each ResnetBlock3D scales and shifts each frame differently. Without them the only cues to absolute position are the
zero padding at the borders (in space) and at the clip's ends (in time), and a caption's motion, "the shape is here
in frame 0 and there in frame 7", is a function of exactly those. On the moving-shapes demo they took the shapes
probe's direction accuracy from chance to well above it within the same 600 CPU steps (README, "What the demo
learns").

Logical axis names. Every parameter and the main activations carry names; the trainer maps them to mesh axes with
`config.sharding_rules` (configs/base.py) and nothing here knows about meshes.
  activations  batch, frames, height, width, channels        the video stream between blocks
  conv kernels conv_t, conv_h, conv_w, conv_in, conv_out     every kernel is 5-D, (kt, kh, kw, in, out)
  conv biases  conv_out
  image_channels                                              the image side of conv_in (RGB + row, col) and conv_out
  norms        norm                                           GroupNorm / LayerNorm scale and bias
  attention    embed, heads, head_dim                         query/key/value (embed, heads, head_dim); out reversed
               text_embed                                     the token-embedding side of cross-attention keys/values
               rel_pos                                        the temporal relative-position table (rel_pos, heads)
  embeddings   mlp                                            hidden width of the timestep MLP; the frame-index
                                                              side of its projection
               cond_embed                                     the time + pooled-text + frame conditioning vector
               text_embed                                     the pooled-text side of its projection

Convolution implementations were chosen by timing forward + backward under jit on the 2-core development CPU (shared,
so the minimum of 5 runs): for each variant `conv`, `jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(jnp.sin(conv(x,
k))), (0, 1)))` on random float32 `x` [B, F, H, W, C] and kernel `k`, C -> C channels. Milliseconds:
  kernel   variant                                  32x8x16x16x16  32x8x16x16x32  32x8x8x8x64  8x8x32x32x64
  (1,3,3)  5-D lax conv                                  128            324           172           725
           frames folded into the batch, 2-D conv         49            174            97           916
           9 shifted copies concatenated, one matmul     108            260           172           633
           sum of 9 shifted matmuls                      124            285           215           739
  (3,3,3)  5-D lax conv                                  317            851           430          1860
           27 shifted copies concatenated, one matmul    330            377           368           820
  kernel   variant                                  32x8x16x16x32  8x8x32x32x64  4x16x32x32x64  2x16x16x16x256
  (3,1,1)  5-D lax conv                                   77            174           294           133
           sum of 3 frame-shifted matmuls                 60            155           310           132
           (H, W) folded into the batch, 1-D conv         33            111           227           175
Kept (model/layers.py::Conv3D): the folded 2-D convolution for (1,3,3), 2-3x faster at the demo's sizes (the only
ones a CPU trains; accelerators run larger maps through their own convolution kernels); the folded 1-D convolution
for (3,1,1), fastest in three of four; the 5-D convolution for (3,3,3): the concatenated variant is faster on larger
maps but holds 27 copies of every activation, which no accelerator's memory should pay for.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.layers import (
    Conv3D,
    Dense,
    Downsample,
    Dtype,
    FactorizedAttentionBlock,
    ResnetBlock3D,
    SinusoidalPosEmb,
    Upsample,
    constrain_video,
    group_norm,
)

CONV_MODES = ("full3d", "factorized")


class UNetConditional3D(nn.Module):
    """A text-conditional video U-Net; see the module docstring for the layout and axis names."""

    channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 2
    # A level gets a FactorizedAttentionBlock after each residual block when its feature map's height is listed
    # here (for 64x64 inputs and four levels the heights are 64, 32, 16, 8). The middle always has one.
    attention_resolutions: tuple[int, ...] = (16, 8)
    head_dim: int = 64
    max_relative_distance: int = 32
    dropout: float = 0.0
    conv_mode: str = "factorized"
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # Rematerialise each residual and attention block in the backward pass: activation memory for compute.
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        text_pooled: jax.Array,
        text_tokens: jax.Array,
        text_mask: jax.Array,
        *,
        train: bool,
    ) -> jax.Array:
        assert self.conv_mode in CONV_MODES, f"conv_mode must be one of {CONV_MODES}, got {self.conv_mode!r}"
        height, width, image_channels = x.shape[2:]
        factor = 2 ** (len(self.channel_mults) - 1)
        assert height % factor == 0 and width % factor == 0, (
            f"{height}x{width} frames do not halve {len(self.channel_mults) - 1} times"
        )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # Static argnums count `self` as 0: (x, emb, train) are 1, 2, 3.
        resnet_cls = nn.remat(ResnetBlock3D, static_argnums=(3,)) if self.remat else ResnetBlock3D
        attn_cls = nn.remat(FactorizedAttentionBlock) if self.remat else FactorizedAttentionBlock

        def resnet(features: int, name: str) -> nn.Module:
            return resnet_cls(features, self.conv_mode, self.dropout, self.norm_groups, name=name, **kw)

        def attention(name: str) -> nn.Module:
            return attn_cls(self.head_dim, self.max_relative_distance, name=name, **kw)

        emb = self._conditioning(t, text_pooled, num_frames=x.shape[1])
        text_tokens = text_tokens.astype(self.dtype)

        # The pixel-side convolutions are per frame in both modes (all temporal modelling happens in between); in
        # factorized mode a (2+1)D conv_out would squeeze the features through 3 channels before its temporal part.
        h = Conv3D(self.channels, (1, 3, 3), in_axis="image_channels", name="conv_in", **kw)(_with_coordinates(x))
        h = constrain_video(h)
        skips = [h]
        for level, mult in enumerate(self.channel_mults):
            for i in range(self.num_res_blocks):
                h = resnet(self.channels * mult, f"down_{level}_res_{i}")(h, emb, train)
                if h.shape[2] in self.attention_resolutions:
                    h = attention(f"down_{level}_attn_{i}")(h, text_tokens, text_mask)
                skips.append(h)
            if level != len(self.channel_mults) - 1:
                h = constrain_video(Downsample(h.shape[-1], name=f"down_{level}_downsample", **kw)(h))
                skips.append(h)

        h = resnet(h.shape[-1], "mid_res_0")(h, emb, train)
        h = attention("mid_attn")(h, text_tokens, text_mask)
        h = resnet(h.shape[-1], "mid_res_1")(h, emb, train)

        for level, mult in reversed(list(enumerate(self.channel_mults))):
            # One more block than on the way down: it consumes the skip taken after the level's downsample.
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
                h = resnet(self.channels * mult, f"up_{level}_res_{i}")(h, emb, train)
                if h.shape[2] in self.attention_resolutions:
                    h = attention(f"up_{level}_attn_{i}")(h, text_tokens, text_mask)
            if level != 0:
                h = constrain_video(Upsample(h.shape[-1], name=f"up_{level}_upsample", **kw)(h))
        assert not skips, "every skip connection is consumed"

        h = nn.silu(group_norm(h.shape[-1], self.norm_groups, "norm_out", **kw)(h))
        # Zero-initialised (ADM): the untrained network predicts exactly 0 (the mean of every prediction target).
        out = Conv3D(image_channels, (1, 3, 3), zero_init=True, out_axis="image_channels", name="conv_out", **kw)(h)
        return constrain_video(out).astype(jnp.float32)

    def _conditioning(self, t: jax.Array, text_pooled: jax.Array, num_frames: int) -> jax.Array:
        """What every residual block receives, `[B, F, 4 x channels]`: MLP(sinusoid(t)) + linear(pooled text) +
        linear(sinusoid(frame index))."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = 4 * self.channels
        emb = SinusoidalPosEmb(self.channels, name="time_sinusoid")(t)
        emb = Dense(width, ("embed", "mlp"), name="time_mlp_0", **kw)(emb)
        emb = Dense(width, ("mlp", "cond_embed"), name="time_mlp_1", **kw)(nn.silu(emb))
        # The null condition's pooled vector is zeros, so its projection is the bias alone: a learned "no text" code.
        emb = emb + Dense(width, ("text_embed", "cond_embed"), name="text_pooled_proj", **kw)(text_pooled)
        frame = SinusoidalPosEmb(self.channels, name="frame_sinusoid")(jnp.arange(num_frames))
        frame = Dense(width, ("mlp", "cond_embed"), name="frame_proj", **kw)(frame)
        return emb[:, None, :] + frame[None, :, :]


def _with_coordinates(x: jax.Array) -> jax.Array:
    """`x` `[B, F, H, W, C]` with two channels appended: each pixel's row and column, scaled to [-1, 1]."""
    b, f, height, width, _ = x.shape
    rows, cols = jnp.meshgrid(jnp.linspace(-1.0, 1.0, height), jnp.linspace(-1.0, 1.0, width), indexing="ij")
    coords = jnp.broadcast_to(jnp.stack([rows, cols], axis=-1).astype(x.dtype), (b, f, height, width, 2))
    return jnp.concatenate([x, coords], axis=-1)
