"""What a config's model costs: parameters, training FLOPs and activation memory per example.

    yagg model-info --config configs/tgif64.py [--batch-size 8] [--config.model.channels=96 ...]

Nothing is allocated: parameters come from `jax.eval_shape` of `init`, and the training step (forward and backward
of model/diffusion.py::diffusion_loss) is lowered with abstract inputs and compiled for this machine's backend, whose
cost and memory analyses give the numbers. The FLOP count is XLA's, of the compiled program (with `remat` it
includes the recomputation); memory is the compiled program's temporary buffers, i.e. activations and other
intermediates, divided by the batch size (so a small share of batch-independent buffers is spread over it). Figures
come from the backend the command runs on and differ somewhat between CPU, GPU and TPU compilers.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from model.build import build_schedule, build_unet, example_inputs
from model.diffusion import CONDITION_KEYS, diffusion_loss


def _param_shapes(model: nn.Module, inputs: dict[str, jax.ShapeDtypeStruct]) -> Any:
    def init(key: jax.Array) -> Any:
        return model.init(key, **{k: jnp.zeros(s.shape, s.dtype) for k, s in inputs.items()}, train=False)["params"]

    return nn.unbox(jax.eval_shape(init, jax.random.PRNGKey(0)))


def _train_step_compiled(config: ml_collections.ConfigDict, model: nn.Module, params: Any, batch_size: int) -> Any:
    schedule = build_schedule(config)
    inputs = example_inputs(config, batch_size)
    condition = {key: inputs[key] for key in CONDITION_KEYS}

    def loss(params: Any, x0: jax.Array, condition: dict[str, jax.Array], rng: jax.Array) -> jax.Array:
        loss_key, dropout_key = jax.random.split(rng)
        value, _ = diffusion_loss(
            model.apply,
            params,
            schedule,
            x0,
            condition,
            loss_key,
            cond_drop_prob=float(config.diffusion.cond_drop_prob),
            min_snr_gamma=config.diffusion.min_snr_gamma,
            rngs={"dropout": dropout_key},
        )
        return value

    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    return jax.jit(jax.value_and_grad(loss)).lower(params, inputs["x"], condition, key).compile()


def model_info(config: ml_collections.ConfigDict, batch_size: int = 8) -> dict[str, Any]:
    """Parameter count and, from a training step compiled for `batch_size` examples, FLOPs and temporary bytes per
    example. Keys: params, param_bytes, input_shape, dtype, param_dtype, train_flops_per_example,
    activation_bytes_per_example, batch_size, backend."""
    model = build_unet(config)
    params = _param_shapes(model, example_inputs(config, 1))
    leaves = jax.tree_util.tree_leaves(params)
    compiled = _train_step_compiled(config, model, params, batch_size)
    cost = compiled.cost_analysis()
    # Older jax versions return one dict per program in a list.
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    d = config.data
    return {
        "params": sum(math.prod(leaf.shape) for leaf in leaves),
        "param_bytes": sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in leaves),
        "input_shape": (int(d.frames), int(d.size), int(d.size), 3),
        "dtype": str(config.model.dtype),
        "param_dtype": str(config.model.param_dtype),
        "train_flops_per_example": float(cost["flops"]) / batch_size,
        "activation_bytes_per_example": memory.temp_size_in_bytes / batch_size,
        "batch_size": batch_size,
        "backend": jax.default_backend(),
    }


def print_model_info(config: ml_collections.ConfigDict, batch_size: int = 8) -> dict[str, Any]:
    """Prints `model_info(config)` as a short table and returns it."""
    info = model_info(config, batch_size)
    frames, height, width, channels = info["input_shape"]
    rows = [
        ("input (F x H x W x C)", f"{frames} x {height} x {width} x {channels}"),
        ("parameters", f"{info['params']:,} ({info['param_bytes'] / 2**20:,.1f} MiB as {info['param_dtype']})"),
        ("compute dtype", info["dtype"]),
        ("train FLOPs / example", f"{info['train_flops_per_example'] / 1e9:,.2f} GFLOP (forward + backward)"),
        ("activations / example", f"{info['activation_bytes_per_example'] / 2**20:,.1f} MiB"),
        ("measured on", f"{info['backend']} compiler, batch of {info['batch_size']}"),
    ]
    width_ = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width_}}  {value}")
    return info


def main(argv: Sequence[str] | None = None) -> int:
    """`yagg model-info`: parses flags, prints `model_info`; returns the exit status (2 for a usage error)."""
    parser = argparse.ArgumentParser(
        prog="yagg model-info",
        description="Parameters, training FLOPs and activation memory per example of a config's model, from XLA's "
        "analysis of the compiled training step (nothing is allocated). Any --config.FIELD=VALUE overrides a field.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="a configs/*.py file (get_config())")
    parser.add_argument("--batch-size", type=int, default=8, help="examples in the analysed step (default 8)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    strays = [a for a in rest if not a.startswith("--config.")]
    if strays or args.batch_size < 1:
        problem = f"unrecognised argument(s) {' '.join(strays)}" if strays else "--batch-size must be at least 1"
        print(f"yagg model-info: error: {problem} (overrides are --config.a.b=value)", file=sys.stderr)
        return 2

    from yagg.config import ConfigError, load_config

    try:
        config = load_config(args.config, rest)
        build_unet(config)  # checks the model section before the slow part
        build_schedule(config)
    except (ConfigError, ValueError) as e:
        print(f"yagg model-info: error: {e}", file=sys.stderr)
        return 2
    print_model_info(config, args.batch_size)
    return 0
