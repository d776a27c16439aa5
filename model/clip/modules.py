"""CLIP's text and vision towers as Flax (linen) modules: our port of transformers 4.x's `FlaxCLIPModel`.

transformers 5 has no Flax models and diffusers dropped Flax, so yagg carries its own CLIP. The modules follow
`FlaxCLIPModel` (modeling_flax_clip.py) exactly, down to the parameter names, so that a `flax_model.msgpack` written
by it loads as is; `tests/test_clip.py` checks the outputs against that reference to 1e-4.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's sigmoid approximation of GELU (the `quick_gelu` of Hugging Face configs)."""
    return x * jax.nn.sigmoid(1.702 * x)


# The `hidden_act` values CLIP configs use, as transformers 4.x's Flax ACT2FN defines them.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.swish,
    "swish": nn.swish,
}


# Module and parameter names mirror FlaxCLIPModel's, which is what makes msgpack checkpoints load as is.


class Attention(nn.Module):
    num_heads: int
    causal: bool

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        batch, length, width = x.shape
        head_dim = width // self.num_heads

        def heads(name: str) -> jax.Array:
            return nn.Dense(width, name=name)(x).reshape(batch, length, self.num_heads, head_dim)

        q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        allowed = jnp.ones((1, 1, length, length), bool)
        if self.causal:
            allowed = jnp.tril(allowed)
        if mask is not None:
            # A key-side mask: padded tokens are never attended to; their own outputs are still computed.
            allowed = allowed & (mask[:, None, None, :] > 0)
        # The reference adds finfo.min rather than -inf, so a row with no allowed key stays finite (uniform weights).
        logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v).reshape(batch, length, width)
        return nn.Dense(width, name="out_proj")(out)


class Mlp(nn.Module):
    mlp_dim: int
    hidden_act: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = ACTIVATIONS[self.hidden_act](nn.Dense(self.mlp_dim, name="fc1")(x))
        return nn.Dense(x.shape[-1], name="fc2")(h)


class EncoderLayer(nn.Module):
    """A pre-LayerNorm transformer block."""

    num_heads: int
    mlp_dim: int
    hidden_act: str
    layer_norm_eps: float
    causal: bool

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        h = nn.LayerNorm(epsilon=self.layer_norm_eps, name="layer_norm1")(x)
        x = x + Attention(self.num_heads, self.causal, name="self_attn")(h, mask)
        h = nn.LayerNorm(epsilon=self.layer_norm_eps, name="layer_norm2")(x)
        return x + Mlp(self.mlp_dim, self.hidden_act, name="mlp")(h)


class _LayerCollection(nn.Module):
    """Only here so that parameters sit under encoder/layers/<i>/, as in Hugging Face checkpoints."""

    num_layers: int
    num_heads: int
    mlp_dim: int
    hidden_act: str
    layer_norm_eps: float
    causal: bool

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        for i in range(self.num_layers):
            x = EncoderLayer(
                self.num_heads, self.mlp_dim, self.hidden_act, self.layer_norm_eps, self.causal, name=str(i)
            )(x, mask)
        return x


class Encoder(nn.Module):
    num_layers: int
    num_heads: int
    mlp_dim: int
    hidden_act: str
    layer_norm_eps: float
    causal: bool

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        return _LayerCollection(
            self.num_layers, self.num_heads, self.mlp_dim, self.hidden_act, self.layer_norm_eps, self.causal,
            name="layers",
        )(x, mask)  # fmt: skip


class TextEmbeddings(nn.Module):
    vocab_size: int
    hidden_size: int
    max_positions: int

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        tokens = nn.Embed(self.vocab_size, self.hidden_size, name="token_embedding")(input_ids)
        positions = nn.Embed(self.max_positions, self.hidden_size, name="position_embedding")(
            jnp.arange(input_ids.shape[-1])
        )
        return tokens + positions[None]


class TextTransformer(nn.Module):
    """CLIP's causal text transformer: returns (last_hidden_state [B, L, D], pooled [B, D])."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    max_positions: int
    hidden_act: str
    layer_norm_eps: float
    eos_token_id: int

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        x = TextEmbeddings(self.vocab_size, self.hidden_size, self.max_positions, name="embeddings")(input_ids)
        x = Encoder(
            self.num_layers, self.num_heads, self.mlp_dim, self.hidden_act, self.layer_norm_eps, causal=True,
            name="encoder",
        )(x, attention_mask)  # fmt: skip
        x = nn.LayerNorm(epsilon=self.layer_norm_eps, name="final_layer_norm")(x)
        rows = jnp.arange(x.shape[0])
        if self.eos_token_id == 2:
            # Configs written before transformers PR #24773 carry eos_token_id=2, which is wrong; the reference then
            # pools at the highest token id, which is the end-of-text token in OpenAI's vocabulary.
            eos_position = jnp.argmax(input_ids, axis=-1)
        else:
            # The first end-of-text token (argmax of a boolean is its first True; position 0 when there is none).
            eos_position = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        return x, x[rows, eos_position]


class TextModelWithProjection(nn.Module):
    """CLIPTextModelWithProjection: returns (text_embeds [B, P] (not normalised), last_hidden_state [B, L, D])."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    max_positions: int
    hidden_act: str
    layer_norm_eps: float
    eos_token_id: int
    projection_dim: int

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        tokens, pooled = TextTransformer(
            self.vocab_size, self.hidden_size, self.num_layers, self.num_heads, self.mlp_dim, self.max_positions,
            self.hidden_act, self.layer_norm_eps, self.eos_token_id, name="text_model",
        )(input_ids, attention_mask)  # fmt: skip
        return nn.Dense(self.projection_dim, use_bias=False, name="text_projection")(pooled), tokens


class VisionEmbeddings(nn.Module):
    hidden_size: int
    patch_size: int
    image_size: int

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        patches = nn.Conv(
            self.hidden_size,
            kernel_size=(self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            use_bias=False,
            name="patch_embedding",
        )(pixels)
        batch = patches.shape[0]
        patches = patches.reshape(batch, -1, self.hidden_size)  # row-major over the patch grid, as the reference
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (self.hidden_size,))
        x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.hidden_size)), patches], axis=1)
        num_positions = (self.image_size // self.patch_size) ** 2 + 1
        return x + nn.Embed(num_positions, self.hidden_size, name="position_embedding")(jnp.arange(num_positions))


class VisionTransformer(nn.Module):
    """CLIP's ViT: pixels [N, S, S, C] (normalised) -> pooled class token [N, D] after post-LayerNorm."""

    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    image_size: int
    hidden_act: str
    layer_norm_eps: float

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        x = VisionEmbeddings(self.hidden_size, self.patch_size, self.image_size, name="embeddings")(pixels)
        x = nn.LayerNorm(epsilon=self.layer_norm_eps, name="pre_layrnorm")(x)  # sic: the checkpoints' spelling
        x = Encoder(
            self.num_layers, self.num_heads, self.mlp_dim, self.hidden_act, self.layer_norm_eps, causal=False,
            name="encoder",
        )(x)  # fmt: skip
        return nn.LayerNorm(epsilon=self.layer_norm_eps, name="post_layernorm")(x[:, 0])


class VisionModelWithProjection(nn.Module):
    """CLIPVisionModelWithProjection: pixels [N, S, S, C] -> image_embeds [N, P] (not normalised)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    image_size: int
    hidden_act: str
    layer_norm_eps: float
    projection_dim: int

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        pooled = VisionTransformer(
            self.hidden_size, self.num_layers, self.num_heads, self.mlp_dim, self.patch_size, self.image_size,
            self.hidden_act, self.layer_norm_eps, name="vision_model",
        )(pixels)  # fmt: skip
        return nn.Dense(self.projection_dim, use_bias=False, name="visual_projection")(pooled)
