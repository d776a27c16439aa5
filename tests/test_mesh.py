"""The mesh (train/mesh.py): sizes from config, rules, which rows a process loads, and the PartitionSpec every named
parameter gets on 4 fake CPU devices (in a subprocess, since this process's jax may already be initialised)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parallel import mesh as mesh_lib

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("data", "fsdp", "devices", "expected"),
    [(-1, 1, 8, (8, 1)), (-1, 2, 8, (4, 2)), (2, -1, 8, (2, 4)), (2, 4, 8, (2, 4)), (1, 1, 1, (1, 1))],
)
def test_mesh_shape_fills_the_minus_one_axis(data, fsdp, devices, expected):
    assert mesh_lib.mesh_shape(data, fsdp, devices) == expected


@pytest.mark.parametrize(
    ("data", "fsdp", "devices", "message"),
    [
        (-1, -1, 8, "at most one"),
        (3, -1, 8, "does not divide"),
        (2, 2, 8, "uses 4 devices but this job has 8"),
        (0, 1, 8, "positive size"),
    ],
)
def test_mesh_shape_errors_say_what_to_change(data, fsdp, devices, message):
    with pytest.raises(mesh_lib.MeshError, match=message):
        mesh_lib.mesh_shape(data, fsdp, devices)


def test_rules_naming_an_unknown_mesh_axis_are_refused():
    assert mesh_lib.logical_rules([["embed", "fsdp"], ["norm", None]]) == (("embed", "fsdp"), ("norm", None))
    with pytest.raises(mesh_lib.MeshError, match="'model'"):
        mesh_lib.logical_rules([("embed", "model")])


PROBE = """
import json, sys
import flax.linen as nn
import jax
import jax.numpy as jnp
from parallel import mesh as mesh_lib
from train import state as state_lib
from model.build import params_initializer
from model.build import build_unet
from yagg.config import load_config

config = load_config(sys.argv[1], sys.argv[2:])
mesh = mesh_lib.make_mesh(config.mesh)
rules = mesh_lib.logical_rules(config.sharding_rules)
tx, _ = state_lib.make_optimizer(config.optimizer, config.num_train_steps)
plan = state_lib.plan_state(params_initializer(build_unet(config), config), tx, mesh, rules)
specs = {
    jax.tree_util.keystr(path): [list(a) if isinstance(a, tuple) else a for a in sharding.spec]
    for path, sharding in jax.tree_util.tree_leaves_with_path(plan.shardings.params)
}
shapes = {jax.tree_util.keystr(p): list(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(plan.abstract.params)}
rows = mesh_lib.global_batch_rows(mesh, 8).tolist()
# A parameter whose fsdp axis has 3 entries: 2 devices cannot split it evenly.
toy = {
    name: nn.LogicallyPartitioned(jax.ShapeDtypeStruct((size, 8), jnp.float32), ("embed", "norm"))
    for name, size in (("odd", 3), ("even", 4))
}
toy = {k: list(v.spec) for k, v in mesh_lib.logical_shardings(toy, mesh, rules).items()}
print(json.dumps({"mesh": dict(mesh.shape), "specs": specs, "shapes": shapes, "rows": rows, "toy": toy}))
"""


def _probe(*overrides):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO / "configs" / "base.py"), *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


TINY_MODEL = [
    "--config.data.frames=4",
    "--config.data.size=16",
    "--config.model.channels=8",
    "--config.model.channel_mults=(1,)",
    "--config.model.num_res_blocks=1",
    "--config.model.attention_resolutions=()",
    "--config.model.head_dim=8",
    "--config.model.norm_groups=4",
]


def test_partition_spec_of_every_named_parameter_on_4_devices():
    out = _probe(*TINY_MODEL, "--config.mesh.data=-1", "--config.mesh.fsdp=2")
    assert out["mesh"] == {"data": 2, "fsdp": 2}
    specs, shapes = out["specs"], out["shapes"]
    # Conv kernels (conv_t, conv_h, conv_w, conv_in, conv_out): only the output channels are split.
    assert specs["['down_0_res_0']['conv1']['spatial']['kernel']"] == [None, None, None, None, "fsdp"]
    assert specs["['down_0_res_0']['conv1']['temporal']['kernel']"] == [None, None, None, None, "fsdp"]
    assert specs["['down_0_res_0']['conv1']['spatial']['bias']"] == ["fsdp"]
    # Attention projections (embed, heads, head_dim) split on embed; the output projection on its last axis.
    assert specs["['mid_attn']['spatial_attn']['query']"] == ["fsdp", None, None]
    assert specs["['mid_attn']['cross_attn']['key']"] == ["fsdp", None, None]
    assert specs["['mid_attn']['spatial_attn']['out']"] == [None, None, "fsdp"]
    # Dense layers of the conditioning MLPs.
    assert specs["['time_mlp_1']['kernel']"] == ["fsdp", None]
    assert specs["['text_pooled_proj']['kernel']"] == [None, "fsdp"]
    for path, spec in specs.items():
        assert len(spec) == len(shapes[path]), path
        assert set(spec) <= {None, "fsdp"}, path  # the data axis only ever splits the batch
        if "norm" in path or "rel_pos" in path:  # norms and the position table are small: never split
            assert set(spec) == {None}, path
        if path.startswith("['conv_out']") and path.endswith("['kernel']"):
            assert spec[-1] is None, path  # the 3 RGB channels
    # An axis fsdp does not divide stays whole rather than failing at initialisation.
    assert out["toy"] == {"odd": [None, None], "even": ["fsdp", None]}
    # One process holds all 4 devices, so it loads every row of a global batch of 8.
    assert out["rows"] == list(range(8))
