"""`train_and_evaluate(config, workdir)`: the training run, from dataset check to the last checkpoint.

Steps: check the config against dataset_info.json -> build the mesh, model and optimizer -> restore the newest good
checkpoint (or initialise, already sharded) -> loop {global batch, jitted step, log, checkpoint, samples} until
`num_train_steps`, a non-finite loss (raises NonFiniteLossError), or SIGTERM (saves, returns).

Metrics stay on the devices until a log or checkpoint step, so the host keeps dispatching steps ahead of the
accelerators; they are fetched and checked for non-finite losses before anything is logged or saved, which also
guarantees that no checkpoint holds parameters updated from a non-finite loss.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from contracts import storage
from contracts.checkpoint import Checkpointer, CheckpointError
from contracts.dataset import DataError, DataFacts, local_shards, read_dataset_info
from inference.generator import GenerateError
from model.build import build_schedule, build_unet, params_initializer
from parallel import mesh as mesh_lib
from train import input as input_lib
from train import state as state_lib
from train import step as step_lib
from train.metrics import MetricsLogger, StepMetrics, compiled_flops
from train.samples import SampleWriter
from yagg.config import ConfigError

log = logging.getLogger(__name__)

# Errors a user causes with a flag, a config value or a dataset; `yagg train` prints them without a traceback.
UsageErrors = (ConfigError, DataError, mesh_lib.MeshError, CheckpointError, GenerateError, storage.PathError)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped without saving the damaged state."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    step: int  # the last step completed (and checkpointed)
    preempted: bool  # stopped early by SIGTERM, after saving
    last_metrics: dict[str, Any] | None  # the last record written to metrics.jsonl


def _check_config(config: ml_collections.ConfigDict) -> None:
    for name in ("num_train_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
        if int(config[name]) < 1:
            raise ConfigError(f"{name} must be at least 1, got {config[name]}")
    for name in ("sample_every", "keep_every"):
        if int(config[name]) < 0:
            raise ConfigError(f"{name} must be 0 (off) or positive, got {config[name]}")
    if config.checkpoint_every % config.log_every:
        # A resume starts at a checkpoint; if that is mid-interval, the first logged averages cover fewer steps.
        log.warning(
            "checkpoint_every is not a multiple of log_every: a resumed run's first log line averages "
            "fewer steps than an uninterrupted run's"
        )


class _Preemption:
    """SIGTERM in a single-process run sets a flag the loop checks after each step (the default would kill it).

    In a multi-process job JAX's preemption service owns SIGTERM and picks one step for all processes
    (Checkpointer.reached_preemption), so no handler is installed there; nor off the main thread, where Python
    cannot install one (a caller running training in a thread handles signals itself).
    """

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def installed(self) -> Iterator[_Preemption]:
        if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum: int, frame: Any) -> None:
            log.warning("SIGTERM: saving a checkpoint after the current step, then exiting")
            self.requested = True

        previous = signal.signal(signal.SIGTERM, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)


def _flush(pending: list[tuple[int, Any]], interval: StepMetrics, ckpt: Checkpointer) -> None:
    """Moves the steps' device metrics to the host, stopping at the first non-finite loss."""
    for step, metrics in jax.device_get(pending):
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
            ckpt.wait()
            good = ckpt.latest_step()
            where = (
                f"the last good checkpoint is step {good} in {ckpt.directory}; a restart resumes from it"
                if good is not None
                else "no checkpoint was saved yet"
            )
            raise NonFiniteLossError(
                f"loss is {loss} at step {step}; training stopped and this state was not saved. {where}. "
                "Lower optimizer.learning_rate or optimizer.grad_clip_norm, or raise optimizer.warmup_steps"
            )
        interval.add(metrics)
    pending.clear()


@dataclasses.dataclass
class _Run:
    """What the loop needs, built once by train_and_evaluate."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    train_step: Any  # compiled (state, batch, rng) -> (state, metrics)
    rng: jax.Array
    data_iter: Any
    ckpt: Checkpointer
    logger: MetricsLogger
    samples: SampleWriter | None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    """Trains (or resumes) the run in `workdir` (a local path or gs://); see the module docstring."""
    workdir = storage.check(workdir, "--workdir")
    data_path = storage.check(config.data.path, "data.path")
    _check_config(config)
    info = read_dataset_info(data_path)
    info.check_fits(config.data)
    if info.splits["train"].examples == 0:
        raise DataError(f"the dataset at {data_path} has no training examples")
    paths = local_shards(data_path, info)
    is_writer = jax.process_index() == 0
    if is_writer:
        storage.makedirs(workdir)

    mesh = mesh_lib.make_mesh(config.mesh)
    rules = mesh_lib.logical_rules(config.sharding_rules)
    global_batch = int(config.batch_size)
    rows = mesh_lib.global_batch_rows(mesh, global_batch)
    log.info(
        "%d process(es), %d device(s), mesh %s; global batch %d, %d rows per process",
        jax.process_count(),
        jax.device_count(),
        dict(mesh.shape),
        global_batch,
        len(rows),
    )

    try:
        model, schedule = build_unet(config), build_schedule(config)
    except ValueError as e:  # build_* name the config field that is wrong
        raise ConfigError(str(e)) from e
    tx, lr_schedule = state_lib.make_optimizer(config.optimizer, config.num_train_steps)
    plan = state_lib.plan_state(params_initializer(model, config), tx, mesh, rules)
    # Made by a jitted function so the keys are global (replicated) arrays that every process can pass and save.
    init_key, rng = jax.jit(
        lambda: tuple(jax.random.split(jax.random.PRNGKey(int(config.seed)))), out_shardings=mesh_lib.replicated(mesh)
    )()

    data_iter = iter(
        input_lib.make_train_dataset(
            paths,
            global_batch=global_batch,
            rows=rows,
            seed=int(config.seed),
            num_threads=int(config.data.loader_threads),
            prefetch=int(config.data.prefetch_batches),
        )
    )
    ckpt = Checkpointer(workdir, keep=int(config.keep_checkpoints), keep_every=int(config.keep_every))
    try:
        abstract_rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=rng.sharding)
        restored = ckpt.restore_latest(plan.abstract, abstract_rng, data_iter)
        if restored is None:
            state, start = plan.create(init_key), 0
            log.info("no checkpoint in %s: starting from step 0", ckpt.directory)
        else:
            state, rng, start = restored
            log.info("resumed from step %d (%s)", start, ckpt.directory / str(start))

        train_step = _compile_step(
            config, info.features, model, schedule, tx, lr_schedule, plan, mesh, rules, state, rng
        )
        samples = None
        if config.sample_every:
            facts = DataFacts.of_dataset(data_path, info)
            samples = SampleWriter(config, facts, mesh, plan.shardings.ema_params, workdir)
        logger = MetricsLogger(
            workdir,
            is_writer=is_writer,
            start_step=start,
            total_steps=int(config.num_train_steps),
            examples_per_step=global_batch,
            flops_per_step_per_device=compiled_flops(train_step),
            peak_flops_per_device=float(config.peak_flops_per_device) or None,
        )
        try:
            with _Preemption().installed() as preemption:
                return _loop(
                    _Run(config, mesh, train_step, rng, data_iter, ckpt, logger, samples), state, start, preemption
                )
        finally:
            logger.close()
    finally:
        ckpt.wait()
        ckpt.close()


# XLA:CPU options for the train step. Since jax 0.10 XLA:CPU hands convolutions to YNNPACK by default; on the demo's
# narrow convolutions (16-64 channels, frames folded into the batch) XLA's own (Eigen) convolutions make the step
# faster, so only YNNPACK's dots and reductions stay on (the value lists the fusion types kept; it replaces XLA's
# default list). Both compiled in one process and timed in alternation (best of 8 demo steps on the shared 2-core
# development CPU): 1.67 -> 1.58 s (median 1.83 -> 1.65 s); at model.channels=32, 4.75 -> 3.61 s. Accelerators
# compile with their own defaults.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
}


def _compile_step(
    config: ml_collections.ConfigDict,
    features: dict[str, dict[str, Any]],
    model: nn.Module,
    schedule: Any,
    tx: Any,
    lr_schedule: Any,
    plan: state_lib.StatePlan,
    mesh: jax.sharding.Mesh,
    rules: tuple[tuple[str, Any], ...],
    state: state_lib.TrainState,
    rng: jax.Array,
) -> Any:
    """Ahead-of-time compiled step (compiling before the loop keeps compile time out of the first step's timing and
    gives XLA's FLOP count for MFU)."""
    step_fn = functools.partial(
        step_lib.train_step,
        model=model,
        schedule=schedule,
        tx=tx,
        learning_rate=lr_schedule,
        ema_decay=float(config.ema_decay),
        loss_kwargs=_loss_kwargs(config),
    )
    jitted = step_lib.jit_train_step(step_fn, plan.shardings, input_lib.BATCH_FIELDS, mesh)
    batch = {
        name: jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=mesh_lib.batch_sharding(mesh))
        for name, spec in input_lib.batch_spec(features, int(config.batch_size)).items()
    }
    options = CPU_COMPILER_OPTIONS if mesh.devices.flat[0].platform == "cpu" else None
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jitted.lower(state, batch, rng).compile(compiler_options=options)


def _loss_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    gamma = config.diffusion.min_snr_gamma
    return {
        "cond_drop_prob": float(config.diffusion.cond_drop_prob),
        "min_snr_gamma": None if gamma is None else float(gamma),
    }


def _loop(run: _Run, state: state_lib.TrainState, start: int, preemption: _Preemption) -> TrainResult:
    config = run.config
    total, global_batch = int(config.num_train_steps), int(config.batch_size)
    pending: list[tuple[int, Any]] = []
    interval = StepMetrics()
    last_record = None
    step = start
    while step < total:
        batch = mesh_lib.host_batch_to_global(next(run.data_iter), run.mesh, global_batch)
        state, metrics = run.train_step(state, batch, run.rng)
        step += 1
        pending.append((step, metrics))
        preempted = preemption.requested or (jax.process_count() > 1 and run.ckpt.reached_preemption(step))
        if step % config.log_every == 0 or step == total or preempted:
            _flush(pending, interval, run.ckpt)
            last_record = run.logger.write(step, interval.summary())
            interval.reset()
        if step % config.checkpoint_every == 0 or step == total or preempted:
            _flush(pending, interval, run.ckpt)
            run.ckpt.save(step, state, run.rng, run.data_iter, config)
        if preempted:
            log.warning("preempted: saved a checkpoint at step %d; run the same command again to resume", step)
            return TrainResult(step=step, preempted=True, last_metrics=last_record)
        if run.samples is not None and step % config.sample_every == 0:
            started = time.perf_counter()
            folder = run.samples(step, state.ema_params, run.logger)
            run.logger.exclude_time(time.perf_counter() - started)
            if folder is not None:
                log.info("samples of step %d in %s", step, folder)
    log.info("finished: %d steps", total)
    return TrainResult(step=step, preempted=False, last_metrics=last_record)
