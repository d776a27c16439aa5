"""The scheduler: one thread that owns the devices and runs every client's clips, several at a time.

Queue. Each job's clips wait in one first-in-first-out queue, at most `max_queue` clips in all (a submit that does not
fit is refused: the server answers 429). A job whose client went away, was cancelled or timed out is skipped.

Batches. The oldest waiting clip decides what runs next: its step count (the length of the call's denoising loop),
with up to `max_batch` - 1 later clips of the same step count, in arrival order. If fewer are waiting, the scheduler
waits up to `batch_wait_s` after the oldest clip arrived for more. The oldest clip always goes first, so no request
starves. Methods, guidance, eta, seeds, prompts and negative prompts differ freely within a call (they are per-lane
inputs of the inference core), and every clip is computed in a call of the same width, so a client gets the bytes it
would have got alone.

Between batches the scheduler swaps in newly loaded parameters (`swap`): calls in flight finish on the old ones.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from contracts import media
from inference.generator import Cancelled, GenerateError, Generator, Request
from serve.jobs import CANCELLED, DONE, FAILED, QUEUED, RUNNING, Job, JobStore

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The queue has no room for the job's clips; `retry_after_s` estimates when it will."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Scheduler:
    def __init__(
        self,
        generator: Generator,
        store: JobStore,
        *,
        max_batch: int,
        batch_wait_s: float,
        max_queue: int,
        on_batch: Callable[[int, float], None] = lambda size, seconds: None,
        on_finish: Callable[[Job], None] = lambda job: None,
    ) -> None:
        self.generator = generator
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._store = store
        self._batch_wait_s = batch_wait_s
        self._on_batch = on_batch
        self._on_finish = on_finish
        self._queue: collections.deque[tuple[Job, int, float]] = collections.deque()  # (job, clip index, arrival)
        self._lock = threading.Condition()
        self._pending: Generator | None = None
        self._stopping = False
        self._busy = False
        self._seconds_per_step = 0.0  # of one call, averaged: what ETAs are estimated from
        self._thread = threading.Thread(target=self._run, name="yagg-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ------------------------------------------------------------------------------------------------------------------
    # Called by the HTTP side.

    def submit(self, job: Job) -> None:
        """Queues the job's clips, or QueueFull."""
        with self._lock:
            if len(self._queue) + job.spec.num > self.max_queue:
                raise QueueFull(
                    f"the queue is full ({len(self._queue)} of {self.max_queue} clips waiting); retry later",
                    self._eta_locked(len(self._queue), job.spec.steps),
                )
            now = time.monotonic()
            self._queue.extend((job, i, now) for i in range(job.spec.num))
            self._lock.notify_all()

    def cancel(self, job: Job, reason: str = "cancelled") -> bool:
        """Cancels a job that has not finished (its queued clips never run); False if it had finished."""
        with self._lock:
            if job.finished_state:
                return False
            self._queue = collections.deque(item for item in self._queue if item[0] is not job)
            self._lock.notify_all()
        self._store.update(job, state=CANCELLED, error=reason)
        self._on_finish(job)
        return True

    def position(self, job: Job) -> int | None:
        """Clips waiting ahead of the job's first waiting clip (None once none of its clips waits)."""
        with self._lock:
            for ahead, (queued, _, _) in enumerate(self._queue):
                if queued is job:
                    return ahead
        return None

    def eta_s(self, job: Job) -> float | None:
        """Estimated seconds until the job is done (None before the first call has been timed)."""
        with self._lock:
            if not self._seconds_per_step:
                return None
            ahead = next((i for i, item in enumerate(self._queue) if item[0] is job), len(self._queue))
            remaining = 0 if job.state == QUEUED else job.spec.steps - job.step
            calls = -(-(ahead + (job.spec.num - job.clips_done if job.state == QUEUED else 0)) // self.max_batch)
            return self._seconds_per_step * (remaining + calls * job.spec.steps)

    def queued_clips(self) -> int:
        with self._lock:
            return len(self._queue)

    def idle(self) -> bool:
        with self._lock:
            return not self._queue and not self._busy

    def swap(self, generator: Generator) -> None:
        """Uses `generator` (same model, new parameters) from the next batch on."""
        with self._lock:
            self._pending = generator
            self._lock.notify_all()

    def stop(self, timeout_s: float) -> None:
        """Stops the thread after the batch in flight; clips still waiting fail as the server shuts down."""
        with self._lock:
            self._stopping = True
            left = list(self._queue)
            self._queue.clear()
            self._lock.notify_all()
        for job in {id(job): job for job, _, _ in left}.values():
            if not job.finished_state:
                self._store.update(job, state=FAILED, error="the server shut down before this job ran")
                self._on_finish(job)
        self._thread.join(timeout_s)

    def _eta_locked(self, clips_ahead: int, steps: int) -> float:
        per_step = self._seconds_per_step or 0.1
        return per_step * steps * (1 + clips_ahead // self.max_batch)

    # ------------------------------------------------------------------------------------------------------------------
    # The scheduler thread.

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._execute(batch)
            except Exception:  # a bug must fail this batch's jobs, not stop the server
                log.exception("a batch failed")
                for job in {id(job): job for job, _ in batch}.values():
                    if not job.finished_state:
                        self._store.update(job, state=FAILED, error="internal error while generating")
                        self._on_finish(job)
            finally:
                with self._lock:
                    self._busy = False
                    self._lock.notify_all()

    def _next_batch(self) -> list[tuple[Job, int]] | None:
        """Waits for the next batch (see the module doc); None when stopping."""
        with self._lock:
            while True:
                if self._stopping:
                    return None
                if self._pending is not None:
                    self.generator, self._pending = self._pending, None
                self._drop_dead()
                if not self._queue:
                    self._lock.wait()
                    continue
                head, _, arrived = self._queue[0]
                same = [item for item in self._queue if item[0].spec.steps == head.spec.steps]
                wait = arrived + self._batch_wait_s - time.monotonic()
                if len(same) < self.max_batch and wait > 0:
                    self._lock.wait(wait)
                    continue
                chosen = same[: self.max_batch]
                taken = {id(item) for item in chosen}
                self._queue = collections.deque(item for item in self._queue if id(item) not in taken)
                self._busy = True
                return [(job, index) for job, index, _ in chosen]

    def _drop_dead(self) -> None:
        """Removes clips of finished (cancelled) jobs and fails jobs past their deadline (called locked)."""
        now = time.monotonic()
        late = {id(job): job for job, _, _ in self._queue if now > job.deadline and not job.finished_state}
        self._queue = collections.deque(
            item for item in self._queue if not item[0].finished_state and id(item[0]) not in late
        )
        for job in late.values():
            self._store.update(job, state=FAILED, error="timed out waiting in the queue")
            self._on_finish(job)

    def _execute(self, batch: list[tuple[Job, int]]) -> None:
        generator = self.generator  # a swap during the call applies to the next one
        jobs = list({id(job): job for job, _ in batch}.values())
        started = time.monotonic()
        for job in jobs:
            changes: dict[str, Any] = {"step": 0, "model_step": generator.step}
            if job.state == QUEUED:
                changes.update(state=RUNNING, started=started)
            self._store.update(job, **changes)
        spec = batch[0][0].spec
        requests = [
            Request(
                prompt=job.spec.prompt,
                seed=job.spec.seed + index,
                guidance=job.spec.guidance,
                eta=job.spec.eta,
                negative_prompt=job.spec.negative_prompt,
                method=job.spec.method,
            )
            for job, index in batch
        ]

        def progress(done: int, total: int) -> None:
            for job in jobs:
                if not job.finished_state:
                    self._store.update(job, step=done)

        try:
            clips = generator.run(
                requests,
                steps=spec.steps,
                progress=progress,
                cancelled=lambda: all(job.finished_state for job in jobs),
            )
        except Cancelled:
            return
        except GenerateError as e:  # checked at submit; a model swapped in since may refuse what the old one took
            for job in jobs:
                if not job.finished_state:
                    self._store.update(job, state=FAILED, error=str(e))
                    self._on_finish(job)
            return
        seconds = time.monotonic() - started
        self._on_batch(len(batch), seconds)
        with self._lock:
            per_step = seconds / spec.steps
            self._seconds_per_step = (
                per_step if not self._seconds_per_step else 0.8 * self._seconds_per_step + 0.2 * per_step
            )
        for (job, index), pixels in zip(batch, clips.pixels, strict=True):
            if not job.finished_state:
                job.results[index] = media.gif_bytes(pixels, clips.fps)
        for job in jobs:
            if job.finished_state:
                continue
            done = sum(result is not None for result in job.results)
            if done == job.spec.num:
                self._store.update(job, clips_done=done, state=DONE)
                self._on_finish(job)
            else:  # its other clips wait for a later call
                self._store.update(job, clips_done=done, state=QUEUED, step=0)
