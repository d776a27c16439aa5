"""What a user sees of a run: TensorBoard events, `metrics.jsonl`, progress lines with ETA, FLOP/s and MFU.

Only process 0 writes files; other processes log to their own stderr only.

Logged values are averages over the steps since the previous log line (loss, gradient norm, per-timestep-bucket loss)
or the value at the logged step (parameter norm, learning rate). A run resumed from a checkpoint at a multiple of
`log_every` therefore logs exactly what an uninterrupted run logs; `metrics.jsonl` is cut back to the restored step
first, so it never holds lines from steps that were lost and re-run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from clu import metric_writers

from contracts import storage

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"

# Dense bf16 peak FLOP/s of one device, for `config.peak_flops_per_device` (vendor data sheets).
PEAK_FLOPS = {
    "tpu_v4": 275e12,
    "tpu_v5e": 197e12,
    "tpu_v5p": 459e12,
    "h100_sxm": 989e12,
    "a100": 312e12,
}


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs of one call of a compiled (per-device, after SPMD partitioning) program, from XLA's cost analysis."""
    analysis = compiled.cost_analysis()
    # Older jax versions return one dict per computation in a list.
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def truncate_metrics_file(path: str, last_step: int) -> None:
    """Drops lines for steps after `last_step` (written by a run that died before its next checkpoint)."""
    if not storage.is_file(path):
        return
    lines = storage.read_text(path).splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= last_step]
    storage.write_text(path, "".join(line + "\n" for line in kept))


class StepMetrics:
    """Sums the per-step metrics of one logging interval (host numpy values)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._steps = 0
        self._sums: dict[str, float] = {}
        self._bucket_sum: np.ndarray | None = None
        self._bucket_count: np.ndarray | None = None
        self._last: dict[str, float] = {}

    def add(self, metrics: Mapping[str, np.ndarray]) -> None:
        self._steps += 1
        for name in ("loss", "grad_norm"):
            self._sums[name] = self._sums.get(name, 0.0) + float(metrics[name])
        for name in ("param_norm", "learning_rate"):
            self._last[name] = float(metrics[name])
        sums, counts = np.asarray(metrics["bucket_loss_sum"]), np.asarray(metrics["bucket_count"])
        self._bucket_sum = sums if self._bucket_sum is None else self._bucket_sum + sums
        self._bucket_count = counts if self._bucket_count is None else self._bucket_count + counts

    @property
    def steps(self) -> int:
        return self._steps

    def summary(self) -> dict[str, float]:
        assert self._steps, "summary() of an empty interval"
        out = {name: total / self._steps for name, total in self._sums.items()}
        out.update(self._last)
        n = len(self._bucket_sum)
        for i, (total, count) in enumerate(zip(self._bucket_sum, self._bucket_count, strict=True)):
            if count:  # a bucket no example fell into this interval has no loss to report
                out[f"loss_t{i}of{n}"] = float(total / count)
        return out


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class MetricsLogger:
    """Writes one logged step: TensorBoard scalars, a metrics.jsonl line and a progress line."""

    def __init__(
        self,
        workdir: str,
        *,
        is_writer: bool,
        start_step: int,
        total_steps: int,
        examples_per_step: int,
        flops_per_step_per_device: float | None,
        peak_flops_per_device: float | None,
    ) -> None:
        self.workdir = workdir
        self._is_writer = is_writer
        # TensorFlow writes the events: to a local mirror of the workdir when that is remote, synced at every log.
        self._events = storage.LocalMirror(workdir) if is_writer else None
        logdir = self._events.local if self._events else workdir
        self._writer = metric_writers.create_default_writer(logdir, just_logging=not is_writer)
        self._jsonl = storage.join(workdir, METRICS_FILE)
        if is_writer:
            truncate_metrics_file(self._jsonl, start_step)
        self._total = total_steps
        self._examples = examples_per_step
        self._flops = flops_per_step_per_device
        self._peak = peak_flops_per_device
        self._last_step = start_step
        self._last_time = time.perf_counter()
        self._excluded = 0.0

    def exclude_time(self, seconds: float) -> None:
        """Leaves time spent outside training steps (writing samples) out of the next rates."""
        self._excluded += seconds

    def write(self, step: int, scalars: Mapping[str, float]) -> dict[str, Any]:
        """Logs `scalars` for `step` plus throughput since the previous call; returns the record written."""
        now = time.perf_counter()
        steps, elapsed = step - self._last_step, now - self._last_time - self._excluded
        record: dict[str, Any] = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        if steps > 0 and elapsed > 0:
            step_time = elapsed / steps
            record.update(step_time_s=step_time, examples_per_s=self._examples / step_time)
            if self._flops:
                record["flops_per_s_per_device"] = self._flops / step_time
                if self._peak:
                    record["mfu"] = self._flops / step_time / self._peak
        self._last_step, self._last_time, self._excluded = step, now, 0.0

        if self._is_writer:
            storage.append_text(self._jsonl, json.dumps(record) + "\n")
        self._writer.write_scalars(step, {k: v for k, v in record.items() if k != "step"})
        self._sync()
        self._log_progress(record)
        return record

    def _sync(self) -> None:
        if self._events is not None and storage.is_url(self.workdir):
            self._writer.flush()
            self._events.sync()

    def _log_progress(self, record: Mapping[str, Any]) -> None:
        step = record["step"]
        parts = [f"step {step}/{self._total}", f"loss {record['loss']:.4f}"]
        if "step_time_s" in record:
            eta = (self._total - step) * record["step_time_s"]
            parts += [
                f"{1.0 / record['step_time_s']:.2f} steps/s",
                f"{record['examples_per_s']:.1f} examples/s",
                f"ETA {_duration(eta)}",
            ]
        if "mfu" in record:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        log.info("  ".join(parts))

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        self._writer.write_images(step, dict(images))
        self._sync()

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()
        if self._events is not None:
            self._events.sync()
