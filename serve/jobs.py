"""Jobs: what a client asked for, where it stands, and its results; kept in a store bounded in time and count.

A job is one request of `num` clips (seeds seed, seed + 1, ...). It moves queued -> running -> done, or ends failed or
cancelled; every change is published to the job's listeners (the server-sent event streams and waiting requests).
Finished jobs are kept `result_ttl_s` seconds and at most `max_results` of them (the oldest finished go first), so
memory does not grow with uptime. An `Idempotency-Key` names a job for as long as the job is kept: a retried submit
with the same key and body gets the same job instead of running twice.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)


@dataclasses.dataclass(frozen=True)
class Spec:
    """A validated request: every setting resolved (defaults filled in)."""

    prompt: str
    negative_prompt: str | None
    seed: int
    steps: int
    guidance: float
    eta: float
    method: str
    num: int

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass
class Job:
    id: str
    spec: Spec
    created: float  # time.monotonic()
    deadline: float  # monotonic time after which the job fails as timed out
    state: str = QUEUED
    started: float | None = None
    finished: float | None = None
    model_step: int | None = None  # the checkpoint step whose parameters drew it
    step: int = 0  # denoising steps done in the job's current call
    clips_done: int = 0
    results: list[bytes | None] = dataclasses.field(default_factory=list)
    error: str | None = None
    version: int = 0  # bumped on every change; listeners wait for a newer one
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the snapshot after every change

    @property
    def finished_state(self) -> bool:
        return self.state in FINISHED

    def snapshot(self) -> dict[str, Any]:
        """What a client sees (GET /v1/jobs/{id}, and every event)."""
        s = self.spec
        return {
            "id": self.id,
            "state": self.state,
            "prompt": s.prompt,
            "negative_prompt": s.negative_prompt,
            "seed": s.seed,
            "seeds": [s.seed + i for i in range(s.num)],
            "steps": s.steps,
            "guidance": s.guidance,
            "eta": s.eta,
            "method": s.method,
            "num": s.num,
            "step": self.step,
            "clips_done": self.clips_done,
            "model_step": self.model_step,
            "error": self.error,
        }


class JobStore:
    """Every job by id, with their listeners; thread-safe (the scheduler thread and the HTTP handlers share it)."""

    def __init__(self, *, result_ttl_s: float, max_results: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._keys: dict[str, tuple[str, str]] = {}  # idempotency key -> (job id, spec digest)
        self._lock = threading.Condition()
        self._ttl = result_ttl_s
        self._max = max_results
        self._clock = clock

    def create(self, spec: Spec, timeout_s: float, key: str | None = None) -> tuple[Job, bool]:
        """(the job, True if it is new). With a key already used for the same spec: the existing job, False.
        KeyReused if the key names a job with another spec."""
        with self._lock:
            self._expire()
            if key is not None and key in self._keys:
                job_id, digest = self._keys[key]
                if digest != spec.digest():
                    raise KeyReused(f"Idempotency-Key {key!r} was used for another request (job {job_id})")
                return self._jobs[job_id], False
            now = self._clock()
            job = Job(id=uuid.uuid4().hex, spec=spec, created=now, deadline=now + timeout_s)
            job.results = [None] * spec.num
            job.history.append(job.snapshot())
            self._jobs[job.id] = job
            if key is not None:
                self._keys[key] = (job.id, spec.digest())
            return job, True

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            self._expire()
            return self._jobs.get(job_id)

    def update(self, job: Job, **changes: Any) -> None:
        """Applies `changes` to the job and wakes its listeners."""
        with self._lock:
            for name, value in changes.items():
                setattr(job, name, value)
            if job.finished_state and job.finished is None:
                job.finished = self._clock()
            job.version += 1
            job.history.append(job.snapshot())
            self._lock.notify_all()

    def wait(self, job: Job, version: int, timeout_s: float) -> int:
        """Blocks until the job changes past `version` (or `timeout_s`); returns its version now."""
        with self._lock:
            self._lock.wait_for(lambda: job.version != version, timeout=timeout_s)
            return job.version

    def history(self, job: Job, start: int) -> list[dict[str, Any]]:
        """The job's snapshots from change number `start` on (every change is kept: a stream misses none)."""
        with self._lock:
            return job.history[start:]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(collections.Counter(job.state for job in self._jobs.values()))

    def _expire(self) -> None:
        """Drops finished jobs past their time, then the oldest finished ones beyond the count (called locked)."""
        now = self._clock()
        finished = [job for job in self._jobs.values() if job.finished_state]
        stale = [job for job in finished if job.finished is not None and now - job.finished > self._ttl]
        kept = [job for job in finished if job not in stale]
        stale += kept[: max(0, len(kept) - self._max)]
        for job in stale:
            self._jobs.pop(job.id, None)
        if stale:
            gone = {job.id for job in stale}
            self._keys = {k: v for k, v in self._keys.items() if v[0] not in gone}


class KeyReused(ValueError):
    """An Idempotency-Key sent again with a different request."""
