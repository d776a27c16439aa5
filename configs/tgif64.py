"""TGIF at 16 frames x 64 x 64: a ~130M-parameter factorized U-Net on CLIP ViT-B/32 text embeddings, bf16 compute.

    yagg preprocess --config configs/tgif64.py --manifest gs://BUCKET/tgif/tgif-v1.0.tsv --output gs://BUCKET/tgif64 \
        --runner=DataflowRunner --project=P --region=R --temp_location=gs://BUCKET/tmp --setup_file=./setup.py
    yagg train --config configs/tgif64.py --workdir gs://BUCKET/runs/tgif64 --config.data.path=gs://BUCKET/tgif64
    yagg eval --config configs/tgif64.py --workdir gs://BUCKET/runs/tgif64 --config.data.path=gs://BUCKET/tgif64 \
        --follow

Every path may be local or gs:// (README, "Cloud storage"); the GIFs the manifest names must be where Dataflow's
workers can read them (gs:// or http(s) URLs).

The model is the base config's (configs/base.py); this file sets the data, dropout and the run length.
"""

from __future__ import annotations

import ml_collections

from configs.base import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.num_train_steps = 300_000
    config.batch_size = 128

    data = config.data
    data.path = "runs/tgif64/data"
    data.frames = 16
    data.size = 64
    data.text_encoder = "openai/clip-vit-base-patch32"
    data.text_embed_dim = 512
    data.text_token_dim = 512
    data.text_max_length = 77

    # The base model (channels 128 x (1, 2, 3, 4) at 64, 32, 16, 8 pixels, attention at 16 and 8, bf16 compute).
    config.model.dropout = 0.1  # TGIF has ~100k clips: a model this size overfits them without it
    config.lock()
    return config
