"""TGIF at 16 frames x 128 x 128: a ~304M-parameter factorized U-Net with five levels, rematerialised blocks.

    yagg preprocess --config configs/tgif128.py --manifest gs://BUCKET/tgif/tgif-v1.0.tsv --output gs://BUCKET/tgif128 \
        --runner=DataflowRunner --project=P --region=R --temp_location=gs://BUCKET/tmp --setup_file=./setup.py
    yagg train --config configs/tgif128.py --workdir gs://BUCKET/runs/tgif128 --config.data.path=gs://BUCKET/tgif128
    yagg eval --config configs/tgif128.py --workdir gs://BUCKET/runs/tgif128 --config.data.path=gs://BUCKET/tgif128 \
        --follow

Every path may be local or gs:// (README, "Cloud storage"); the GIFs the manifest names must be where Dataflow's
workers can read them (gs:// or http(s) URLs).

Parameters, Adam moments and EMA take ~4.7 GB in float32 per replica; on devices with less room to spare, shard them
with `--config.mesh.fsdp=N`.
"""

from __future__ import annotations

import ml_collections

from configs.base import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.num_train_steps = 400_000
    config.batch_size = 128

    data = config.data
    data.path = "runs/tgif128/data"
    data.frames = 16
    data.size = 128
    data.text_encoder = "openai/clip-vit-base-patch32"
    data.text_embed_dim = 512
    data.text_token_dim = 512
    data.text_max_length = 77

    model = config.model
    model.channels = 192
    model.channel_mults = (1, 1, 2, 3, 4)  # 128, 64, 32, 16, 8
    model.num_res_blocks = 2
    model.attention_resolutions = (32, 16, 8)  # 1024 positions per frame at 32x32: spatial attention stays cheap
    model.dropout = 0.1
    model.dtype = "bfloat16"
    model.remat = True  # activations at 128x128 x 16 frames dominate memory; recompute them in the backward pass
    config.lock()
    return config
