"""The Inflated 3D ConvNet (I3D, Carreira & Zisserman 2017, "Quo Vadis, Action Recognition?") that FVD embeds clips
with: the RGB Inception-v1 I3D trained on Kinetics-400, as DeepMind's `kinetics-i3d` defines it and TF-Hub's
`deepmind/i3d-kinetics-400/1` serves it to the reference FVD code (Unterthiner et al. 2018).

Inference only: the network is a frozen feature extractor, so there is no training mode, no dropout and no update of
the batch statistics. Layer names follow DeepMind's (`Conv3d_1a_7x7`, `Mixed_3b`, ...; a branch's layers are
`Branch_1_Conv3d_0b_3x3` where TF's scopes nest them) so the weights map one to one (eval/i3d_weights.py).

Semantics kept from the TF original, because FVD numbers depend on them:
  * padding is TF's "SAME" for every convolution and pooling: where the total padding is odd, the extra row goes at
    the end (lax and Flax follow that rule), and max pooling never picks a padded value;
  * BatchNorm is Sonnet v1's at inference with `scale=False`: (x - moving_mean) / sqrt(moving_variance + 1e-3) + beta,
    computed as TF's `tf.nn.batch_normalization` does, x * inv + (beta - moving_mean * inv);
  * the logits are a 1x1x1 convolution with bias over a (2, 7, 7) VALID average pool of Mixed_5c, averaged over the
    remaining time steps, before any softmax. FVD uses these 400 averaged logits as the clip's embedding.

Input: float32 [B, T, 224, 224, 3] RGB in [-1, 1]; T >= MIN_FRAMES (three stride-2 reductions of time must leave at
least the average pool's 2 steps). Output: float32 [B, 400].
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

NUM_CLASSES = 400
RESOLUTION = 224  # the only spatial size whose last feature map (7 x 7) fits the final 7 x 7 VALID pool exactly
MIN_FRAMES = 9  # time after the stride-2 stem, MaxPool3d_4a and MaxPool3d_5a: ceil(9 / 8) = 2, the pool's depth
BN_EPSILON = 1e-3  # Sonnet v1's BatchNorm default, used by kinetics-i3d

# After the stem, three stages: a max pool (name, window, strides), then Inception blocks with their branch widths
# (branch 0 1x1; branch 1 1x1 -> 3x3; branch 2 1x1 -> 3x3; branch 3 max pool -> 1x1). kinetics-i3d's InceptionI3d.
_Block = tuple[str, tuple[int, int, int, int, int, int]]
_STAGES: tuple[tuple[str, tuple[int, int, int], tuple[int, int, int], tuple[_Block, ...]], ...] = (
    (
        "MaxPool3d_3a_3x3",
        (1, 3, 3),
        (1, 2, 2),
        (("Mixed_3b", (64, 96, 128, 16, 32, 32)), ("Mixed_3c", (128, 128, 192, 32, 96, 64))),
    ),
    (
        "MaxPool3d_4a_3x3",
        (3, 3, 3),
        (2, 2, 2),
        (
            ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
            ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
            ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
            ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
            ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
        ),
    ),
    (
        "MaxPool3d_5a_2x2",
        (2, 2, 2),
        (2, 2, 2),
        (("Mixed_5b", (256, 160, 320, 32, 128, 128)), ("Mixed_5c", (384, 192, 384, 48, 128, 128))),
    ),
)


def _max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int]) -> jax.Array:
    return nn.max_pool(x, window_shape=tuple(window), strides=tuple(strides), padding="SAME")


class Unit3D(nn.Module):
    """kinetics-i3d's Unit3D: a 3-D convolution (SAME, no bias), Sonnet v1 BatchNorm without scale, then ReLU."""

    features: int
    kernel: tuple[int, int, int] = (1, 1, 1)
    strides: tuple[int, int, int] = (1, 1, 1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.features, self.kernel, self.strides, padding="SAME", use_bias=False, name="conv")(x)
        beta = self.param("beta", nn.initializers.zeros, (self.features,))
        mean = self.variable("batch_stats", "moving_mean", jnp.zeros, (self.features,)).value
        variance = self.variable("batch_stats", "moving_variance", jnp.ones, (self.features,)).value
        inv = jax.lax.rsqrt(variance + BN_EPSILON)
        return nn.relu(x * inv + (beta - mean * inv))


class Mixed(nn.Module):
    """An Inception block: four branches over the same input, concatenated along channels."""

    widths: tuple[int, int, int, int, int, int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.widths
        branch_0 = Unit3D(w[0], name="Branch_0_Conv3d_0a_1x1")(x)
        branch_1 = Unit3D(w[1], name="Branch_1_Conv3d_0a_1x1")(x)
        branch_1 = Unit3D(w[2], (3, 3, 3), name="Branch_1_Conv3d_0b_3x3")(branch_1)
        branch_2 = Unit3D(w[3], name="Branch_2_Conv3d_0a_1x1")(x)
        branch_2 = Unit3D(w[4], (3, 3, 3), name="Branch_2_Conv3d_0b_3x3")(branch_2)
        branch_3 = Unit3D(w[5], name="Branch_3_Conv3d_0b_1x1")(_max_pool(x, (3, 3, 3), (1, 1, 1)))
        return jnp.concatenate([branch_0, branch_1, branch_2, branch_3], axis=-1)


class InceptionI3d(nn.Module):
    """RGB I3D up to its time-averaged logits: float32 [B, T, 224, 224, 3] in [-1, 1] -> [B, NUM_CLASSES]."""

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, videos: jax.Array) -> jax.Array:
        if videos.ndim != 5 or videos.shape[2:] != (RESOLUTION, RESOLUTION, 3) or videos.shape[1] < MIN_FRAMES:
            raise ValueError(
                f"I3D takes [B, T >= {MIN_FRAMES}, {RESOLUTION}, {RESOLUTION}, 3] clips, got {list(videos.shape)}"
            )
        x = Unit3D(64, (7, 7, 7), (2, 2, 2), name="Conv3d_1a_7x7")(videos)
        x = _max_pool(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_2a_3x3
        x = Unit3D(64, name="Conv3d_2b_1x1")(x)
        x = Unit3D(192, (3, 3, 3), name="Conv3d_2c_3x3")(x)
        for _, window, strides, blocks in _STAGES:
            x = _max_pool(x, window, strides)
            for name, widths in blocks:
                x = Mixed(widths, name=name)(x)
        x = nn.avg_pool(x, window_shape=(2, 7, 7), strides=(1, 1, 1), padding="VALID")
        logits = nn.Conv(self.num_classes, (1, 1, 1), name="Logits_Conv3d_0c_1x1")(x)  # [B, T', 1, 1, classes]
        return jnp.mean(logits[:, :, 0, 0, :], axis=1)
