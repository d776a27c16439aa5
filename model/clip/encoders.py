"""The encoders the rest of yagg uses: CLIP's towers with their tokenizer or image preprocessing.

`TextEncoder` and `VisionEncoder` are plain Python objects holding the parameters and one jitted forward each, meant
to be created once per process (a Beam worker's `setup`) and called on batches.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model.clip.modules import TextModelWithProjection, VisionModelWithProjection
from model.clip.weights import DEFAULT_CLIP, checked_params, read_config, read_weights, resolve_clip_dir

# Encoders pad the batch up to a power of two (at least MIN_BUCKET) and split it into chunks of at most MAX_BATCH,
# so a stream of odd-sized batches compiles the forward only for 8, 16, ..., MAX_BATCH rows.
MIN_BUCKET = 8
MAX_BATCH = 256
# CLIP's own image normalisation, used where a folder has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _bucket(n: int) -> int:
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def _run_bucketed(forward: Callable, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Runs `forward` over row chunks of at most MAX_BATCH, each zero-padded to its bucket; returns numpy outputs."""
    n = len(inputs[0])
    chunks = []
    for start in range(0, n, MAX_BATCH):
        part = [x[start : start + MAX_BATCH] for x in inputs]
        rows = len(part[0])
        padded = [np.pad(x, [(0, _bucket(rows) - rows)] + [(0, 0)] * (x.ndim - 1)) for x in part]
        chunks.append([np.asarray(y)[:rows] for y in forward(*padded)])
    return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]


class TextEncoder:
    """CLIP's text tower with its tokenizer: captions -> pooled embedding and per-token states."""

    def __init__(self, name: str, module: TextModelWithProjection, params: dict, tokenizer: Any) -> None:
        self.name = name
        self.max_length = module.max_positions
        self.pooled_dim = module.projection_dim
        self.token_dim = module.hidden_size
        self.vocab_size = module.vocab_size
        self._params = params
        self._tokenizer = tokenizer
        # CLIP pads with its end-of-text token; the mask, not the pad id, tells the model what is real.
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._forward = jax.jit(lambda params, ids, mask: module.apply({"params": params}, ids, mask))

    @classmethod
    def from_pretrained(cls, name_or_dir: str = DEFAULT_CLIP) -> TextEncoder:
        from transformers import CLIPTokenizer

        directory = resolve_clip_dir(name_or_dir)
        config = read_config(directory)
        has_bpe_files = (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
        if not (has_bpe_files or (directory / "tokenizer.json").is_file()):
            raise FileNotFoundError(f"{directory} has no CLIP tokenizer (vocab.json and merges.txt, or tokenizer.json)")
        cfg = config.text_config
        module = TextModelWithProjection(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            mlp_dim=cfg.intermediate_size,
            max_positions=cfg.max_position_embeddings,
            hidden_act=cfg.hidden_act,
            layer_norm_eps=cfg.layer_norm_eps,
            eos_token_id=cfg.eos_token_id,
            projection_dim=config.projection_dim,
        )
        example = (jnp.zeros((1, cfg.max_position_embeddings), jnp.int32),)
        loaded = read_weights(directory, ("text_model", "text_projection"))
        params = checked_params(module, example, loaded, directory)
        return cls(str(name_or_dir), module, params, CLIPTokenizer.from_pretrained(str(directory)))

    def token_lengths(self, captions: list[str]) -> list[int]:
        """Each caption's length in tokens, with the start and end tokens, before any truncation."""
        return [len(ids) for ids in self.token_ids(captions)]

    def encode(self, captions: list[str]) -> dict[str, np.ndarray]:
        """Tokenises to max_length (padded) and encodes.

        Returns pooled f32 [B, pooled_dim] (CLIPTextModelWithProjection's text_embeds, not normalised), tokens f32
        [B, max_length, token_dim] (last_hidden_state) and mask int32 [B, max_length] (1 for real tokens). Raises
        ValueError naming the first caption longer than max_length tokens; check `token_lengths` first to skip such
        captions instead.
        """
        token_ids = self.token_ids(captions)
        ids = np.full((len(captions), self.max_length), self.pad_id, np.int32)
        mask = np.zeros((len(captions), self.max_length), np.int32)
        for row, (caption, seq) in enumerate(zip(captions, token_ids, strict=True)):
            if len(seq) > self.max_length:
                raise ValueError(
                    f"caption {caption!r} is {len(seq)} tokens long, more than the {self.max_length} that "
                    f"CLIP {self.name!r} reads; shorten it or leave it out"
                )
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return {**self.encode_ids(ids, mask), "mask": mask}

    def encode_ids(self, input_ids: Any, attention_mask: Any = None) -> dict[str, np.ndarray]:
        """Encodes token ids int [B, L] (L <= max_length). Without a mask every position is attended to (causally);
        with one, as with the reference given the tokenizer's mask, padded keys are left out."""
        ids = np.asarray(input_ids, np.int32)
        if ids.ndim != 2 or not 0 < ids.shape[1] <= self.max_length:
            raise ValueError(
                f"input_ids must be [batch, length] with 1 <= length <= {self.max_length}, got {ids.shape}"
            )
        if ids.size and not 0 <= ids.min() <= ids.max() < self.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}")
        if len(ids) == 0:
            return {
                "pooled": np.zeros((0, self.pooled_dim), np.float32),
                "tokens": np.zeros((0, ids.shape[1], self.token_dim), np.float32),
            }
        if attention_mask is None:
            pooled, tokens = _run_bucketed(lambda i: self._forward(self._params, i, None), [ids])
        else:
            mask = np.asarray(attention_mask, np.int32)
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
            pooled, tokens = _run_bucketed(lambda i, m: self._forward(self._params, i, m), [ids, mask])
        return {"pooled": pooled, "tokens": tokens}

    def token_ids(self, captions: list[str]) -> list[list[int]]:
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, not one string")
        if not captions:
            return []
        # Always the same call (no padding, no truncation), so the fast tokenizer never reconfigures its shared Rust
        # state: that is what makes one encoder safe to share between a worker's threads. verbose=False: over-long
        # captions are reported by encode (or counted by callers), not logged one by one.
        return self._tokenizer(list(captions), verbose=False)["input_ids"]


class VisionEncoder:
    """CLIP's vision tower with CLIP's preprocessing: uint8 RGB images -> image embeddings."""

    def __init__(
        self, name: str, module: VisionModelWithProjection, params: dict, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.name = name
        self.image_size = module.image_size
        self.embed_dim = module.projection_dim
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self._params = params
        self._forward = jax.jit(lambda params, pixels: (module.apply({"params": params}, pixels),))

    @classmethod
    def from_pretrained(cls, name_or_dir: str = DEFAULT_CLIP) -> VisionEncoder:
        directory = resolve_clip_dir(name_or_dir)
        config = read_config(directory)
        cfg = config.vision_config
        if cfg.num_channels != 3:
            raise ValueError(f"{directory}: yagg feeds RGB images, but this CLIP expects {cfg.num_channels} channels")
        module = VisionModelWithProjection(
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            mlp_dim=cfg.intermediate_size,
            patch_size=cfg.patch_size,
            image_size=cfg.image_size,
            hidden_act=cfg.hidden_act,
            layer_norm_eps=cfg.layer_norm_eps,
            projection_dim=config.projection_dim,
        )
        example = (jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32),)
        loaded = read_weights(directory, ("vision_model", "visual_projection"))
        params = checked_params(module, example, loaded, directory)
        mean, std = CLIP_MEAN, CLIP_STD
        preprocessor = directory / "preprocessor_config.json"
        if preprocessor.is_file():
            settings = json.loads(preprocessor.read_text(encoding="utf-8"))
            mean, std = settings.get("image_mean", mean), settings.get("image_std", std)
        return cls(str(name_or_dir), module, params, mean, std)

    def preprocess(self, images: Any) -> np.ndarray:
        """CLIP's preprocessing, as transformers' CLIPImageProcessor does it: the shorter side resized to image_size
        (PIL bicubic), a centred image_size square cropped, scaled to [0, 1], normalised with mean/std.

        images: uint8 [N, H, W, 3], or a sequence of uint8 [H, W, 3] of any sizes. Returns f32 [N, S, S, 3].
        """
        from PIL import Image

        out = np.empty((len(images), self.image_size, self.image_size, 3), np.float32)
        size = self.image_size
        for i, image in enumerate(images):
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"images must be uint8 RGB [H, W, 3], got {image.dtype} {image.shape} at index {i}")
            height, width = image.shape[:2]
            # Same rounding as transformers' get_resize_output_image_size(default_to_square=False).
            if width <= height:
                new_w, new_h = size, int(size * height / width)
            else:
                new_w, new_h = int(size * width / height), size
            resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
            top, left = (new_h - size) // 2, (new_w - size) // 2
            crop = resized[top : top + size, left : left + size].astype(np.float32) / 255.0
            out[i] = (crop - self.mean) / self.std
        return out

    def encode(self, images: Any) -> np.ndarray:
        """uint8 RGB images ([N, H, W, 3] or a sequence of [H, W, 3]) -> image embeddings f32 [N, embed_dim]."""
        return self.encode_pixels(self.preprocess(images))

    def encode_pixels(self, pixel_values: Any) -> np.ndarray:
        """Already preprocessed pixels f32 [N, S, S, 3] -> image embeddings f32 [N, embed_dim] (not normalised)."""
        pixels = np.asarray(pixel_values, np.float32)
        if pixels.ndim != 4 or pixels.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"pixel_values must be [N, {self.image_size}, {self.image_size}, 3], got {pixels.shape}")
        if len(pixels) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        (embeds,) = _run_bucketed(lambda p: self._forward(self._params, p), [pixels])
        return embeds
