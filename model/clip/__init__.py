"""Our Flax port of CLIP, split by job:

    modules.py   the text and vision towers as Flax modules (transformers 4.x FlaxCLIPModel names)
    weights.py   finding a CLIP (hub id or local folder) and reading its weights into checked Flax parameters
    encoders.py  TextEncoder and VisionEncoder: the towers with tokenizer / image preprocessing, what yagg calls

The names below are the package's public surface.
"""

from model.clip.encoders import CLIP_MEAN, CLIP_STD, MAX_BATCH, MIN_BUCKET, TextEncoder, VisionEncoder
from model.clip.modules import ACTIVATIONS, TextModelWithProjection, VisionModelWithProjection, quick_gelu
from model.clip.weights import CLIP_FILES, DEFAULT_CLIP, WEIGHT_FILES, resolve_clip_dir

__all__ = [
    "ACTIVATIONS",
    "CLIP_FILES",
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_CLIP",
    "MAX_BATCH",
    "MIN_BUCKET",
    "WEIGHT_FILES",
    "TextEncoder",
    "TextModelWithProjection",
    "VisionEncoder",
    "VisionModelWithProjection",
    "quick_gelu",
    "resolve_clip_dir",
]
