"""The HTTP API: `create_app(settings)` returns the FastAPI application that `yagg serve` runs on uvicorn.

    GET  /                       the web page (serve/static/index.html)
    GET  /healthz                200 while the process is alive
    GET  /readyz                 200 once the model is loaded and every compiled call is ready; 503 before, on a
                                 failed load, and while draining at shutdown
    GET  /metrics                Prometheus text format
    GET  /v1/model               the model: checkpoint step, frames, size, fps, text encoder, limits, defaults
    POST /v1/generate            one clip -> image/gif (seed and timings in X-Yagg-* headers); num > 1 -> JSON with
                                 one result URL per clip
    POST /v1/jobs                202 + Location: queue a job (an Idempotency-Key header makes a retried submit
                                 return the same job)
    GET  /v1/jobs/{id}           state, queue position, step k of n, ETA
    GET  /v1/jobs/{id}/events    Server-Sent Events: "progress" after every denoising step, then "done", "failed"
                                 or "cancelled"
    GET  /v1/jobs/{id}/result    the GIF (num = 1) or JSON with the clips' URLs; /result/{i} is clip i
    DELETE /v1/jobs/{id}         cancel: a queued job never runs
With a token file every /v1 route needs `Authorization: Bearer <token>`; the page, /healthz, /readyz and /metrics stay
open. The OpenAPI description is at /docs and /openapi.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import importlib.resources
import json
import logging
import random
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse

from serve.jobs import DONE, FINISHED, QUEUED, Job, JobStore, KeyReused, Spec
from serve.metrics import Metrics
from serve.scheduler import QueueFull, Scheduler
from serve.settings import ServeSettings

log = logging.getLogger(__name__)

GUIDANCE_RANGE = (0.0, 30.0)
MAX_SEED = 2**32 - 1


class GenerateBody(BaseModel):
    """A request for `num` clips of one prompt (seeds seed, seed + 1, ...). Unset settings take the model's defaults
    (GET /v1/model); an unset seed is drawn at random and returned, so the clip can be made again."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=1000, description="what the clip should show")
    negative_prompt: str | None = Field(
        None, min_length=1, max_length=1000, description="what guidance should steer away from"
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = Field(None, ge=1, description="denoising steps, at most the server's max_steps")
    guidance: float | None = Field(None, ge=GUIDANCE_RANGE[0], le=GUIDANCE_RANGE[1], description="1 = no guidance")
    eta: float | None = Field(None, ge=0.0, le=1.0, description="DDIM noise: 0 deterministic, 1 ancestral")
    method: Literal["ddim", "ddpm"] | None = None
    num: int = Field(1, ge=1, description="clips, at most the server's max_num")


def _invalid(field: str, message: str) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors."""
    return HTTPException(422, detail=[{"loc": ["body", field], "msg": message, "type": "value_error"}])


class _State:
    """What the routes share: set up by the warm-up thread, read by every request."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.status = "warming up"  # -> "ready" | "failed" | "draining"
        self.detail = ""
        self.scheduler: Scheduler | None = None
        self.store = JobStore(result_ttl_s=settings.result_ttl_s, max_results=settings.max_results)
        self.metrics = Metrics()
        self.tokens = _read_tokens(settings.token_file)
        self.ready_seconds: float | None = None
        self.reloading = False
        self.source_info: dict[str, Any] = {}

    @property
    def generator(self) -> Any:
        assert self.scheduler is not None
        return self.scheduler.generator


def _read_tokens(path: str | None) -> list[bytes]:
    if path is None:
        return []
    tokens = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not tokens:
        raise ValueError(f"--token-file {path} holds no token (one per line)")
    return [token.encode() for token in tokens]


def create_app(settings: ServeSettings, *, loader: Any = None) -> FastAPI:
    """The application. `loader(state)` loads and warms the model (default: serve.loading.load_and_warm_up) on a
    background thread started by the lifespan, so /healthz answers at once and /readyz when it is done."""
    from serve import loading

    state = _State(settings)
    load = loader or loading.load_and_warm_up

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        threading.Thread(target=load, args=(state, stop), name="yagg-load", daemon=True).start()
        yield
        stop.set()
        if state.scheduler is not None:
            state.scheduler.stop(timeout_s=settings.drain_timeout_s)

    app = FastAPI(
        title="yagg",
        description="Text-to-GIF diffusion over HTTP: one scheduler batches every client's clips on the devices.",
        lifespan=lifespan,
    )
    app.state.yagg = state
    app.add_middleware(_BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
            expose_headers=["Location", "Retry-After", "X-Yagg-Seed", "X-Yagg-Job"],
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return importlib.resources.files("serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        body = {"status": state.status, "detail": state.detail, "reloading": state.reloading}
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        if state.scheduler is not None:
            state.metrics.queue_depth.set(state.scheduler.queued_clips())
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_auth(state))])

    @v1.get("/model")
    def model() -> dict[str, Any]:
        generator = _ready(state).generator
        facts, d = generator.facts, generator.defaults
        return {
            "step": generator.step,
            "source": state.source_info,
            "frames": facts.frames,
            "size": facts.size,
            "fps": facts.fps,
            "text_encoder": dataclasses.asdict(facts.text_encoder),
            "defaults": {"steps": d.steps, "guidance": d.guidance, "eta": d.eta, "method": d.method},
            "limits": {
                "max_steps": settings.max_steps,
                "max_num": settings.max_num,
                "guidance": list(GUIDANCE_RANGE),
                "seed": [0, MAX_SEED],
                "prompt_tokens": facts.text_encoder.max_length,
                "methods": list(settings.methods),
                "max_batch": state.scheduler.max_batch,
                "max_queue": state.scheduler.max_queue,
                "request_timeout_s": settings.request_timeout_s,
            },
        }

    @v1.post("/generate", responses={200: {"content": {"image/gif": {}}}})
    async def generate(body: GenerateBody, request: Request) -> Response:
        """Runs the request and answers its clip as a GIF, or for num > 1, JSON with the clips' result URLs."""
        job = _submit(state, body, key=None, route="generate")
        outcome = await _wait(state, job, request)
        if outcome == "disconnected":
            return Response(status_code=499)
        if job.state != DONE:
            status = 504 if outcome == "timeout" else 500
            state.metrics.requests.labels("generate", "timeout" if status == 504 else job.state).inc()
            raise HTTPException(status, detail=job.error or f"the job ended {job.state}")
        state.metrics.requests.labels("generate", "ok").inc()
        headers = _timing_headers(job)
        if job.spec.num == 1:
            return Response(job.results[0], media_type="image/gif", headers=headers)
        return JSONResponse(_result_json(job), headers=headers)

    @v1.post("/jobs", status_code=202)
    def submit_job(
        body: GenerateBody, response: Response, idempotency_key: str | None = Header(None, max_length=200)
    ) -> dict[str, Any]:
        """Queues a job and answers at once with its id (Location: its status URL)."""
        job = _submit(state, body, key=idempotency_key, route="jobs")
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return _status(state, job)

    @v1.get("/jobs/{job_id}")
    def job_status(job_id: str) -> dict[str, Any]:
        return _status(state, _job(state, job_id))

    @v1.get("/jobs/{job_id}/events")
    async def job_events(job_id: str) -> EventSourceResponse:
        """Server-Sent Events: the job's status after every change ("progress"), then its end ("done", "failed",
        "cancelled")."""
        job = _job(state, job_id)

        async def events() -> AsyncIterator[dict[str, str]]:
            sent, version = 0, -1
            while True:
                for snapshot in state.store.history(job, sent):
                    sent += 1
                    ended = snapshot["state"] in FINISHED
                    status = {**_status(state, job), **snapshot} if not ended else _status(state, job)
                    yield {"event": snapshot["state"] if ended else "progress", "data": json.dumps(status)}
                    if ended:
                        return
                version = await asyncio.to_thread(state.store.wait, job, version, 1.0)

        return EventSourceResponse(events(), ping=15)

    @v1.get("/jobs/{job_id}/result", responses={200: {"content": {"image/gif": {}}}})
    def job_result(job_id: str) -> Response:
        job = _finished(state, job_id)
        if job.spec.num == 1:
            return Response(job.results[0], media_type="image/gif", headers=_timing_headers(job))
        return JSONResponse(_result_json(job), headers=_timing_headers(job))

    @v1.get("/jobs/{job_id}/result/{index}", responses={200: {"content": {"image/gif": {}}}})
    def job_clip(job_id: str, index: int) -> Response:
        job = _finished(state, job_id)
        if not 0 <= index < job.spec.num:
            raise HTTPException(404, detail=f"job {job_id} has clips 0..{job.spec.num - 1}")
        headers = {**_timing_headers(job), "X-Yagg-Seed": str(job.spec.seed + index)}
        return Response(job.results[index], media_type="image/gif", headers=headers)

    @v1.delete("/jobs/{job_id}")
    def cancel_job(job_id: str) -> dict[str, Any]:
        job = _job(state, job_id)
        if not _ready(state).scheduler.cancel(job):
            raise HTTPException(409, detail=f"job {job_id} has already ended ({job.state})")
        return _status(state, job)

    app.include_router(v1)
    return app


# ----------------------------------------------------------------------------------------------------------------------
# Route helpers.


def _auth(state: _State) -> Any:
    def check(authorization: str | None = Header(None, include_in_schema=False)) -> None:
        if not state.tokens:
            return
        given = (authorization or "").removeprefix("Bearer ").strip().encode()
        # Constant time, and every token compared, so the timing says nothing about which one nearly matched.
        matches = [hmac.compare_digest(given, token) for token in state.tokens]
        if not authorization or not authorization.startswith("Bearer ") or not any(matches):
            state.metrics.requests.labels("auth", "unauthorized").inc()
            raise HTTPException(401, detail="a valid `Authorization: Bearer <token>` header is required",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    return check


def _ready(state: _State) -> _State:
    if state.status != "ready" or state.scheduler is None:
        raise HTTPException(503, detail=f"the server is {state.status}", headers={"Retry-After": "5"})
    return state


def _submit(state: _State, body: GenerateBody, *, key: str | None, route: str) -> Job:
    """Validates the request against the model and the limits, then creates and queues its job."""
    _ready(state)
    s, generator = state.settings, state.generator
    d = generator.defaults
    if body.steps is not None and body.steps > s.max_steps:
        state.metrics.requests.labels(route, "invalid").inc()
        raise _invalid("steps", f"steps must be between 1 and {s.max_steps} (the server's --max-steps)")
    if body.num > s.max_num:
        state.metrics.requests.labels(route, "invalid").inc()
        raise _invalid("num", f"num must be between 1 and {s.max_num} (the server's --max-num)")
    method = body.method or d.method
    if method not in s.methods:
        state.metrics.requests.labels(route, "invalid").inc()
        raise _invalid("method", f"method must be one of {list(s.methods)}")
    spec = Spec(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        seed=random.randrange(MAX_SEED + 1) if body.seed is None else body.seed,
        steps=min(body.steps or d.steps, s.max_steps),
        guidance=d.guidance if body.guidance is None else body.guidance,
        eta=d.eta if body.eta is None else body.eta,
        method=method,
        num=body.num,
    )
    from inference.generator import GenerateError, Request

    try:  # prompt lengths (and any other refusal of the model's) before the job exists
        request = Request(spec.prompt, spec.seed, spec.guidance, spec.eta, spec.negative_prompt, spec.method)
        generator.check([request], spec.steps)
    except GenerateError as e:
        state.metrics.requests.labels(route, "invalid").inc()
        raise _invalid("negative_prompt" if "negative" in str(e) else "prompt", str(e)) from e
    try:
        job, new = state.store.create(spec, s.request_timeout_s, key)
    except KeyReused as e:
        state.metrics.requests.labels(route, "conflict").inc()
        raise HTTPException(409, detail=str(e)) from e
    if new:
        try:
            state.scheduler.submit(job)
        except QueueFull as e:
            state.store.update(job, state="failed", error=str(e))
            state.metrics.requests.labels(route, "queue_full").inc()
            retry = str(max(1, round(e.retry_after_s)))
            raise HTTPException(429, detail=str(e), headers={"Retry-After": retry}) from e
        if route == "jobs":
            state.metrics.requests.labels(route, "accepted").inc()
    else:
        state.metrics.requests.labels(route, "idempotent_repeat").inc()
    return job


async def _wait(state: _State, job: Job, request: Request) -> str:
    """Waits for the job to end: "ended", "timeout" (cancelled at the request timeout) or "disconnected" (the client
    went away; a job still queued is dropped from the queue)."""
    version = -1
    while job.state not in FINISHED:
        if await request.is_disconnected():
            if job.state == QUEUED:
                state.scheduler.cancel(job, "the client disconnected before its turn")
            state.metrics.requests.labels("generate", "disconnected").inc()
            return "disconnected"
        if time.monotonic() > job.deadline:
            state.scheduler.cancel(job, f"not done within the request timeout ({state.settings.request_timeout_s} s)")
            return "timeout"
        version = await asyncio.to_thread(state.store.wait, job, version, 0.25)
    return "ended"


def _job(state: _State, job_id: str) -> Job:
    job = state.store.get(job_id)
    if job is None:
        raise HTTPException(404, detail=f"no job {job_id} (unknown, or its results have expired)")
    return job


def _finished(state: _State, job_id: str) -> Job:
    job = _job(state, job_id)
    if job.state != DONE:
        raise HTTPException(
            409, detail=f"job {job_id} is {job.state}, not done" + (f": {job.error}" if job.error else "")
        )
    return job


def _status(state: _State, job: Job) -> dict[str, Any]:
    status = job.snapshot()
    scheduler = state.scheduler
    status["queue_position"] = scheduler.position(job) if scheduler is not None else None
    status["eta_s"] = scheduler.eta_s(job) if scheduler is not None and job.state not in FINISHED else None
    if job.state == DONE:
        status["result"] = f"/v1/jobs/{job.id}/result"
        status["results"] = [f"/v1/jobs/{job.id}/result/{i}" for i in range(job.spec.num)]
    return status


def _result_json(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "model_step": job.model_step,
        "clips": [{"seed": job.spec.seed + i, "url": f"/v1/jobs/{job.id}/result/{i}"} for i in range(job.spec.num)],
    }


def _timing_headers(job: Job) -> dict[str, str]:
    started = job.started if job.started is not None else job.created
    finished = job.finished if job.finished is not None else started
    return {
        "X-Yagg-Job": job.id,
        "X-Yagg-Seed": str(job.spec.seed),
        "X-Yagg-Model-Step": str(job.model_step),
        "X-Yagg-Queue-Seconds": f"{started - job.created:.3f}",
        "X-Yagg-Run-Seconds": f"{finished - started:.3f}",
    }


class _BodyLimit:
    """Refuses request bodies over `max_bytes` with 413, counting what arrives (a Content-Length may be absent)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _too_large(self.max_bytes, send)
            return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _BodyTooLarge:
            await _too_large(self.max_bytes, send)


class _BodyTooLarge(Exception):
    pass


async def _too_large(limit: int, send: Any) -> None:
    body = json.dumps({"detail": f"the request body is over {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
