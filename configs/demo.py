"""The CPU demo: the moving-shapes dataset at 6 frames x 16 x 16, a ~0.4M-parameter U-Net, the tiny random CLIP.

    yagg make-tiny-clip --out runs/demo/tiny-clip
    yagg make-shapes --out runs/demo/shapes
    yagg preprocess --config configs/demo.py --manifest runs/demo/shapes/manifest.tsv --overwrite
    yagg train --config configs/demo.py --workdir runs/demo
    yagg eval --config configs/demo.py --workdir runs/demo --follow   # beside training, or after it

Sized for a 2-core CPU (`yagg model-info --config configs/demo.py` prints its cost): on XLA's CPU backend a step's
time follows the number of positions more than the width, so the clip is small and the top level narrow; the shapes
are 7-9 pixels across at 16 x 16, enough to tell colour, shape and direction apart (README, "What the demo learns").
"""

from __future__ import annotations

import ml_collections

from configs.base import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.num_train_steps = 700
    config.batch_size = 32
    config.log_every = 25
    config.checkpoint_every = 175  # a killed demo loses at most ~2 minutes
    # Only the newest checkpoint is kept, so `make demo`'s `yagg eval` after training scores the final step alone (a
    # shapes eval pass takes most of a minute); `yagg eval --follow` beside training still scores each one.
    config.keep_checkpoints = 1
    config.sample_every = 350
    config.keep_every = 0

    data = config.data
    data.path = "runs/demo/data"
    data.frames = 6  # 8 frames: 1.0 steps/s against 1.2 at 6, measured in the same hour
    data.size = 16
    data.num_shards = 2
    data.text_encoder = "runs/demo/tiny-clip"  # written by `yagg make-tiny-clip --out runs/demo/tiny-clip`
    # The tiny CLIP's shapes (model/tiny_clip.py): projection 64, hidden 64, 77 positions.
    data.text_embed_dim = 64
    data.text_token_dim = 64
    data.text_max_length = 77

    model = config.model
    model.channels = 16
    model.channel_mults = (1, 2, 2)  # 16x16, 8x8, 4x4
    model.num_res_blocks = 1
    model.attention_resolutions = (4,)  # attention at 8x8 cost as much as a whole level; 4x4 and the middle only
    model.head_dim = 16
    model.norm_groups = 8
    model.dtype = "float32"  # bfloat16 is emulated, hence slow, on CPUs

    # One clip per sampler call: on a 2-core CPU a call of 8 demo clips takes as long as 8 calls of one (bench.serve;
    # one clip's convolutions already keep both cores busy), so wider calls would only make a lone request wait.
    config.sampling.lanes_per_device = 1
    config.sampling.num_steps = 25  # 50 scored no better on the shapes probe (README, "What the demo learns")
    # Shape needs stronger guidance than colour and direction: one checkpoint read held-out shape 0.59 / 0.74 / 0.63 at
    # guidance 4 / 8 / 12 (colour and direction >= 0.93 at all three; README, "What the demo learns").
    config.sampling.guidance_scale = 8.0
    # Seen combinations first, then held-out ones: an unseen colour x direction pair, an unseen shape x direction pair
    # (pipeline/shapes.py::HELDOUT_COLOR_DIRECTION, HELDOUT_SHAPE_DIRECTION).
    config.sampling.prompts = (
        "a red circle moving left",
        "a blue square moving up",
        "a green triangle moving right",
        "a yellow triangle moving down",
        "a red square moving up",
        "a cyan square moving right",
    )
    # `yagg eval`: every colour x shape x direction, held-out ones included, so the shapes probe can score them all.
    config.eval.prompts = "shapes"
    config.eval.samples_per_prompt = 1  # 72 clips: 45 of training combinations, 27 held out
    # No "fvd": the I3D at 224 x 224 takes seconds per clip on a CPU, most of an eval pass (README, "Evaluation ->
    # FVD"); add it with --config.eval.evaluators="('val_loss','video','probe','clipsim','frechet_clip','fvd')".
    config.eval.evaluators = ("val_loss", "video", "probe", "clipsim", "frechet_clip")
    config.eval.poll_seconds = 10.0  # checkpoints come every few minutes on a CPU

    # Plain MSE on v, not min-SNR: min-SNR weights the high-noise timesteps, where a clip's layout and motion are
    # decided, by about their SNR (nearly zero). Same 600 steps, probe direction 0.73 with min-SNR 5 and 0.88-1.00
    # without (three seeds; README, "What the demo learns").
    config.diffusion.min_snr_gamma = None

    optimizer = config.optimizer
    optimizer.learning_rate = 2e-3  # a small model and a short run (3e-3 learned colour faster, motion slower)
    optimizer.warmup_steps = 50

    config.ema_decay = 0.99  # an average over ~100 steps: an 800-step run needs a short memory
    config.lock()
    return config
