"""Building blocks of the video U-Net (model/unet.py): convolutions, embeddings, attention, the residual block.

Every array is channels-last, video activations are `[batch, frames, height, width, channels]`, and every parameter
carries logical axis names (the vocabulary is documented in model/unet.py) so the trainer can shard it by rules from
the config. Modules take `dtype` (computation) and `param_dtype` (storage) separately, so bf16 compute can run on f32
parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
Initializer = Any

VIDEO_AXES = ("batch", "frames", "height", "width", "channels")
# Every conv kernel is stored 5-D, (kt, kh, kw, in, out), whatever its shape or implementation, so one vocabulary
# covers them all and a checkpoint does not depend on how a convolution is computed.
CONV_AXES = ("conv_t", "conv_h", "conv_w", "conv_in", "conv_out")

_DEFAULT_INIT = nn.initializers.lecun_normal()


def constrain_video(x: jax.Array) -> jax.Array:
    """Names the axes of a video activation for the sharding rules (a no-op when no rules are active)."""
    return nn.with_logical_constraint(x, VIDEO_AXES)


def _boxed(init: Initializer, names: Sequence[str]) -> Initializer:
    return nn.with_logical_partitioning(init, tuple(names))


class Conv3D(nn.Module):
    """A stride-1 (or spatially strided) 'SAME' convolution of a `[B, F, H, W, C]` video with a (kt, kh, kw) kernel.

    The kernel is one 5-D parameter; how it is computed depends on its shape, each way picked by timing forward and
    backward under jit on the development CPU (the numbers are in model/unet.py's docstring):
      * (1, kh, kw): frames folded into the batch, one 2-D convolution;
      * (kt, 1, 1): height and width folded into the batch, one 1-D convolution over frames;
      * (1, 1, 1): a matrix product over channels;
      * anything else, e.g. (3, 3, 3): one 5-D `lax.conv_general_dilated`.
    Zero padding in time means frame 0 and frame F-1 see zeros beyond the clip; with F = 1 only the centre tap acts.
    """

    features: int
    kernel_size: tuple[int, int, int]
    spatial_stride: int = 1
    zero_init: bool = False
    # The input/output channel axes of the kernel; the image-side convs name their 3-channel axis "image_channels",
    # which no rule shards (3 does not divide over devices).
    in_axis: str = "conv_in"
    out_axis: str = "conv_out"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kt, kh, kw = self.kernel_size
        names = (*CONV_AXES[:3], self.in_axis, self.out_axis)
        init = nn.initializers.zeros_init() if self.zero_init else _DEFAULT_INIT
        kernel = self.param("kernel", _boxed(init, names), (kt, kh, kw, x.shape[-1], self.features), self.param_dtype)
        bias = self.param(
            "bias", _boxed(nn.initializers.zeros_init(), (self.out_axis,)), (self.features,), self.param_dtype
        )
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        stride = self.spatial_stride
        if (kt, kh, kw) == (1, 1, 1):
            assert stride == 1, "a strided 1x1x1 convolution is not used"
            y = jnp.einsum("bfhwc,cd->bfhwd", x, kernel[0, 0, 0])
        elif kh == kw == 1:
            assert stride == 1, "temporal convolutions do not stride"
            y = _temporal_conv(x, kernel[:, 0, 0])
        elif kt == 1:
            y = _spatial_conv(x, kernel[0], stride)
        else:
            y = lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(1, stride, stride),
                padding="SAME",
                dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
            )
        return y + bias.astype(self.dtype)


def _spatial_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """A 'SAME' 2-D convolution of every frame: `x` [B, F, H, W, C], `kernel` [kh, kw, C, D]."""
    b, f, h, w, c = x.shape
    y = lax.conv_general_dilated(
        x.reshape(b * f, h, w, c), kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y.reshape(b, f, *y.shape[1:])


def _temporal_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A 'SAME' 1-D convolution over frames at every pixel: `x` [B, F, H, W, C], `kernel` [kt, C, D]."""
    b, f, h, w, c = x.shape
    rows = jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(b * h * w, f, c)
    y = lax.conv_general_dilated(rows, kernel, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
    return jnp.transpose(y.reshape(b, h, w, f, -1), (0, 3, 1, 2, 4))


class VideoConv(nn.Module):
    """The U-Net's 3x3x3 convolution in one of two modes.

    `full3d`: one (3, 3, 3) kernel. `factorized`: a (1, 3, 3) spatial kernel, then a (3, 1, 1) temporal one (the
    "(2+1)D" convolution of Tran et al. 2018): about 3x fewer weights and FLOPs at a given width, and separate
    parameters for appearance and motion. `zero_init` zeroes the last kernel applied, so the module starts as the
    zero map.
    """

    features: int
    mode: str = "factorized"
    zero_init: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.mode == "full3d":
            return Conv3D(self.features, (3, 3, 3), zero_init=self.zero_init, name="conv", **kw)(x)
        assert self.mode == "factorized", f"unknown conv mode {self.mode!r}"
        x = Conv3D(self.features, (1, 3, 3), name="spatial", **kw)(x)
        return Conv3D(self.features, (3, 1, 1), zero_init=self.zero_init, name="temporal", **kw)(x)


class Downsample(nn.Module):
    """Halves height and width with a strided (1, 3, 3) convolution; frames are never downsampled, so F = 1 works."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Conv3D(self.features, (1, 3, 3), spatial_stride=2, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="conv")(x)  # fmt: skip


class Upsample(nn.Module):
    """Doubles height and width (nearest neighbour) and smooths with a (1, 3, 3) convolution."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        return Conv3D(self.features, (1, 3, 3), dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


class SinusoidalPosEmb(nn.Module):
    """The Transformer's sinusoidal embedding of integer timesteps `[B]` -> `[B, dim]` (sin half, then cos half)."""

    dim: int

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        assert self.dim % 2 == 0 and self.dim >= 4, f"embedding size {self.dim} must be even and at least 4"
        half = self.dim // 2
        freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
        angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
        return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class Dense(nn.Module):
    """A dense layer over the last axis with named kernel axes (`names` = (input axis, output axis))."""

    features: int
    names: tuple[str, str]
    zero_init: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros_init() if self.zero_init else _DEFAULT_INIT
        kernel = self.param("kernel", _boxed(init, self.names), (x.shape[-1], self.features), self.param_dtype)
        bias = self.param(
            "bias", _boxed(nn.initializers.zeros_init(), self.names[1:]), (self.features,), self.param_dtype
        )
        return x.astype(self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)


def group_norm(channels: int, max_groups: int, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.GroupNorm:
    """GroupNorm over (frames, height, width, channels-in-group) with named scale/bias; statistics in float32.

    The group count is the largest one <= max_groups that divides `channels` (ADM's 32 at its widths).
    """
    groups = max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(
        num_groups=groups,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=_boxed(nn.initializers.ones_init(), ("norm",)),
        bias_init=_boxed(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def layer_norm(name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    """LayerNorm over channels with named scale/bias, used before each attention."""
    return nn.LayerNorm(
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=_boxed(nn.initializers.ones_init(), ("norm",)),
        bias_init=_boxed(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


class ResnetBlock3D(nn.Module):
    """GroupNorm -> SiLU -> conv -> GroupNorm modulated by the conditioning -> SiLU -> dropout -> conv, plus the input
    (through a 1x1x1 projection when the channel count changes).

    The conditioning `emb` is `[B, F, E]`, one vector per frame (model/unet.py::UNetConditional3D._conditioning); it
    sets a scale and a shift per channel and frame applied after the second GroupNorm, `norm(h) * (1 + scale) +
    shift` (ADM's "scale-shift norm", Dhariwal & Nichol 2021): the condition can then gate features, not only offset
    them, and differently in each frame.

    The second convolution's last kernel starts at zero, so every block starts as its skip path, the identity when
    the width does not change (ADM, Dhariwal & Nichol 2021, `zero_module`): a deep U-Net then begins as a shallow one
    and its early updates are stable.
    `train` is positional so the block can be rematerialised with it as a static argument.
    """

    features: int
    conv_mode: str = "factorized"
    dropout: float = 0.0
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(group_norm(x.shape[-1], self.norm_groups, "norm1", **kw)(x))
        h = VideoConv(self.features, self.conv_mode, name="conv1", **kw)(h)
        # A scale and a shift per channel and frame, the same at every pixel of the frame.
        scale_shift = Dense(2 * self.features, ("cond_embed", "conv_out"), name="emb_proj", **kw)(nn.silu(emb))
        scale, shift = jnp.split(scale_shift[:, :, None, None, :], 2, axis=-1)
        h = group_norm(self.features, self.norm_groups, "norm2", **kw)(h) * (1 + scale) + shift
        h = nn.silu(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = VideoConv(self.features, self.conv_mode, zero_init=True, name="conv2", **kw)(h)
        if x.shape[-1] != self.features:
            x = Conv3D(self.features, (1, 1, 1), name="skip", **kw)(x)
        return constrain_video(x.astype(self.dtype) + h)


class Attention(nn.Module):
    """Multi-head attention of queries `[N, Lq, C]` over keys/values `[N, Lk, Ckv]`, returning `[N, Lq, C]`.

    `bias` `[heads, Lq, Lk]` is added to the logits; `mask` `[N, Lk]` (nonzero = attend) hides keys. Logits and
    softmax are float32 whatever `dtype` is. The output projection starts at zero (ADM's practice, as in
    ResnetBlock3D), so a residual attention layer starts as the identity.
    """

    num_heads: int
    head_dim: int
    kv_axis: str = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _kernel(self, name: str, shape: tuple[int, ...], names: tuple[str, ...], init: Initializer) -> jax.Array:
        return self.param(name, _boxed(init, names), shape, self.param_dtype).astype(self.dtype)

    @nn.compact
    def __call__(
        self, q_in: jax.Array, kv_in: jax.Array, bias: jax.Array | None = None, mask: jax.Array | None = None
    ) -> jax.Array:
        heads, dim, c = self.num_heads, self.head_dim, q_in.shape[-1]
        # Fan-in scaling over the input axis; fan-out counts heads x head_dim.
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2))
        wq = self._kernel("query", (c, heads, dim), ("embed", "heads", "head_dim"), init)
        wk = self._kernel("key", (kv_in.shape[-1], heads, dim), (self.kv_axis, "heads", "head_dim"), init)
        wv = self._kernel("value", (kv_in.shape[-1], heads, dim), (self.kv_axis, "heads", "head_dim"), init)
        wo = self._kernel("out", (heads, dim, c), ("heads", "head_dim", "embed"), nn.initializers.zeros_init())
        bo = self.param("out_bias", _boxed(nn.initializers.zeros_init(), ("embed",)), (c,), self.param_dtype)
        q_in, kv_in = q_in.astype(self.dtype), kv_in.astype(self.dtype)
        q = jnp.einsum("nqc,chd->nqhd", q_in, wq)
        k = jnp.einsum("nkc,chd->nkhd", kv_in, wk)
        v = jnp.einsum("nkc,chd->nkhd", kv_in, wv)
        logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(dim)
        if bias is not None:
            logits = logits + bias[None].astype(jnp.float32)
        if mask is not None:
            # A finite fill: a row with no visible key gets uniform weights instead of NaN; callers that allow such
            # rows zero their contribution afterwards (see FactorizedAttentionBlock).
            logits = jnp.where(mask[:, None, None, :] > 0, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("nhqk,nkhd->nqhd", weights, v)
        return jnp.einsum("nqhd,hdc->nqc", out, wo) + bo.astype(self.dtype)


class RelativePositionBias(nn.Module):
    """A learned bias per head for each frame offset j - i, clipped to [-max_distance, max_distance].

    A plain table (not T5's log buckets): clips are short, so every offset up to `max_distance` gets its own entry
    and longer ones share the edge entries. It starts at zero, i.e. order-blind; the temporal convolutions already
    see order, and the table learns which offsets matter. Returns `[heads, F, F]`.
    """

    num_heads: int
    max_distance: int = 32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, num_frames: int) -> jax.Array:
        table = self.param(
            "table",
            _boxed(nn.initializers.zeros_init(), ("rel_pos", "heads")),
            (2 * self.max_distance + 1, self.num_heads),
            self.param_dtype,
        )
        pos = jnp.arange(num_frames)
        offset = jnp.clip(pos[None, :] - pos[:, None], -self.max_distance, self.max_distance) + self.max_distance
        return jnp.transpose(table[offset], (2, 0, 1))


class FactorizedAttentionBlock(nn.Module):
    """Spatial self-attention within each frame, temporal self-attention across frames at each pixel (with a
    relative-position bias), then cross-attention from every position to the text tokens; each pre-normed and
    residual.

    Cross-attention respects `text_mask`; a row whose mask is all zero (the null condition of classifier-free
    guidance, see model/diffusion.py::null_condition) attends to nothing: its cross-attention adds exactly zero.
    With F = 1 temporal attention attends to the single frame, a well-defined per-pixel linear map (zero at init).
    """

    head_dim: int = 64
    max_relative_distance: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, text_tokens: jax.Array, text_mask: jax.Array) -> jax.Array:
        b, f, h, w, c = x.shape
        assert c % self.head_dim == 0, f"{c} channels do not split into heads of {self.head_dim}"
        heads = c // self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(self.dtype)

        y = layer_norm("spatial_norm", **kw)(x).reshape(b * f, h * w, c)
        y = Attention(heads, self.head_dim, name="spatial_attn", **kw)(y, y)
        x = x + y.reshape(b, f, h, w, c)

        y = jnp.transpose(layer_norm("temporal_norm", **kw)(x), (0, 2, 3, 1, 4)).reshape(b * h * w, f, c)
        bias = RelativePositionBias(heads, self.max_relative_distance, self.param_dtype, name="rel_pos_bias")(f)
        y = Attention(heads, self.head_dim, name="temporal_attn", **kw)(y, y, bias=bias)
        x = x + jnp.transpose(y.reshape(b, h, w, f, c), (0, 3, 1, 2, 4))

        y = layer_norm("cross_norm", **kw)(x).reshape(b, f * h * w, c)
        y = Attention(heads, self.head_dim, kv_axis="text_embed", name="cross_attn", **kw)(
            y, text_tokens, mask=text_mask
        )
        has_text = jnp.any(text_mask > 0, axis=-1).astype(self.dtype)
        x = x + has_text[:, None, None, None, None] * y.reshape(b, f, h, w, c)
        return constrain_video(x)
