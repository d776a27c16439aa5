"""`train_gpu_mfu_tgif64`: model FLOP utilisation of the tgif64 train step in bfloat16 on a GPU, when there is one.

    python -m bench.gpu_mfu [--quick] [--config configs/tgif64.py] [--config.batch_size=16 ...]

The same measurement as `bench.train_mfu` (the trainer's own compiled step, XLA's FLOP count, the best step time,
step and matmul peak measured in alternation; see that module's docstring) on configs/tgif64.py with
`model.dtype = "bfloat16"` (its default), against the device's dense bfloat16 peak measured in this process: a jitted
`jnp.dot` of two PEAK_MATMUL_SIZE-square bfloat16 matrices, in bursts about as long as a step. The device name is
recorded. The global batch is BATCH_PER_DEVICE x the device count unless `--config.batch_size` is given (tgif64's
own 128 is a multi-host figure and does not fit one GPU's memory without remat).

Without a GPU (jax's first device is not a "gpu" device), the metric is written with no value and `skipped` says
why.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from bench.common import Metric, write_metrics
from bench.train_mfu import build_train_step, describe, load, measure_mfu, parse_config_args, reproduce_command

DEFAULT_CONFIG = "configs/tgif64.py"
PEAK_MATMUL_SIZE = 8192  # large enough to saturate an H100's tensor cores in bfloat16
BATCH_PER_DEVICE = 16


def measure(config: ml_collections.ConfigDict, rounds: int, peak_size: int = PEAK_MATMUL_SIZE) -> tuple[float, dict]:
    """(MFU, details) of the config's train step against a bfloat16 matmul peak, on jax's default devices."""
    step = build_train_step(config)
    figures = measure_mfu(step, rounds=rounds, peak_size=peak_size, dtype=jnp.bfloat16)
    details = {
        "device": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "model": describe(config),
        "compile_seconds": step.compile_seconds,
        **{k: v for k, v in figures.items() if k not in ("mfu", "cpu_utilisation", "mfu_per_cpu_second")},
    }
    return figures["mfu"], details


def main() -> None:
    args, overrides = parse_config_args(__doc__.split("\n")[0], DEFAULT_CONFIG)
    command = reproduce_command("bench.gpu_mfu", args, overrides, DEFAULT_CONFIG)
    device = jax.devices()[0]
    common = dict(name="train_gpu_mfu_tgif64", goal=">= 0.40", command=command, unit="fraction of measured bf16 peak")
    if device.platform != "gpu":
        reason = f"no GPU: jax's first device is {device.platform} ({device.device_kind})"
        write_metrics([Metric(value=None, skipped=reason, **common)], args.json)
        return
    given = any(o.startswith("--config.batch_size=") for o in overrides)
    batch = [] if given else [f"--config.batch_size={BATCH_PER_DEVICE * jax.device_count()}"]
    config = load(args.config, ["--config.model.dtype=bfloat16", *batch, *overrides])
    mfu, details = measure(config, rounds=5 if args.quick else 20)
    details = {"config": args.config, "overrides": [*batch, *overrides], **details}
    write_metrics([Metric(value=mfu, details=details, **common)], args.json)


if __name__ == "__main__":
    main()
