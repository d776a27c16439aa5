"""The named configs (configs/*.py), the config -> model translation (model/build.py) and model-info (model/info.py)."""

import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from model.build import build_schedule, build_unet, example_inputs
from model.info import main as model_info_main
from yagg.config import ConfigError, apply_override, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NAMED = ("demo", "tgif64", "tgif128")

# Fields the pipeline, trainer, sampler and evaluator read (configs/base.py documents each), by section ("" = top).
FIELDS = {
    "": ("seed", "num_train_steps", "batch_size", "log_every", "checkpoint_every", "sample_every", "keep_checkpoints",
         "keep_every", "ema_decay", "peak_flops_per_device", "sharding_rules"),
    "data": ("path", "frames", "size", "fps", "val_fraction", "num_shards", "text_encoder", "keep_stills",
             "text_embed_dim", "text_token_dim", "text_max_length", "loader_threads", "prefetch_batches"),
    "model": ("channels", "channel_mults", "num_res_blocks", "attention_resolutions", "head_dim",
              "max_relative_distance", "dropout", "conv_mode", "norm_groups", "dtype", "param_dtype", "remat"),
    "diffusion": ("schedule", "num_timesteps", "prediction_type", "min_snr_gamma", "cond_drop_prob"),
    "sampling": ("method", "num_steps", "guidance_scale", "eta", "prompts", "seed"),
    "optimizer": ("learning_rate", "warmup_steps", "b1", "b2", "weight_decay", "grad_clip_norm"),
    "mesh": ("data", "fsdp"),
}  # fmt: skip

# Golden parameter counts: a change here is a change of architecture or config; update them knowingly.
PARAMS = {"demo": 402_283, "tgif64": 129_255_633, "tgif128": 303_830_550}


def load(name, overrides=()):
    return load_config(CONFIGS / f"{name}.py", overrides)


def count_params(config):
    model = build_unet(config)
    inputs = {k: jnp.zeros(s.shape, s.dtype) for k, s in example_inputs(config, 1).items()}
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **inputs, train=False))
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(nn.unbox(shapes)))


@pytest.mark.parametrize("name", ("base", *NAMED))
def test_config_has_every_field_and_is_locked(name):
    config = load(name)
    for section, fields in FIELDS.items():
        node = config[section] if section else config
        missing = [field for field in fields if field not in node]
        assert not missing, f"{name}: {section or 'top level'} lacks {missing}"
    with pytest.raises(ConfigError, match="no field"):
        apply_override(config, "model.chanels=64")
    with pytest.raises(AttributeError):
        config.model.new_field = 1
    assert build_schedule(config).num_timesteps == config.diffusion.num_timesteps
    assert build_unet(config).channels == config.model.channels
    assert config.sampling.prompts


@pytest.mark.parametrize("name", NAMED)
def test_parameter_counts(name):
    assert count_params(load(name)) == PARAMS[name]


def test_parameter_scale_of_each_config():
    assert PARAMS["demo"] < 1_000_000, "the demo trains on a 2-core CPU"
    assert 100_000_000 <= PARAMS["tgif64"] < 200_000_000
    assert PARAMS["tgif128"] > 2 * PARAMS["tgif64"]


def test_tgif_configs_use_clip_vit_b32_and_bfloat16():
    for name in ("tgif64", "tgif128"):
        config = load(name)
        assert (config.data.text_embed_dim, config.data.text_token_dim, config.data.text_max_length) == (512, 512, 77)
        assert (config.model.dtype, config.model.param_dtype) == ("bfloat16", "float32")
        assert config.data.frames == 16
    assert load("tgif64").data.size == 64 and load("tgif128").data.size == 128


def test_demo_text_dims_are_the_tiny_clips():
    from model.tiny_clip import PROJECTION_DIM, TEXT

    data = load("demo").data
    assert data.text_embed_dim == PROJECTION_DIM
    assert data.text_token_dim == TEXT["hidden_size"]
    assert data.text_max_length == TEXT["max_position_embeddings"]


def test_demo_prompts_describe_shapes_and_include_held_out_pairs():
    from pipeline.shapes import HELDOUT_COLOR_DIRECTION, HELDOUT_SHAPE_DIRECTION, is_heldout, parse_caption

    combos = [parse_caption(prompt) for prompt in load("demo").sampling.prompts]
    assert None not in combos, "every prompt is a moving-shapes caption"
    assert any((c, d) in HELDOUT_COLOR_DIRECTION for c, _, d in combos), "an unseen colour x direction pair"
    assert any((s, d) in HELDOUT_SHAPE_DIRECTION for _, s, d in combos), "an unseen shape x direction pair"
    assert not all(is_heldout(*c) for c in combos), "and combinations seen in training"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.conv_mode='3d'", "conv_mode"),
        ("model.dtype='float16'", "model.dtype"),
        ("data.size=18", "divisible by 4"),
        ("model.head_dim=12", "head_dim"),
    ],
)
def test_build_unet_rejects_bad_model_fields(override, message):
    with pytest.raises(ValueError, match=message):
        build_unet(load("demo", [override]))


def test_build_schedule_rejects_unknown_prediction_type():
    with pytest.raises(ValueError, match="prediction type"):
        build_schedule(load("demo", ["diffusion.prediction_type='epsilon'"]))


def test_model_info_on_demo(capsys):
    assert model_info_main(["--config", str(CONFIGS / "demo.py"), "--batch-size", "2"]) == 0
    table = dict(line.split("  ", 1) for line in capsys.readouterr().out.splitlines())
    table = {name.strip(): value.strip() for name, value in table.items()}
    assert table["input (F x H x W x C)"] == "6 x 16 x 16 x 3"
    assert table["parameters"] == f"{PARAMS['demo']:,} (1.5 MiB as float32)"
    # Convolution weights are reused at every position, so a training step costs far more than 6 FLOPs per parameter.
    gflops = float(table["train FLOPs / example"].split()[0])
    assert gflops * 1e9 > 100 * 6 * PARAMS["demo"]
    assert float(table["activations / example"].split()[0]) > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "configs/nope.py"], "does not exist"),
        (["--config", str(CONFIGS / "demo.py"), "--config.model.conv_mode=3d"], "conv_mode"),
        (["--config", str(CONFIGS / "demo.py"), "--batch"], "unrecognised"),
    ],
)
def test_model_info_usage_errors(argv, message, capsys):
    assert model_info_main(argv) == 2
    assert message in capsys.readouterr().err
