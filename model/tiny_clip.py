"""A deterministic tiny random CLIP in the Hugging Face layout, for tests and the CPU demo.

`make_tiny_clip(out_dir, seed)` writes what `TextEncoder.from_pretrained` / `VisionEncoder.from_pretrained`
(model/clip.py) and transformers' `CLIPTokenizer` read from a CLIP folder:

  config.json               a CLIPConfig (text_config, vision_config, projection_dim)
  model.safetensors         random weights in the PyTorch key layout of `CLIPModel` (linear weights [out, in], conv
                            weights OIHW), as the real checkpoints on the Hugging Face hub are
  preprocessor_config.json  CLIP's image preprocessing at this model's image size
  vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
                            a byte-level BPE tokenizer of its own, learnt from the small built-in corpus below

The weights are random, but initialised so that the text tower tells captions apart (see `_text_weights`): a
diffusion demo conditions on its outputs. The same seed writes byte-identical files.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_MERGES = 1536  # upper bound; learning stops earlier once every corpus word is a single token

TEXT = dict(
    hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77
)
VISION = dict(
    hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
PROJECTION_DIM = 64

# The BPE corpus: words with how often they count. The moving-shapes vocabulary (pipeline/shapes.py) and caption glue
# words count most, so they are learnt as whole tokens first; the rest is everyday caption English (people, animals,
# actions, scenes), so real captions such as TGIF's split into a few tokens each rather than into bytes.
_CORPUS = {
    400: """a an the of in on to and is are with moving moves move red green blue yellow magenta cyan white black
        circle square triangle left right up down""",
    60: """orange purple pink brown gray grey dark light bright small big large tiny little shape shapes ball box dot
        star line across toward towards from into over under around back forth slowly quickly fast slow going goes
        go sliding slides bouncing bounces rolling rolls falling falls rising rises turning turns spinning spins
        flying flies jumping jumps top bottom side middle center centre corner edge screen background frame""",
    12: """man woman men women boy girl person people baby child children kid kids guy lady player players team crowd
        dog dogs cat cats horse bird fish car cars bike train plane water tree trees road street room house door
        window table chair bed floor wall field stage sky sun snow rain grass hand hands head face eyes hair arm arms
        leg legs body shirt dress hat glasses phone camera guitar microphone
        was were be being been has have had does do did can will would could should not no yes
        he she it they them his her their its him this that these those there here who what which where when while
        at by for as or but if so then than out off about after before again very too also just only still all some
        one two three four five six seven eight nine ten first second other another each every both many more most
        walking walks running runs dancing dances smiling smiles laughing laughs talking talks singing sings playing
        plays looking looks holding holds eating eats drinking drinks sitting sits standing stands driving drives
        riding rides swimming swims kissing kisses hugging hugs waving waves shaking shakes nodding nods throwing
        throws catching catches kicking kicks hitting hits pushing pushes pulling pulls opening opens closing closes
        wearing wears making makes taking takes giving gives getting gets putting puts watching watches
        crying cries fighting fights sleeping sleeps waking wakes touching touches pointing points
        clapping claps raising raises lifting lifts carrying carries climbing climbs flipping flips dropping drops
        happy sad angry funny cute young old new long short beautiful pretty hot cold wet""",
    3: """0 1 2 3 4 5 6 7 8 9 . , ! ? ' " - : ; ( ) & / 's 't 're 've 'm 'll 'd""",
}
_PRETOKEN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (byte-level BPE works on these characters)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _corpus_words() -> Counter[tuple[str, ...]]:
    """Corpus words as byte-level symbol tuples, the last one carrying CLIP's end-of-word marker `</w>`."""
    byte_chars = _bytes_to_unicode()
    words: Counter[tuple[str, ...]] = Counter()
    for weight, text in _CORPUS.items():
        for word in _PRETOKEN.findall(text.lower()):
            symbols = [byte_chars[b] for b in word.encode("utf-8")]
            symbols[-1] += "</w>"
            words[tuple(symbols)] += weight
    return words


def learn_bpe(max_merges: int = MAX_MERGES) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learns byte-level BPE merges from the built-in corpus; returns (vocab, merges) in CLIP's layout.

    CLIP's vocabulary order: the 256 byte characters, the same with `</w>`, one token per merge in merge order, then
    <|startoftext|> and <|endoftext|> (so the end-of-text token has the highest id, which the legacy pooling rule of
    old CLIP configs relies on). Ties between equally frequent pairs go to the lexicographically smallest pair, so
    the result does not depend on dict ordering.
    """
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    known = set(tokens)
    words = _corpus_words()
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        # Different merge histories can build the same string (e.g. "a"+"nd</w>" and "an"+"d</w>"): one id each.
        if best[0] + best[1] not in known:
            known.add(best[0] + best[1])
            tokens.append(best[0] + best[1])
        words = Counter({_merge(word, best): count for word, count in words.items()})
    tokens += [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def write_tokenizer(out_dir: str | Path, model_max_length: int = TEXT["max_position_embeddings"]) -> dict[str, int]:
    """Writes the tiny BPE tokenizer files (loadable by transformers' CLIPTokenizer) and returns its vocab."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = learn_bpe()
    _write_json(out / "vocab.json", vocab)
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    # CLIP pads with the end-of-text token and has no separate unknown token (byte-level BPE needs none).
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    _write_json(out / "special_tokens_map.json", special)
    _write_json(
        out / "tokenizer_config.json",
        {**special, "model_max_length": model_max_length, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True},
    )
    return vocab


def make_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """Writes the tiny random CLIP into `out_dir` (created if needed) and returns `out_dir` as a Path."""
    out = Path(out_dir)
    vocab = write_tokenizer(out)
    text_config = {
        **TEXT,
        "vocab_size": len(vocab),
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": PROJECTION_DIM,
        "bos_token_id": vocab[BOS],
        "eos_token_id": vocab[EOS],
        "pad_token_id": vocab[EOS],
    }
    vision_config = {
        **VISION,
        "num_channels": 3,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": PROJECTION_DIM,
    }
    config = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": PROJECTION_DIM,
        "logit_scale_init_value": 2.6592,
        "text_config": text_config,
        "vision_config": vision_config,
    }
    _write_json(out / "config.json", config)
    _write_json(out / "preprocessor_config.json", _preprocessor_config(VISION["image_size"]))

    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {**_text_weights(rng, text_config), **_vision_weights(rng, vision_config)}
    tensors["logit_scale"] = np.asarray(2.6592, np.float32)
    # transformers refuses safetensors without format metadata; "pt" marks the PyTorch key layout.
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _preprocessor_config(image_size: int) -> dict:
    # Imported here, not at the top: the tokenizer half of this module stays numpy-only, so that
    # tests/fixtures/make_clip_golden.py can use it from the reference's venv.
    from model.clip import CLIP_MEAN, CLIP_STD

    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,  # PIL bicubic
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
    }


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return (rng.standard_normal(shape) * std).astype(np.float32)


def _encoder_weights(rng: np.random.Generator, prefix: str, cfg: dict) -> dict[str, np.ndarray]:
    """Pre-LN transformer blocks. Weights ~ N(0, 1/fan_in) keep activations O(1) through the residual stream, so
    every token's identity still shows at the output (a 0.02 init would let LayerNorm'd noise dominate)."""
    d, m = cfg["hidden_size"], cfg["intermediate_size"]
    out = {}
    for i in range(cfg["num_hidden_layers"]):
        p = f"{prefix}.encoder.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{p}.self_attn.{name}.weight"] = _normal(rng, (d, d), d**-0.5)
            out[f"{p}.self_attn.{name}.bias"] = np.zeros(d, np.float32)
        out[f"{p}.mlp.fc1.weight"] = _normal(rng, (m, d), d**-0.5)
        out[f"{p}.mlp.fc1.bias"] = np.zeros(m, np.float32)
        out[f"{p}.mlp.fc2.weight"] = _normal(rng, (d, m), m**-0.5)
        out[f"{p}.mlp.fc2.bias"] = np.zeros(d, np.float32)
        for norm in ("layer_norm1", "layer_norm2"):
            out[f"{p}.{norm}.weight"] = np.ones(d, np.float32)
            out[f"{p}.{norm}.bias"] = np.zeros(d, np.float32)
    return out


def _text_weights(rng: np.random.Generator, cfg: dict) -> dict[str, np.ndarray]:
    """Unit-variance token embeddings and small position embeddings: the pooled end-of-text state then mixes the
    caption's tokens (mostly by content, not by position), so different captions give clearly different vectors."""
    d = cfg["hidden_size"]
    out = {
        "text_model.embeddings.token_embedding.weight": _normal(rng, (cfg["vocab_size"], d), 1.0),
        "text_model.embeddings.position_embedding.weight": _normal(rng, (cfg["max_position_embeddings"], d), 0.1),
        **_encoder_weights(rng, "text_model", cfg),
        "text_model.final_layer_norm.weight": np.ones(d, np.float32),
        "text_model.final_layer_norm.bias": np.zeros(d, np.float32),
    }
    out["text_projection.weight"] = _normal(rng, (cfg["projection_dim"], d), d**-0.5)
    return out


def _vision_weights(rng: np.random.Generator, cfg: dict) -> dict[str, np.ndarray]:
    d, p = cfg["hidden_size"], cfg["patch_size"]
    num_positions = (cfg["image_size"] // p) ** 2 + 1
    out = {
        "vision_model.embeddings.class_embedding": _normal(rng, (d,), 1.0),
        "vision_model.embeddings.patch_embedding.weight": _normal(
            rng, (d, cfg["num_channels"], p, p), (3 * p * p) ** -0.5
        ),
        "vision_model.embeddings.position_embedding.weight": _normal(rng, (num_positions, d), 0.1),
        "vision_model.pre_layrnorm.weight": np.ones(d, np.float32),
        "vision_model.pre_layrnorm.bias": np.zeros(d, np.float32),
        **_encoder_weights(rng, "vision_model", cfg),
        "vision_model.post_layernorm.weight": np.ones(d, np.float32),
        "vision_model.post_layernorm.bias": np.zeros(d, np.float32),
    }
    out["visual_projection.weight"] = _normal(rng, (cfg["projection_dim"], d), d**-0.5)
    return out


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
