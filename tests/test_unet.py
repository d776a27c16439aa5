"""The conditional 3D U-Net (model/unet.py, model/layers.py): shapes, conditioning, masks, F = 1, remat, dtypes,
logical axis names, and the sharding the default rules give on 4 fake CPU devices."""

import functools
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.layers import CONV_AXES
from model.unet import UNetConditional3D

REPO = Path(__file__).resolve().parents[1]
B, L, P, D = 2, 6, 5, 7


def tiny_unet(**overrides):
    fields = dict(
        channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        head_dim=8,
        norm_groups=4,
        max_relative_distance=2,
    )
    return UNetConditional3D(**{**fields, **overrides})


def smallest_unet(**overrides):
    """The smallest U-Net with every kind of block: one level, the middle's blocks and one up block (for the tests
    that compile gradients or init, the slow compiles)."""
    return tiny_unet(channel_mults=(1,), num_res_blocks=0, attention_resolutions=(), **overrides)


def inputs(frames=3, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    mask = jnp.array([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], jnp.bool_)  # row 1: the null condition's mask
    return dict(
        x=jax.random.normal(keys[0], (B, frames, 8, 8, 3)),
        t=jnp.array([3, 700]),
        text_pooled=jax.random.normal(keys[1], (B, P)),
        text_tokens=jax.random.normal(keys[2], (B, L, D)),
        text_mask=mask,
    )


def random_params(model, batch, seed=0):
    """Parameters of the model's shapes with every weight nonzero (at init the zero-initialised output layers would
    hide everything), drawn with numpy: compiling `init` costs far more than the rest of these tests' compiles."""
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **batch, train=False)))["params"]
    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan_in = math.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 10
        return jnp.asarray(rng.normal(size=leaf.shape) / math.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map(draw, shapes)


@functools.partial(jax.jit, static_argnums=0)
def run(model, params, batch):
    return model.apply({"params": params}, **batch, train=False)


@pytest.fixture(scope="module")
def factorized():
    model, batch = tiny_unet(), inputs()
    return model, random_params(model, batch), batch


def test_untrained_model_predicts_zero():
    # The output convolution starts at zero, so a fresh model predicts the mean of every target (eps, x0, v).
    # (An "rbg" key: XLA compiles its generator several times faster on CPU than threefry's.)
    model, batch = smallest_unet(), inputs()
    params = jax.jit(lambda: model.init(jax.random.key(0, impl="rbg"), **batch, train=False)["params"])()
    assert not nn.unbox(params)["mid_attn"]["cross_attn"]["out"].any(), "attention starts as the identity too"
    out = run(model, params, batch)
    assert out.shape == batch["x"].shape and out.dtype == jnp.float32
    assert not out.any()


@pytest.mark.parametrize(("conv_mode", "frames"), [("factorized", 3), ("full3d", 3), ("factorized", 1)])
def test_output_shape_and_temporal_mixing(conv_mode, frames):
    model, batch = tiny_unet(conv_mode=conv_mode), inputs(frames)
    params = random_params(model, batch)
    out = run(model, params, batch)
    assert out.shape == batch["x"].shape and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
    if frames > 1:
        # A change in the first frame reaches the last one (temporal convolutions and attention mix frames)...
        changed = run(model, params, {**batch, "x": batch["x"].at[:, 0].add(1.0)})
        assert not np.allclose(out[:, -1], changed[:, -1], atol=1e-5)
        # ...and examples stay independent.
        changed = run(model, params, {**batch, "x": batch["x"].at[1].add(1.0)})
        np.testing.assert_allclose(out[0], changed[0], atol=1e-5)


def test_an_image_batch_is_a_clip_of_one_frame(factorized):
    # F = 1 must be well defined: frame 0 of a 3-frame clip is not what the model sees as a 1-frame clip, but a
    # 1-frame clip is processed the same whether it comes alone or in a batch.
    model, params, batch = factorized
    images = {**batch, "x": batch["x"][:, :1]}
    out = run(model, params, images)
    alone = run(model, params, {key: value[:1] for key, value in images.items()})
    np.testing.assert_allclose(out[:1], alone, atol=1e-5)


def test_text_mask_hides_tokens_and_the_null_condition_adds_nothing(factorized):
    model, params, batch = factorized
    out = run(model, params, batch)
    tokens = batch["text_tokens"]
    # Tokens behind the mask (positions 3.. of row 0, every position of row 1) do not matter, however large.
    hidden = tokens.at[0, 3:].set(1e4).at[1].set(-1e4)
    np.testing.assert_allclose(run(model, params, {**batch, "text_tokens": hidden}), out, atol=1e-5)
    # A visible token does.
    visible = run(model, params, {**batch, "text_tokens": tokens.at[0, 0].add(1.0)})
    assert not np.allclose(visible[0], out[0], atol=1e-4)
    np.testing.assert_allclose(visible[1], out[1], atol=1e-5)
    # The all-zero mask gives the same output as zero tokens: cross-attention contributes exactly nothing.
    np.testing.assert_allclose(run(model, params, {**batch, "text_tokens": tokens.at[1].set(0.0)}), out, atol=1e-6)
    assert np.isfinite(np.asarray(out[1])).all()


def test_pooled_text_and_timestep_condition_the_output(factorized):
    model, params, batch = factorized
    out = run(model, params, batch)
    pooled = run(model, params, {**batch, "text_pooled": batch["text_pooled"] + 1.0})
    assert not np.allclose(pooled, out, atol=1e-4)
    later = run(model, params, {**batch, "t": batch["t"] + 100})
    assert not np.allclose(later, out, atol=1e-4)


def test_remat_changes_nothing_but_memory():
    model, batch = smallest_unet(dropout=0.5), inputs()
    params = random_params(model, batch)
    rngs = {"dropout": jax.random.key(0, impl="rbg")}

    def loss(params, model):
        return jnp.mean(model.apply({"params": params}, **batch, train=True, rngs=rngs) ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, model)
    value_remat, grads_remat = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, model.clone(remat=True))
    np.testing.assert_allclose(value_remat, value, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_remat, grads)


def test_bfloat16_compute_with_float32_parameters():
    model, batch = smallest_unet(), inputs()
    params = random_params(model, batch)
    bf16 = model.clone(dtype=jnp.bfloat16)
    variables = jax.eval_shape(lambda: bf16.init(jax.random.PRNGKey(0), **batch, train=False))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(nn.unbox(variables))} == {jnp.dtype(jnp.float32)}
    out, out_bf16 = run(model, params, batch), run(bf16, params, batch)
    assert out_bf16.dtype == jnp.float32
    assert float(jnp.linalg.norm(out_bf16 - out) / jnp.linalg.norm(out)) < 0.05


def test_dropout_only_in_training():
    model, batch = smallest_unet(dropout=0.5), inputs()
    params = random_params(model, batch)
    inference = run(model, params, batch)
    np.testing.assert_allclose(run(smallest_unet(), params, batch), inference, atol=1e-6)

    @jax.jit
    def train(key):
        return model.apply({"params": params}, **batch, train=True, rngs={"dropout": key})

    key0, key1 = jax.random.key(0, impl="rbg"), jax.random.key(1, impl="rbg")
    assert not np.allclose(train(key0), train(key1), atol=1e-4)
    np.testing.assert_array_equal(train(key0), train(key0))
    assert not np.allclose(train(key0), inference, atol=1e-4)


def test_apply_traces_once_under_jit(factorized):
    model, params, batch = factorized
    traces = []

    @jax.jit
    def apply(params, batch):
        traces.append(1)  # a Python side effect: runs when jax traces, not when the compiled function runs
        return run(model, params, batch)

    first = apply(params, batch)
    second = apply(params, {**batch, "x": batch["x"] + 1.0, "t": batch["t"] + 1})
    assert len(traces) == 1
    assert not np.allclose(first, second)


@pytest.mark.parametrize("conv_mode", ["factorized", "full3d"])
def test_every_parameter_axis_has_a_logical_name(conv_mode):
    model = tiny_unet(conv_mode=conv_mode)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **inputs(), train=False))
    boxed = jax.tree_util.tree_leaves_with_path(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(boxed) > 50
    for path, leaf in boxed:
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), name
        assert len(leaf.names) == leaf.value.ndim and None not in leaf.names, name
        assert len(set(leaf.names)) == len(leaf.names), name
        if name.endswith("['kernel']") and leaf.value.ndim == 5:
            assert leaf.names[:3] == CONV_AXES[:3], name
            assert leaf.names[3] in ("conv_in", "image_channels") and leaf.names[4] in ("conv_out", "image_channels")


SHARDING_SCRIPT = textwrap.dedent(
    """
    import json
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from model.build import build_unet, example_inputs
    from yagg.config import load_config

    config = load_config("configs/demo.py")
    rules = tuple((name, tuple(axis) if isinstance(axis, list) else axis) for name, axis in config.sharding_rules)
    mesh = Mesh(np.array(jax.devices()).reshape(1, 4), ("data", "fsdp"))
    model = build_unet(config)
    batch = {k: jnp.zeros(s.shape, s.dtype) for k, s in example_inputs(config, 4).items()}
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **batch, train=False))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    # Ones instead of a random init: the layout is under test, not the values (and no RNG keeps the compile short).
    params = jax.jit(lambda: jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), nn.unbox(abstract)),
                     out_shardings=nn.unbox(shardings))()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
        out = jax.jit(lambda p, b: model.apply(p, **b, train=False))(params, batch)

    def spec(leaf):
        return [list(a) if isinstance(a, tuple) else a for a in leaf.sharding.spec] + [None] * (
            leaf.ndim - len(leaf.sharding.spec))

    specs = {jax.tree_util.keystr(p): [spec(leaf), list(leaf.shape)]
             for p, leaf in jax.tree_util.tree_leaves_with_path(params["params"])}
    print(json.dumps({"params": specs, "output_shard": list(out.sharding.shard_shape(out.shape)),
                      "output_shape": list(out.shape)}))
    """
)


@pytest.fixture(scope="module")
def demo_sharding():
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", SHARDING_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("param", "spec"),
    [
        ("['conv_in']['kernel']", [None, None, None, None, "fsdp"]),
        ("['down_0_res_0']['conv1']['temporal']['kernel']", [None, None, None, None, "fsdp"]),
        ("['down_0_res_0']['conv1']['temporal']['bias']", ["fsdp"]),
        ("['down_0_res_0']['norm1']['scale']", [None]),
        ("['down_0_res_0']['emb_proj']['kernel']", [None, "fsdp"]),
        ("['mid_attn']['spatial_attn']['query']", ["fsdp", None, None]),
        ("['mid_attn']['temporal_attn']['out']", [None, None, "fsdp"]),
        ("['mid_attn']['cross_attn']['key']", ["fsdp", None, None]),
        ("['mid_attn']['rel_pos_bias']['table']", [None, None]),
        ("['time_mlp_1']['kernel']", ["fsdp", None]),
        ("['text_pooled_proj']['kernel']", [None, "fsdp"]),
        # The image-side axis (3 channels) is never split.
        ("['conv_out']['kernel']", [None, None, None, None, None]),
        ("['conv_out']['bias']", [None]),
    ],
)
def test_default_rules_shard_parameters_over_fsdp(demo_sharding, param, spec):
    assert demo_sharding["params"][param][0] == spec


def test_sharded_demo_model_runs_on_four_devices(demo_sharding):
    for name, (spec, shape) in demo_sharding["params"].items():
        for axis, size in zip(spec, shape, strict=True):
            assert axis is None or size % 4 == 0, f"{name}: axis of {size} split over 4 devices"
    # The output keeps the batch split over the devices, as the activation rules say ("batch" -> data and fsdp).
    assert demo_sharding["output_shape"][0] == 4
    assert demo_sharding["output_shard"] == [1, *demo_sharding["output_shape"][1:]]
