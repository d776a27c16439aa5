"""Our Flax (linen) port of CLIP's text and vision towers, and the loading of Hugging Face CLIP checkpoints.

transformers 5 has no Flax models and diffusers dropped Flax, so yagg carries its own CLIP. The modules follow
transformers 4.x's `FlaxCLIPModel` (modeling_flax_clip.py) exactly, down to the parameter names, so that a
`flax_model.msgpack` written by it loads as is; `tests/test_clip.py` checks the outputs against that reference to 1e-4.

A CLIP is named by a Hugging Face hub id (default `openai/clip-vit-base-patch32`, fetched through huggingface_hub's
cache, honouring HF_HUB_OFFLINE) or by a local folder (a `huggingface-cli download` folder, or one written by
`yagg make-tiny-clip --out DIR`). The folder holds `config.json`, the tokenizer files, optionally
`preprocessor_config.json`, and the weights as `model.safetensors` (PyTorch key layout) or `flax_model.msgpack`.
Pickled weights (`pytorch_model.bin`) are never loaded: unpickling runs arbitrary code.

`TextEncoder` and `VisionEncoder` are what the rest of yagg uses: plain Python objects holding the parameters and
one jitted forward each, meant to be created once per process (a Beam worker's `setup`) and called on batches.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
# Encoders pad the batch up to a power of two (at least MIN_BUCKET) and split it into chunks of at most MAX_BATCH,
# so a stream of odd-sized batches compiles the forward only for 8, 16, ..., MAX_BATCH rows.
MIN_BUCKET = 8
MAX_BATCH = 256
# CLIP's own image normalisation, used where a folder has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

WEIGHT_FILES = ("model.safetensors", "flax_model.msgpack")
_HUB_FILES = [
    "config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
]
_PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5")


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


# ----------------------------------------------------------------------------------------------------------------------
# The networks. Module and parameter names mirror FlaxCLIPModel's, which is what makes msgpack checkpoints load as is.


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


# ----------------------------------------------------------------------------------------------------------------------
# Finding and reading a checkpoint.


def resolve_clip_dir(name_or_dir: str | Path) -> Path:
    """The local folder of a CLIP named by a folder path or a Hugging Face hub id (downloaded into the hub cache)."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"CLIP {str(name_or_dir)!r} is a file; pass the folder that holds config.json")
    if not _is_hub_id(str(name_or_dir)):
        raise FileNotFoundError(
            f"no CLIP folder at {path}; make a tiny one with `yagg make-tiny-clip --out {path}` or pass a "
            f"Hugging Face hub id such as {DEFAULT_CLIP!r}"
        )
    return _download(str(name_or_dir))


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith((".", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _download(repo_id: str) -> Path:
    """Fetches the config, tokenizer and one weights file (safetensors preferred) into the hub cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        # Only one weights file: hub repos often carry the same weights in three formats of ~600 MB each.
        folder = Path(snapshot_download(repo_id, allow_patterns=[*_HUB_FILES, WEIGHT_FILES[0]]))
        if not (folder / WEIGHT_FILES[0]).exists():
            folder = Path(snapshot_download(repo_id, allow_patterns=[*_HUB_FILES, WEIGHT_FILES[1]]))
    except LocalEntryNotFoundError as e:  # nothing cached, and offline (HF_HUB_OFFLINE=1) or the hub is unreachable
        raise FileNotFoundError(
            f"CLIP {repo_id!r} is neither a local folder nor in the Hugging Face cache, and it cannot be downloaded "
            "now (HF_HUB_OFFLINE is set, or the hub is unreachable). Pass a local CLIP folder instead: one made by "
            f"`yagg make-tiny-clip --out DIR`, or one downloaded elsewhere with `huggingface-cli download {repo_id} "
            "--local-dir DIR` and copied here."
        ) from e
    except HfHubHTTPError as e:  # no such repo, a gated one, a bad revision
        raise FileNotFoundError(f"could not fetch CLIP {repo_id!r} from the Hugging Face hub: {e}") from e
    return folder


def _read_config(directory: Path) -> Any:
    """The folder's CLIPConfig (transformers fills in the defaults that config.json leaves out)."""
    from transformers import CLIPConfig

    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json: it is not a Hugging Face CLIP folder")
    model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type")
    if model_type != "clip":
        raise ValueError(
            f"{path} describes a {model_type!r} model; yagg needs a full CLIP (model_type 'clip', text and vision "
            "towers), such as openai/clip-vit-base-patch32 or a folder made by `yagg make-tiny-clip`"
        )
    config = CLIPConfig.from_pretrained(str(directory))
    for tower in (config.text_config, config.vision_config):
        if tower.hidden_act not in ACTIVATIONS:
            raise ValueError(f"{path}: hidden_act {tower.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
    return config


def _read_weights(directory: Path, roots: tuple[str, ...]) -> dict[str, Any]:
    """The parameters under the given top-level names (e.g. text_model, text_projection), in the Flax layout."""
    if (directory / WEIGHT_FILES[0]).is_file():
        return _read_safetensors(directory / WEIGHT_FILES[0], roots)
    if (directory / WEIGHT_FILES[1]).is_file():
        from flax.serialization import msgpack_restore

        state = msgpack_restore((directory / WEIGHT_FILES[1]).read_bytes())
        return {root: state[root] for root in roots if root in state}
    pickled = [name for name in _PICKLED_WEIGHTS if (directory / name).exists()]
    if pickled:
        raise ValueError(
            f"{directory} has its weights only as {', '.join(pickled)}. yagg does not load pickled or TensorFlow "
            "weights (unpickling a file can run arbitrary code). Convert them to model.safetensors, e.g. with "
            "transformers and PyTorch: CLIPModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)."
        )
    raise FileNotFoundError(f"{directory} has no CLIP weights: expected one of {', '.join(WEIGHT_FILES)}")


def _read_safetensors(path: Path, roots: tuple[str, ...]) -> dict[str, Any]:
    """Reads PyTorch-layout tensors and converts them to Flax's: linear [out, in] -> kernel [in, out], conv OIHW ->
    HWIO, LayerNorm weight -> scale, nn.Embedding weight -> embedding."""
    from safetensors import safe_open

    tree: dict[str, Any] = {}
    # "flax" rather than "numpy": numpy has no bfloat16, which some checkpoints are stored in.
    with safe_open(str(path), framework="flax") as f:
        for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
            parts = key.split(".")
            if parts[0] not in roots:
                continue
            value = np.asarray(f.get_tensor(key), np.float32)
            *module, leaf = parts
            if leaf == "weight":
                if value.ndim == 4:
                    leaf, value = "kernel", value.transpose(2, 3, 1, 0)
                elif value.ndim == 2 and module[-1].endswith("embedding"):
                    leaf = "embedding"
                elif value.ndim == 2:
                    leaf, value = "kernel", value.T
                else:
                    leaf = "scale"  # the only 1-D weights in CLIP are LayerNorm's
            node = tree
            for name in module:
                node = node.setdefault(name, {})
            node[leaf] = value
    return tree


def _checked_params(module: nn.Module, example_inputs: tuple, loaded: dict, source: Path) -> dict:
    """The loaded parameters that `module` needs, as float32 jax arrays, after checking every name and shape.

    Extra entries (e.g. the `position_ids` buffers some checkpoints carry) are ignored.
    """
    expected = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_inputs))["params"]
    flat_loaded = {"/".join(k): v for k, v in _flatten(loaded)}
    problems, params = [], {}
    for keys, shape_struct in _flatten(expected):
        name = "/".join(keys)
        if name not in flat_loaded:
            problems.append(f"missing {name}")
        elif tuple(np.shape(flat_loaded[name])) != shape_struct.shape:
            problems.append(f"{name} has shape {np.shape(flat_loaded[name])}, the config says {shape_struct.shape}")
        else:
            _set(params, keys, jnp.asarray(flat_loaded[name], jnp.float32))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"the weights in {source} do not match its config.json: {shown}")
    return params


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, dict):
        return [item for key in sorted(tree) for item in _flatten(tree[key], (*prefix, str(key)))]
    return [(prefix, tree)]


def _set(tree: dict, keys: tuple[str, ...], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


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


# ----------------------------------------------------------------------------------------------------------------------
# The encoders the rest of yagg uses.


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
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._forward = jax.jit(lambda params, ids, mask: module.apply({"params": params}, ids, mask))

    @classmethod
    def from_pretrained(cls, name_or_dir: str = DEFAULT_CLIP) -> TextEncoder:
        from transformers import CLIPTokenizer

        directory = resolve_clip_dir(name_or_dir)
        config = _read_config(directory)
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
        loaded = _read_weights(directory, ("text_model", "text_projection"))
        params = _checked_params(module, example, loaded, directory)
        return cls(str(name_or_dir), module, params, CLIPTokenizer.from_pretrained(str(directory)))

    def token_lengths(self, captions: list[str]) -> list[int]:
        """Each caption's length in tokens, with the start and end tokens, before any truncation."""
        return [len(ids) for ids in self._token_ids(captions)]

    def encode(self, captions: list[str]) -> dict[str, np.ndarray]:
        """Tokenises to max_length (padded) and encodes.

        Returns pooled f32 [B, pooled_dim] (CLIPTextModelWithProjection's text_embeds, not normalised), tokens f32
        [B, max_length, token_dim] (last_hidden_state) and mask int32 [B, max_length] (1 for real tokens). Raises
        ValueError naming the first caption longer than max_length tokens; check `token_lengths` first to skip such
        captions instead.
        """
        token_ids = self._token_ids(captions)
        ids = np.full((len(captions), self.max_length), self._pad_id, np.int32)
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

    def _token_ids(self, captions: list[str]) -> list[list[int]]:
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
        config = _read_config(directory)
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
        loaded = _read_weights(directory, ("vision_model", "visual_projection"))
        params = _checked_params(module, example, loaded, directory)
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
