"""`clip_batched_speedup`: captions/s embedding in the preprocessing job's batches ÷ one caption per call.

    python -m bench.clip_embed [--quick]

What is timed is what the job's `EmbedCaptions.process` (pipeline/embed.py) does with a batch: the text conditioner
(`contracts.conditioning.TextConditioner`) tokenises the captions (`token_ids`) and encodes them (`encode_token_ids`:
each caption at its own length bucket, the rows of each bucket in one jitted call of the text tower). Batched, the
batch is `pipeline.job.EMBED_BATCH` captions, the job's batch size; single, the same two calls with a list of one
caption, as a caller embedding captions one by one would make them.

The model is the text tower of the default CLIP, openai/clip-vit-base-patch32 (width 512, 12 layers, 8 heads, MLP
2048, 77 positions, vocabulary 49408, projection 512), with random weights built here: speed does
not depend on weight values, and nothing is downloaded. The encoder is constructed directly, as
`TextEncoder.from_pretrained` constructs it, with the byte-level BPE tokenizer of the tiny CLIP
(`model.tiny_clip.write_tokenizer`; the real one cannot be fetched offline). It splits the captions below into
10-33 tokens (median 14), close to what CLIP's own tokenizer gives for such plain English.

Captions: the sentences of ../shared/corpus/tgif/tgif-cvpr16-results.tsv, the corpus's TGIF-layout manifest. The
batched side encodes whole batches of consecutive sentences; the single side encodes an evenly spaced sample of the
same sentences, one per call. Each call's shapes are compiled in an untimed warm-up; then the two sides alternate,
and each rate is the best of the repeats (the machine is shared).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from transformers import CLIPTokenizer

from bench.common import REPO, Metric, parse_args, write_metrics
from contracts.conditioning import TextConditioner
from model.clip import TextEncoder, TextModelWithProjection
from model.tiny_clip import EOS, write_tokenizer
from pipeline.job import EMBED_BATCH

MANIFEST = REPO.parent / "shared" / "corpus" / "tgif" / "tgif-cvpr16-results.tsv"
# openai/clip-vit-base-patch32's text_config and projection_dim.
CLIP_B32_TEXT = dict(
    vocab_size=49408,
    hidden_size=512,
    num_layers=12,
    num_heads=8,
    mlp_dim=2048,
    max_positions=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=512,
)
# (batches of EMBED_BATCH captions per repeat, single captions per repeat, repeats)
FULL = (2, 24, 3)
QUICK = (1, 8, 1)


def build_encoder(folder: Path) -> TextConditioner:
    """The pipeline's text encoder with a random full-size CLIP ViT-B/32 text tower."""
    vocab = write_tokenizer(folder)
    module = TextModelWithProjection(**CLIP_B32_TEXT, eos_token_id=vocab[EOS])
    example = jnp.zeros((1, CLIP_B32_TEXT["max_positions"]), jnp.int32)
    # N(0, 0.02) weights drawn by numpy (module.init would compile the initialisers of 63M parameters first).
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * 0.02),
        jax.eval_shape(module.init, jax.random.key(0), example)["params"],
    )
    name = "random clip-vit-base-patch32 text tower"
    return TextConditioner(TextEncoder(name, module, params, CLIPTokenizer.from_pretrained(folder)), name)


def embed(encoder: TextConditioner, captions: list[str]) -> dict[str, np.ndarray]:
    """The calls EmbedCaptions.process makes for a batch of captions."""
    return encoder.encode_token_ids(encoder.token_ids(captions))


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    num_batches, num_single, repeats = QUICK if args.quick else FULL
    sentences = [line.split("\t")[1] for line in MANIFEST.read_text(encoding="utf-8").splitlines()]
    batches = [sentences[i * EMBED_BATCH : (i + 1) * EMBED_BATCH] for i in range(num_batches)]
    batched = [c for batch in batches for c in batch]
    singles = batched[:: len(batched) // num_single][:num_single]
    with tempfile.TemporaryDirectory(prefix="bench-clip-") as tmp:
        encoder = build_encoder(Path(tmp))

    # Warm-up: every shape either side will use is compiled here, outside the timing.
    for batch in batches:
        embed(encoder, batch)
    for caption in singles:
        embed(encoder, [caption])

    batched_s, single_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            embed(encoder, batch)
        batched_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        for caption in singles:
            embed(encoder, [caption])
        single_s.append(time.perf_counter() - start)

    lengths = np.array([len(ids) for ids in encoder.token_ids(batched)])
    batched_rate = len(batched) / min(batched_s)
    single_rate = len(singles) / min(single_s)
    metric = Metric(
        name="clip_batched_speedup",
        value=batched_rate / single_rate,
        goal=">= 8",
        command="python -m bench.clip_embed" + (" --quick" if args.quick else ""),
        details={
            "batched_captions_per_s": round(batched_rate, 2),
            "single_captions_per_s": round(single_rate, 2),
            "batch_size": EMBED_BATCH,
            "batched_captions": len(batched),
            "single_captions": len(singles),
            "repeats": repeats,
            "batched_seconds": [round(s, 3) for s in batched_s],
            "single_seconds": [round(s, 3) for s in single_s],
            "caption_tokens": {
                "min": int(lengths.min()),
                "median": float(np.median(lengths)),
                "max": int(lengths.max()),
            },
            "model": "CLIP ViT-B/32 text tower, random weights: "
            + ", ".join(f"{k}={v}" for k, v in CLIP_B32_TEXT.items()),
            "devices": [str(d) for d in jax.devices()],
        },
    )
    write_metrics([metric], args.json)


if __name__ == "__main__":
    main()
