"""Our Flax CLIP port against the reference (transformers 4.x FlaxCLIPModel), its loaders, tokenizer and the tiny CLIP.

The golden outputs in fixtures/clip_ref/ come from tests/fixtures/make_clip_golden.py (see its docstring).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax.serialization import msgpack_restore
from safetensors.numpy import save_file

import model.clip as clip
from model.clip import TextEncoder, VisionEncoder, resolve_clip_dir
from model.tiny_clip import make_tiny_clip
from pipeline.shapes import COLORS, DIRECTIONS, SHAPES

REF = Path(__file__).resolve().parent / "fixtures" / "clip_ref"
ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-4
SHAPE_CAPTIONS = [f"a {c} {s} moving {d}" for c in COLORS for s in SHAPES for d in DIRECTIONS]  # all 72


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(REF / "golden.npz"))


@pytest.fixture(scope="module")
def ref_text():
    return TextEncoder.from_pretrained(str(REF))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), seed=0)


@pytest.fixture(scope="module")
def tiny_text(tiny_dir):
    return TextEncoder.from_pretrained(str(tiny_dir))


# ---------------------------------------------------------------------------------------------------------------------
# Numerics against the reference, from its own flax_model.msgpack.


def test_text_matches_reference(ref_text, golden):
    out = ref_text.encode_ids(golden["input_ids"], golden["attention_mask"])
    np.testing.assert_allclose(out["pooled"], golden["text_embeds"], atol=ATOL)
    np.testing.assert_allclose(out["tokens"], golden["last_hidden_state"], atol=ATOL)
    unmasked = ref_text.encode_ids(golden["input_ids"])
    np.testing.assert_allclose(unmasked["tokens"], golden["last_hidden_state_unmasked"], atol=ATOL)


def test_vision_matches_reference(golden):
    encoder = VisionEncoder.from_pretrained(str(REF))
    assert (encoder.image_size, encoder.embed_dim) == (32, 24)
    np.testing.assert_allclose(encoder.encode_pixels(golden["pixel_values"]), golden["image_embeds"], atol=ATOL)


def test_legacy_eos_token_id_pools_at_highest_id(tmp_path, golden):
    # Old configs say eos_token_id=2; the reference then pools at argmax(input_ids). Row 3 has no end-of-text token,
    # so there the two rules pick different positions.
    folder = shutil.copytree(REF, tmp_path / "legacy")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["eos_token_id"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    out = TextEncoder.from_pretrained(str(folder)).encode_ids(golden["input_ids"], golden["attention_mask"])
    np.testing.assert_allclose(out["pooled"], golden["text_embeds_legacy"], atol=ATOL)
    assert not np.allclose(golden["text_embeds_legacy"][3], golden["text_embeds"][3], atol=ATOL)


def _pytorch_state_dict(flax_params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """The reference's parameters as a PyTorch CLIPModel state dict: nn.Linear weight [out, in], nn.Conv2d weight
    [out, in, kh, kw], LayerNorm and nn.Embedding tensors named `weight`."""
    out = {}
    for key, value in flax_params.items():
        if isinstance(value, dict):
            out.update(_pytorch_state_dict(value, f"{prefix}{key}."))
        elif key == "kernel" and value.ndim == 4:
            out[prefix + "weight"] = np.ascontiguousarray(value.transpose(3, 2, 0, 1))
        elif key == "kernel":
            out[prefix + "weight"] = np.ascontiguousarray(value.T)
        elif key in ("scale", "embedding"):
            out[prefix + "weight"] = value
        else:
            out[prefix + key] = value
    return out


def test_safetensors_in_pytorch_layout_match_reference(tmp_path, golden):
    folder = shutil.copytree(REF, tmp_path / "pt", ignore=shutil.ignore_patterns("flax_model.msgpack"))
    state = _pytorch_state_dict(msgpack_restore((REF / "flax_model.msgpack").read_bytes()))
    # Older PyTorch checkpoints also carry this buffer; the loader must skip it.
    state["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})

    text = TextEncoder.from_pretrained(str(folder)).encode_ids(golden["input_ids"], golden["attention_mask"])
    np.testing.assert_allclose(text["pooled"], golden["text_embeds"], atol=ATOL)
    np.testing.assert_allclose(text["tokens"], golden["last_hidden_state"], atol=ATOL)
    image = VisionEncoder.from_pretrained(str(folder)).encode_pixels(golden["pixel_values"])
    np.testing.assert_allclose(image, golden["image_embeds"], atol=ATOL)


def test_tokenizer_and_encode_match_reference(ref_text, golden):
    captions = [str(c) for c in golden["captions"]]
    expected_ids = [[i for i in row if i >= 0] for row in golden["caption_ids"].tolist()]
    assert ref_text.token_lengths(captions) == [len(ids) for ids in expected_ids]
    out = ref_text.encode(captions)
    assert out["mask"].shape == (3, ref_text.max_length)
    np.testing.assert_array_equal(out["mask"], golden["attention_mask"][:3])
    np.testing.assert_allclose(out["pooled"], golden["text_embeds"][:3], atol=ATOL)
    np.testing.assert_allclose(out["tokens"], golden["last_hidden_state"][:3], atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------------
# The encoders' behaviour, on the tiny CLIP.


def test_encode_shapes_mask_and_end_of_text_pooling(tiny_text):
    captions = ["a red circle moving left", "a blue square"]
    out = tiny_text.encode(captions)
    assert (tiny_text.max_length, tiny_text.pooled_dim, tiny_text.token_dim) == (77, 64, 64)
    assert out["pooled"].shape == (2, 64) and out["pooled"].dtype == np.float32
    assert out["tokens"].shape == (2, 77, 64) and out["tokens"].dtype == np.float32
    assert out["mask"].sum(axis=1).tolist() == tiny_text.token_lengths(captions) == [7, 5]
    assert out["mask"][0, :7].all() and not out["mask"][0, 7:].any()
    # The pooled vector is read at the end-of-text token: padding after it changes nothing.
    unpadded = tiny_text.encode_ids(np.asarray(tiny_text._tokenizer(captions[:1])["input_ids"]))
    np.testing.assert_allclose(out["pooled"][:1], unpadded["pooled"], atol=1e-5)
    np.testing.assert_allclose(out["tokens"][0, :7], unpadded["tokens"][0], atol=1e-5)


def test_batches_are_chunked_and_padded_without_mixing_rows(tiny_text, monkeypatch):
    captions = SHAPE_CAPTIONS[:19]
    monkeypatch.setattr(clip, "MAX_BATCH", 8)  # chunks of 8, 8, 3 (the last padded to 8)
    together = tiny_text.encode(captions)
    alone = [tiny_text.encode([caption]) for caption in (captions[0], captions[10], captions[18])]
    for row, single in zip((0, 10, 18), alone, strict=True):
        np.testing.assert_allclose(together["pooled"][row], single["pooled"][0], atol=1e-5)
        np.testing.assert_allclose(together["tokens"][row], single["tokens"][0], atol=1e-5)
    empty = tiny_text.encode([])
    assert empty["pooled"].shape == (0, 64) and empty["tokens"].shape == (0, 77, 64)


def test_too_long_caption_is_named(tiny_text):
    long_caption = "red " * 80
    assert tiny_text.token_lengths(["a red circle", long_caption]) == [5, 82]
    with pytest.raises(ValueError, match=r"caption 'red red .* 82 tokens long, more than the 77"):
        tiny_text.encode(["a red circle", long_caption])


def test_encode_ids_rejects_bad_input(tiny_text):
    with pytest.raises(ValueError, match="length <= 77"):
        tiny_text.encode_ids(np.zeros((2, 78), np.int32))
    with pytest.raises(ValueError, match=r"must lie in \[0, "):
        tiny_text.encode_ids(np.full((1, 5), tiny_text.vocab_size, np.int32))


def test_vision_preprocessing_matches_transformers(tiny_dir):
    from transformers import CLIPImageProcessorPil

    encoder = VisionEncoder.from_pretrained(str(tiny_dir))
    reference = CLIPImageProcessorPil.from_pretrained(str(tiny_dir))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in [(45, 70, 3), (71, 40, 3), (32, 32, 3)]]
    ours = encoder.preprocess(images)
    theirs = np.stack([reference(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0) for image in images])
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    embeds = encoder.encode(images)
    assert embeds.shape == (3, 64) and embeds.dtype == np.float32
    np.testing.assert_allclose(embeds, encoder.encode_pixels(ours), atol=1e-6)
    with pytest.raises(ValueError, match="uint8 RGB"):
        encoder.encode(np.zeros((1, 32, 32, 4), np.uint8))


# ---------------------------------------------------------------------------------------------------------------------
# The tiny CLIP.


def test_make_tiny_clip_is_deterministic(tmp_path, tiny_dir):
    again = make_tiny_clip(tmp_path / "again", seed=0)
    other = make_tiny_clip(tmp_path / "other", seed=1)
    names = sorted(p.name for p in tiny_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", "merges.txt"} <= set(names)
    for name in names:
        assert (tiny_dir / name).read_bytes() == (again / name).read_bytes(), name
    assert (tiny_dir / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    assert (tiny_dir / "vocab.json").read_bytes() == (other / "vocab.json").read_bytes()


def test_tiny_tokenizer_keeps_caption_words_whole(tiny_text):
    assert 1000 <= tiny_text.vocab_size <= 2000
    words = [*COLORS, *SHAPES, *DIRECTIONS, "a", "moving", "the", "man", "dancing", "dog", "walking"]
    assert tiny_text.token_lengths(words) == [3] * len(words)  # start, the word, end
    assert tiny_text.token_lengths(["A Red CIRCLE moving left."]) == [8]


def test_tiny_clip_tells_captions_apart(tiny_text):
    captions = SHAPE_CAPTIONS
    pooled = tiny_text.encode(captions)["pooled"]
    unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    cosine = unit @ unit.T
    np.fill_diagonal(cosine, -1)
    assert cosine.max() < 0.99


# ---------------------------------------------------------------------------------------------------------------------
# Errors a user can cause.


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="make-tiny-clip"):
        TextEncoder.from_pretrained(str(tmp_path / "no-such-clip"))
    with pytest.raises(FileNotFoundError, match="no CLIP folder"):
        resolve_clip_dir("runs/demo/not-made-yet")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        resolve_clip_dir(str(tmp_path / "file"))


def test_pickle_only_folder_is_refused(tmp_path):
    folder = shutil.copytree(REF, tmp_path / "pickled", ignore=shutil.ignore_patterns("flax_model.msgpack"))
    (folder / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(ValueError, match=r"only as pytorch_model\.bin.*does not load pickled.*model\.safetensors"):
        TextEncoder.from_pretrained(str(folder))
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no CLIP weights"):
        VisionEncoder.from_pretrained(str(folder))


def test_weights_that_do_not_fit_the_config(tmp_path):
    folder = shutil.copytree(REF, tmp_path / "mismatch")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match its config.json: missing text_model/encoder/layers/2/"):
        TextEncoder.from_pretrained(str(folder))


def test_hub_name_offline_without_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    code = "from model.clip import TextEncoder; TextEncoder.from_pretrained('openai/clip-vit-base-patch32')"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "FileNotFoundError: CLIP 'openai/clip-vit-base-patch32' is neither a local folder nor in" in result.stderr
    assert "yagg make-tiny-clip --out DIR" in result.stderr
