"""Loading the model and making it ready, on a thread of its own while the server already answers /healthz.

Steps: point JAX at the persistent compilation cache (so a restart loads compiled programs instead of compiling) ->
load the parameters (an export, or a workdir's newest finished checkpoint) -> compile every call a request can need
(`Generator.warm_up`: each text length bucket and the denoising step; step counts, methods, guidance, eta and seeds
are inputs, so no request compiles anything) -> start the scheduler -> ready. With --follow, the same thread then
watches the workdir and swaps in each newly finished checkpoint between batches.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)
_LISTENING = threading.Lock()  # JAX's monitoring listeners are process-wide: registered once per process
_METRICS: list[Any] = []


def configure_compile_cache(folder: str) -> None:
    """JAX's persistent compilation cache in `folder` ("none": off), for every program however quick to compile."""
    import jax

    if folder.lower() == "none":
        return
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _count_compiles(metrics: Any) -> None:
    """Counts XLA compilations and cache hits into `metrics` (the last registered app's, in a process)."""
    from jax import monitoring
    from jax._src.dispatch import BACKEND_COMPILE_EVENT

    with _LISTENING:
        first = not _METRICS
        _METRICS[:] = [metrics]
        if not first:
            return

        def on_duration(event: str, duration: float, **kwargs: Any) -> None:
            if event == BACKEND_COMPILE_EVENT:
                _METRICS[0].compile_requested()

        def on_event(event: str, **kwargs: Any) -> None:
            if event == "/jax/compilation_cache/cache_hits":
                _METRICS[0].cache_hit()

        monitoring.register_event_duration_secs_listener(on_duration)
        monitoring.register_event_listener(on_event)


def load_and_warm_up(state: Any, stop: threading.Event) -> None:
    """The loading thread of serve/app.py: sets state.scheduler and state.status ("ready" or "failed")."""
    import jax

    from contracts.checkpoint import ReadError
    from inference.generator import GenerateError, Generator
    from parallel.mesh import MeshError
    from serve.scheduler import Scheduler

    s = state.settings
    started = time.monotonic()
    try:
        configure_compile_cache(s.compile_cache)
        _count_compiles(state.metrics)
        devices = jax.local_device_count()
        if s.max_batch is not None and s.max_batch % devices:
            raise GenerateError(f"--max-batch {s.max_batch} must be a multiple of the {devices} local devices")
        lanes = None if s.max_batch is None else s.max_batch // devices
        kind, source = ("model", s.model) if s.model else ("workdir", s.workdir)
        generator = Generator.load(source, kind=kind, lanes_per_device=lanes)
        log.info("loaded %s (step %d); compiling for %d clips per call", source, generator.step, generator.width)
        generator.warm_up()
    except (GenerateError, ReadError, MeshError, OSError, ValueError) as e:
        state.status, state.detail = "failed", str(e)
        log.error("cannot serve: %s", e)
        return
    state.scheduler = Scheduler(
        generator,
        state.store,
        max_batch=generator.width,
        batch_wait_s=s.batch_wait_ms / 1000.0,
        max_queue=s.max_queue,
        on_batch=lambda size, seconds: (
            state.metrics.batch_size.observe(size),
            state.metrics.batch_seconds.observe(seconds),
        ),
        on_finish=lambda job: _finished(state, job),
    )
    state.scheduler.start()
    state.source_info = {"kind": kind, "path": str(source)}
    state.metrics.model_step.set(generator.step)
    state.ready_seconds = time.monotonic() - started
    state.metrics.ready_seconds.set(state.ready_seconds)
    state.status = "ready"
    log.info("ready in %.1f s", state.ready_seconds)
    if s.follow:
        _follow(state, stop)


def _finished(state: Any, job: Any) -> None:
    state.metrics.jobs.labels(job.state).inc()
    if job.finished is not None:
        state.metrics.latency.observe(job.finished - job.created)


def _follow(state: Any, stop: threading.Event) -> None:
    """Swaps in each newly finished checkpoint of the workdir (same model config), between batches."""
    from contracts.checkpoint import CheckpointReader, ReadError, check_config_matches
    from inference.generator import placement

    s = state.settings
    reader = CheckpointReader(s.workdir)
    while not stop.wait(s.poll_s):
        generator = state.scheduler.generator
        steps = reader.steps()
        if not steps or steps[-1] <= generator.step or state.status != "ready":
            continue
        step = steps[-1]
        state.reloading = True
        try:
            check_config_matches(generator.config, reader.config(step), reader.directory / str(step))
            _, abstract, _ = placement(generator.config, generator.mesh)
            params = reader.params(step, abstract)
            state.scheduler.swap(generator.with_params(params, step))
            state.metrics.model_step.set(step)
            log.info("serving checkpoint %d from the next batch on", step)
        except ReadError as e:  # deleted by retention mid-read, or a run with another model: keep serving
            log.warning("not swapping in checkpoint %d: %s", step, e)
        finally:
            state.reloading = False
